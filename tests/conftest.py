"""Shared fixtures: the shared/ vectors, in-memory session pairs, loopback servers."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.heartbeat import Heartbeat
from remotedialer.session import ConnectHandler, Session
from remotedialer.transport import MemoryTransport, memory_pair

# Every blocking call in a test is bounded by this (seconds).
TIMEOUT = 10.0


def shared_dir() -> Path:
    """The project's shared/ directory (vectors, PROTOCOL.md): beside the clone,
    or where ``REMOTEDIALER_SHARED`` points. Missing is a failure, not a skip."""
    candidates = []
    env = os.environ.get("REMOTEDIALER_SHARED")
    if env:
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parents[2] / "shared")
    for candidate in candidates:
        if (candidate / "vectors").is_dir():
            return candidate
    raise FileNotFoundError(
        f"shared/ vectors not found (tried {', '.join(map(str, candidates))}); "
        "set REMOTEDIALER_SHARED"
    )


def wait_for(predicate: Callable[[], object], timeout: float = TIMEOUT, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class SessionPair:
    """A client and a server session joined by an in-memory WebSocket pair,
    each served on its own thread."""

    def __init__(
        self,
        *,
        limits: Optional[Limits] = None,
        client_limits: Optional[Limits] = None,
        connect_handler: Optional[ConnectHandler] = None,
        client_listener: Optional[Callable[..., None]] = None,
        heartbeat: Optional[Heartbeat] = None,
        capacity: int = 1 << 20,
    ) -> None:
        self.client_end, self.server_end = memory_pair()
        self.client_end.capacity = self.server_end.capacity = capacity
        limits = limits or Limits()
        self.heartbeat = heartbeat or Heartbeat("test-heartbeat")
        self.client = Session(
            self.client_end,
            is_client=True,
            client_key="client",
            session_key=0,
            connect_handler=connect_handler,
            limits=client_limits or limits,
            heartbeat=self.heartbeat,
        )
        self.server = Session(
            self.server_end,
            is_client=False,
            client_key="foo",
            session_key=7,
            client_listener=client_listener,
            limits=limits,
            heartbeat=self.heartbeat,
        )
        self.threads = [self.client.start(), self.server.start()]

    def close(self) -> None:
        self.client.close("test over")
        self.server.close("test over")
        for thread in self.threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "session reader thread did not end"


@pytest.fixture
def session_pair_factory() -> Iterator[Callable[..., SessionPair]]:
    """Build :class:`SessionPair` objects; all are closed at teardown."""
    pairs: List[SessionPair] = []

    def make(**kwargs: object) -> SessionPair:
        pair = SessionPair(**kwargs)  # type: ignore[arg-type]
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


class AcceptingHandler:
    """A connect handler that accepts every CONNECT and queues the connection."""

    def __init__(self) -> None:
        self.connections: List[TunnelConnection] = []
        self._cond = threading.Condition()

    def __call__(self, conn: TunnelConnection) -> None:
        with self._cond:
            self.connections.append(conn)
            self._cond.notify_all()

    def next(self, timeout: float = TIMEOUT) -> TunnelConnection:
        """Block until a connection arrived that was not handed out yet."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.connections, timeout):
                raise AssertionError("no CONNECT arrived")
            return self.connections.pop(0)


@pytest.fixture
def tunnel(session_pair_factory: Callable[..., SessionPair]) -> Tuple[SessionPair, AcceptingHandler]:
    """A session pair whose client side accepts every dial into a queue."""
    handler = AcceptingHandler()
    pair = session_pair_factory(connect_handler=handler)
    return pair, handler


def raw_server_end() -> Tuple[Session, MemoryTransport]:
    """A server session whose peer is a bare :class:`MemoryTransport` that the
    test drives message by message (for protocol-level assertions)."""
    client_end, server_end = memory_pair()
    session = Session(server_end, is_client=False, client_key="foo", session_key=7,
                      heartbeat=Heartbeat("test-heartbeat"))
    session.start()
    return session, client_end


class EchoServer:
    """A loopback TCP server (port 0) that echoes every connection on a thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.address = f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{host}:{self.port}"
        self.accepted: List[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(sock)
            threading.Thread(target=self._echo, args=(sock,), daemon=True).start()

    @staticmethod
    def _echo(sock: socket.socket) -> None:
        with sock:
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    sock.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self.accepted:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


class TunnelServer:
    """The real WSGI :class:`~remotedialer.server.Server` under werkzeug's
    threaded server on a free loopback port. The authorizer accepts requests
    carrying ``X-Tunnel-ID`` (its value is the client key), records every
    request's headers, and can be swapped by tests (``authorize``)."""

    def __init__(self, **server_options: object) -> None:
        from werkzeug.serving import make_server

        from remotedialer.server import Server

        self.requests: List[Dict[str, str]] = []
        self.authorize: Callable[[Any], Tuple[str, bool]] = self.by_tunnel_id
        self.server = Server(self._authorizer, **server_options)  # type: ignore[arg-type]
        self.httpd = make_server("127.0.0.1", 0, self.server, threaded=True)
        self.port = self.httpd.server_port
        self.url = f"ws://127.0.0.1:{self.port}/connect"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @staticmethod
    def by_tunnel_id(request: Any) -> Tuple[str, bool]:
        key = request.headers.get("X-Tunnel-ID", "")
        return key, bool(key)

    def _authorizer(self, request: Any) -> Tuple[str, bool]:
        self.requests.append(dict(request.headers))
        return self.authorize(request)

    def close(self) -> None:
        self.server.close("test over")
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def tunnel_server() -> Iterator[TunnelServer]:
    server = TunnelServer()
    yield server
    server.close()
