"""Helpers shared by the tests: timeouts and polling, byte-exact reads, loopback
TCP servers, in-memory session pairs, and the real WSGI server on werkzeug.

Fixtures built on these live in ``conftest.py``; tests import the classes and
functions from here (``from testkit.support import ...``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import selectors
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from remotedialer.addresses import join_host_port
from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.heartbeat import Heartbeat
from remotedialer.observer import Observer
from remotedialer.piping import LocalDialer, Piper
from remotedialer.protocol import Message, MessageType, decode_message, encode_message
from remotedialer.session import ConnectHandler, Session
from remotedialer.testing import memory_pair

# Every blocking call in a test is bounded by this (seconds).
TIMEOUT = 10.0

T = TypeVar("T")


# Test data kept in the repository: the Go vectors and a recorded Go session
# (byte-exact messages from rancher/remotedialer; see tests/data/README.md).
DATA_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"


def go_vectors(name: str) -> Path:
    """The path of a recorded Go vector file in ``tests/data``."""
    return DATA_DIR / name


def go_reference(name: str) -> Optional[Path]:
    """A Go reference program (``server``, ``client``, ``dummy`` of rancher/remotedialer,
    built outside the project) from ``$REMOTEDIALER_GOREF`` or ``~/.cache/rd-goref/bin``."""
    path = Path(os.environ.get("REMOTEDIALER_GOREF") or Path.home() / ".cache/rd-goref/bin") / name
    return path if os.access(path, os.X_OK) else None


def wait_for(predicate: Callable[[], object], timeout: float = TIMEOUT, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def server_readers() -> int:
    """Threads of this process reading for a server's session now (inside
    the tunnel server's serve loop for a session): a parked session holds
    none. Counted by the Python frames of
    :class:`~remotedialer.server.tunnel_server.Server`'s serve loop, which
    stays Python in the mypyc build (compiled code has no frames)."""
    import sys

    from remotedialer.server.tunnel_server import Server

    serve = Server._serve_until_detached.__code__
    count = 0
    for frame in sys._current_frames().values():
        walking: Any = frame
        while walking is not None:
            if walking.f_code is serve:
                count += 1
                break
            walking = walking.f_back
    return count


def recv_exactly(sock: Any, size: int) -> bytes:
    """Read exactly ``size`` bytes from a socket-like object (blocks on its
    timeout); an EOF before that fails the test."""
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(min(1 << 20, size - len(out)))
        assert chunk, f"EOF after {len(out)} of {size} bytes"
        out += chunk
    return bytes(out)


def recv_up_to(sock: Any, size: int) -> bytes:
    """Read until ``size`` bytes arrived or EOF (blocks on the socket's
    timeout); returns what arrived, possibly short."""
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(min(1 << 20, size - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_until_eof(sock: Any) -> bytes:
    """Read until EOF (each ``recv`` bounded by the socket's timeout)."""
    out = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


def echo_concurrently(sock: Any, data: bytes) -> bytes:
    """Send ``data`` on a thread while reading as many bytes back on this one
    (the far end echoes; both bounded by the socket's timeout). A failed or
    hung write fails the test. Returns what came back."""
    errors: List[BaseException] = []

    def write() -> None:
        try:
            sock.sendall(data)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = recv_exactly(sock, len(data))
    writer.join(TIMEOUT)
    assert not errors and not writer.is_alive(), errors
    return got


def echo_round_trip(conn: Any, size: int) -> None:
    """Send ``size`` random bytes through an echo and compare digests."""
    payload = os.urandom(size)
    sender = threading.Thread(target=conn.sendall, args=(payload,))
    sender.start()
    received = recv_exactly(conn, size)
    sender.join(TIMEOUT)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


def allow_all(proto: str, address: str) -> bool:
    """A connect authorizer that allows every dial."""
    return True


@contextlib.contextmanager
def closing_all(factory: Callable[..., T]) -> Iterator[Callable[..., T]]:
    """Yield a function that calls ``factory`` and remembers what it made;
    everything made is closed (``close()``, in order) on the way out. For
    factory fixtures: ``with closing_all(SessionPair) as make: yield make``."""
    made: List[Any] = []

    def make(*args: Any, **kwargs: Any) -> T:
        thing = factory(*args, **kwargs)
        made.append(thing)
        return thing

    try:
        yield make
    finally:
        for thing in made:
            thing.close()


def dial_and_accept(dial: Callable[[str], T]) -> Tuple[T, socket.socket]:
    """Listen on a free loopback port, call ``dial`` with its address and
    accept the connection that makes (blocks up to TIMEOUT); returns what
    ``dial`` returned and the accepted socket. The listener is closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    try:
        conn = dial(f"127.0.0.1:{listener.getsockname()[1]}")
        far, _ = listener.accept()
    finally:
        listener.close()
    return conn, far


def raw_upgrade(port: int, key: str) -> socket.socket:
    """Open a WebSocket by hand and return the socket after the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    request = (
        "GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\nX-Tunnel-ID: {key}\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while not response.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, f"EOF in the handshake response: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101 "), response
    return sock


# --------------------------------------------------------- loopback servers
class LoopbackListener:
    """A TCP listener on a free loopback port whose accept loop runs on a
    daemon thread and hands every connection to :meth:`handle` (on that
    thread). Accepted sockets are kept in ``accepted`` and closed by
    :meth:`close`. Subclasses set their own attributes before calling
    ``super().__init__()`` (the loop starts at once)."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 64, name: str = "test-listener") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family, backlog=backlog)
        self.port: int = self.listener.getsockname()[1]
        self.address = join_host_port(host, self.port)
        self.accepted: List[socket.socket] = []
        self._accepted_lock = threading.Lock()
        self.accept_thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self.accept_thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._accepted_lock:
                self.accepted.append(sock)
            self.handle(sock)

    def handle(self, sock: socket.socket) -> None:
        """Serve one accepted connection; runs on the accept thread, so long
        work goes to :meth:`serve_on_thread`. By default: hold it open."""

    @staticmethod
    def serve_on_thread(target: Callable[[socket.socket], None], sock: socket.socket) -> None:
        threading.Thread(target=target, args=(sock,), daemon=True).start()

    def drop_connections(self) -> None:
        """Close every accepted connection."""
        with self._accepted_lock:
            socks, self.accepted = self.accepted, []
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.drop_connections()


def echo_until_eof(sock: socket.socket) -> None:
    """Send back what ``sock`` receives until EOF or an error, then close it."""
    with sock, contextlib.suppress(OSError):
        for data in iter(lambda: sock.recv(65536), b""):
            sock.sendall(data)


class EchoServer(LoopbackListener):
    """A loopback TCP server (port 0) that echoes every connection on a thread."""

    def handle(self, sock: socket.socket) -> None:
        self.serve_on_thread(echo_until_eof, sock)


class SilentListener(LoopbackListener):
    """Accepts TCP connections on 127.0.0.1 and then says nothing (or only
    ``prefix``, after reading the request), holding them open until closed."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        super().__init__(backlog=16)

    def handle(self, sock: socket.socket) -> None:
        if self.prefix:
            try:
                sock.recv(65536)  # the upgrade request
                sock.sendall(self.prefix)
            except OSError:
                pass


class SelectorEchoServer:
    """A loopback echo server on one selector thread (so it adds one thread
    whatever the number of connections). It echoes with backpressure and,
    when a client sends FIN, finishes echoing and then closes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family, backlog=512)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.address = join_host_port(host, self.port)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.pending: Dict[socket.socket, bytearray] = {}
        self.eof: Dict[socket.socket, bool] = {}
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, mask in self.selector.select(0.05):
                if key.data is None:
                    self._accept()
                else:
                    self._service(key.fileobj, mask)  # type: ignore[arg-type]
        for sock in list(self.pending):
            sock.close()
        self.selector.close()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            self.accepted += 1
            sock.setblocking(False)
            self.pending[sock] = bytearray()
            self.eof[sock] = False
            self.selector.register(sock, selectors.EVENT_READ, "conn")

    def _service(self, sock: socket.socket, mask: int) -> None:
        buf = self.pending[sock]
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(65536)
                if data:
                    buf += data
                else:
                    self.eof[sock] = True
            if buf:
                sent = sock.send(buf)
                del buf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(sock)
            return
        if self.eof[sock] and not buf:
            self._drop(sock)
            return
        events = selectors.EVENT_WRITE if buf else 0
        if len(buf) < 256 * 1024 and not self.eof[sock]:
            events |= selectors.EVENT_READ
        self.selector.modify(sock, events, "conn")

    def _drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        del self.pending[sock]
        del self.eof[sock]
        sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


# ------------------------------------------------------ in-memory sessions
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

    def idle(self) -> bool:
        """No tunneled connection is left on either side."""
        return not self.server.connections() and not self.client.connections()

    def close(self) -> None:
        self.client.close("test over")
        self.server.close("test over")
        for thread in self.threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "session reader thread did not end"


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


class LocalDialTunnel:
    """A session pair whose client side serves CONNECTs with a
    :class:`LocalDialer` (allowing every target by default) on its own piper."""

    def __init__(
        self,
        make_pair: Callable[..., SessionPair] = SessionPair,
        authorizer: Optional[Callable[[str, str], bool]] = allow_all,
        dialer: Optional[Callable[..., socket.socket]] = None,
        limits: Limits = Limits(),
        name: str = "test-piper",
    ) -> None:
        self.piper = Piper(name)
        self.local = LocalDialer(authorizer, dialer, limits, self.piper)
        self.pair = make_pair(limits=limits, connect_handler=self.local)

    def dial(self, address: str) -> TunnelConnection:
        """Dial ``address`` from the server side (blocks up to TIMEOUT)."""
        return self.pair.server.dial("tcp", address, timeout=TIMEOUT)

    def idle(self) -> bool:
        return self.pair.idle()

    def close(self) -> None:
        self.pair.close()
        self.local.shutdown()
        self.piper.stop()


# ------------------------------------------------------ the real WSGI server
def tunnel_id_authorizer(request: Any) -> Tuple[str, bool]:
    """The Go example's authorizer: any non-empty X-Tunnel-ID is the client
    key; an ``X-Error`` header makes it raise (for the server's 500 path)."""
    if request.headers.get("X-Error"):
        raise ValueError(request.headers["X-Error"])
    key = request.headers.get("X-Tunnel-ID", "")
    return key, bool(key)


class TunnelServer:
    """The real WSGI :class:`~remotedialer.server.Server` under werkzeug's
    threaded server on a loopback port (``port``, 0: a free one; TLS with
    ``ssl_context``), and
    the tunnel clients a test starts with :meth:`client`. The authorizer
    records every request's headers and then asks ``authorize`` (by default
    :func:`tunnel_id_authorizer`; given as ``authorizer=`` or swapped by a test)."""

    def __init__(
        self,
        ssl_context: Optional[ssl.SSLContext] = None,
        authorizer: Callable[[Any], Tuple[str, bool]] = tunnel_id_authorizer,
        port: int = 0,
        **server_options: Any,
    ) -> None:
        from werkzeug.serving import make_server

        from remotedialer.server import Server

        self.requests: List[Dict[str, str]] = []
        self.authorize = authorizer
        self.server = Server(self._authorizer, **server_options)
        self.httpd = make_server("127.0.0.1", port, self.server, threaded=True, ssl_context=ssl_context)
        self.port = self.httpd.server_port
        scheme = "wss" if ssl_context is not None else "ws"
        self.url = f"{scheme}://127.0.0.1:{self.port}/connect"
        self.clients: List[TunnelClient] = []
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def _authorizer(self, request: Any) -> Tuple[str, bool]:
        self.requests.append(dict(request.headers))
        return self.authorize(request)

    def client(
        self,
        key: str = "foo",
        connect_authorizer: Optional[Callable[[str, str], bool]] = allow_all,
        wait: bool = True,
        **options: Any,
    ) -> TunnelClient:
        """Start a tunnel client for ``key`` (allowing every dial by default);
        unless ``wait`` is false, block until the server registered its
        session (up to TIMEOUT each). Stopped by :meth:`close`."""
        before = len(self.server.sessions(key))
        options.setdefault("backoff", Backoff(initial=0.05, maximum=0.2))
        client = TunnelClient(self.url, {"X-Tunnel-ID": key}, connect_authorizer, **options)
        self.clients.append(client)
        client.start()
        if wait:
            client.wait_connected(TIMEOUT)
            wait_for(lambda: len(self.server.sessions(key)) > before)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.stop(TIMEOUT)
        self.server.close("test over")
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


# ------------------------------------------ a session driven by hand
KiB = 1024

# Small flow-control limits, so that PAUSE and RESUME happen with little data.


SMALL = Limits(
    pause_threshold=64 * KiB,
    resume_threshold=16 * KiB,
    hard_buffer_limit=512 * KiB,
    max_data_message=8 * KiB,
)


class Raw:
    """A session whose far end is a bare transport the test drives by hand
    (the ``raw`` and ``raw_factory`` fixtures)."""

    def __init__(self, *, is_client: bool = False, limits: Limits = Limits(), **kwargs: Any) -> None:
        self.far, self.near = memory_pair()
        self.heartbeat = Heartbeat("raw-heartbeat")
        self.session = Session(
            self.near,
            is_client=is_client,
            client_key="foo",
            session_key=7,
            limits=limits,
            heartbeat=self.heartbeat,
            **kwargs,
        )
        self.thread = self.session.start()
        self._next_id = 100

    def send(self, message_type: int, conn_id: int, payload: bytes = b"") -> None:
        self._next_id += 1
        self.far.send(encode_message(self._next_id, conn_id, message_type, payload))

    def receive(self, timeout: float = TIMEOUT) -> Message:
        return decode_message(self.far.receive(timeout=timeout))

    def receive_type(self, message_type: int, timeout: float = TIMEOUT) -> Message:
        """The next message of ``message_type``, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message.type == message_type:
                return message

    def barrier(self) -> None:
        """Wait until the session handled everything sent so far (messages are
        handled in order, and DATA to an unknown id is answered)."""
        self.send(MessageType.DATA, 999_999, b"barrier")
        while True:
            message = self.receive()
            if message.type == MessageType.ERROR and message.conn_id == 999_999:
                return

    def nothing_pending(self) -> bool:
        try:
            self.far.receive(timeout=0.05)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.session.close("test over")
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


def dial_pair(pair: SessionPair, handler: AcceptingHandler, address: str = "127.0.0.1:80",
              ) -> Tuple[TunnelConnection, TunnelConnection]:
    """Server dials through the client; returns (server_conn, client_conn)."""
    server_conn = pair.server.dial("tcp", address, timeout=TIMEOUT)
    client_conn = handler.next()
    client_conn.settimeout(TIMEOUT)
    return server_conn, client_conn


class ResumeEvents(Observer):
    """Records what resumption did: each suspension's reason, each resume's
    re-sent bytes, each refused resume's reason."""

    def __init__(self) -> None:
        self.suspended: List[str] = []
        self.resumed: List[int] = []
        self.refused: List[str] = []

    def session_suspended(self, session: Session, reason: str) -> None:
        self.suspended.append(reason)

    def session_resumed(self, session: Session, resent_bytes: int) -> None:
        self.resumed.append(resent_bytes)

    def resume_refused(self, reason: str) -> None:
        self.refused.append(reason)
