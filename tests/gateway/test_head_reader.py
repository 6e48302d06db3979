"""Tunnels' upgrades answered on the listener's thread
(:mod:`remotedialer.gateway.head_reader` under
:class:`~remotedialer.gateway.frontend.BoundedThreadedWSGIServer`): no
request thread per handshake, one thread per tunnel (its session's
reader), a late head cut without holding a thread, and everything else
served by request threads as before, with the bytes the listener read."""

from __future__ import annotations

import socket
import threading
from typing import Iterator, List, Optional, Tuple

import pytest
from werkzeug.wrappers import Request

from remotedialer.app import ServerApp
from remotedialer.client import Backoff, TunnelClient
from remotedialer.gateway.forwarder_app import Forwarder
from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from remotedialer.gateway.head_reader import parse_upgrade
from remotedialer.server import Server
from testkit.support import TIMEOUT, wait_for

LISTENER = "test-listener"
UPGRADE = (b"GET /connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


class Front:
    """The example server's app under the front end; the authorizer notes
    the thread each handshake ran on."""

    def __init__(self, max_threads: int = 32, header_timeout: Optional[float] = 10.0) -> None:
        self.auth_threads: List[str] = []
        self.server = Server(self._authorize)
        self.app = ServerApp(self.server, Forwarder(self.server.dial))
        self.httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, self.app, max_threads=max_threads,
                                               header_timeout=header_timeout, listener_handshakes=True)
        self.port = self.httpd.port
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=LISTENER, daemon=True)
        self.thread.start()

    def _authorize(self, request: Request) -> Tuple[str, bool]:
        self.auth_threads.append(threading.current_thread().name)
        key = request.headers.get("X-Tunnel-ID", "")
        return key, key != ""

    def agent(self, key: str) -> TunnelClient:
        agent = TunnelClient(f"ws://127.0.0.1:{self.port}/connect", {"X-Tunnel-ID": key},
                             lambda proto, address: True, backoff=Backoff(initial=0.05, maximum=0.2))
        agent.start()
        return agent

    def stop(self) -> None:
        self.httpd.shutdown()
        self.app.close()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def front() -> Iterator[Front]:
    front = Front()
    yield front
    front.stop()


def raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if data:
        sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_a_tunnel_is_accepted_on_the_listener_thread(front: Front) -> None:
    agent = front.agent("a1")
    try:
        agent.wait_connected(TIMEOUT)
        assert front.server.has_session("a1")  # registered before the client saw the 101
        assert front.auth_threads == [LISTENER]
        assert front.httpd.handshakes == 1
        session = front.server.sessions("a1")[0]
        assert session.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        names = [thread.name for thread in threading.enumerate()]
        assert names.count("remotedialer-tunnel") == 1  # the session's reader, nothing else per tunnel
        assert not [name for name in names if "process_request" in name]
    finally:
        agent.stop()
    wait_for(lambda: not front.server.has_session("a1"))
    wait_for(lambda: "remotedialer-tunnel" not in [t.name for t in threading.enumerate()])


def test_a_refusal_is_answered_on_the_listener_thread(front: Front) -> None:
    sock = raw(front.port, UPGRADE + b"\r\n")  # no X-Tunnel-ID
    with sock:
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nConnection: close\r\n" in answer and answer.endswith(b"failed authentication")
    assert front.auth_threads == [LISTENER]
    assert front.httpd.handshakes == 0


def test_other_requests_get_a_request_thread_with_the_bytes_read(front: Front) -> None:
    sock = raw(front.port, b"GET /nothing HTTP/1.1\r\nHo")
    with sock:
        sock.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.endswith(b"not found\n")
    # an upgrade with bytes after its head is served the WSGI way, on a request thread
    sock = raw(front.port, UPGRADE + b"X-Tunnel-ID: a2\r\n\r\n" + b"\x82\x80\x00\x00\x00\x00")
    with sock:
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert len(front.auth_threads) == 1 and front.auth_threads[0] != LISTENER
    assert front.httpd.handshakes == 0


def test_slow_heads_do_not_hold_back_other_handshakes() -> None:
    """More half-sent heads than the server has threads: an agent still gets
    its tunnel at once (on the request threads, each would hold one)."""
    front = Front(max_threads=4, header_timeout=60.0)
    slow = [raw(front.port, b"GET /connect HTTP/1.1\r\nUpgrade: webs") for _ in range(8)]
    agent = front.agent("a3")
    try:
        agent.wait_connected(TIMEOUT)
        assert front.server.has_session("a3")
        for sock in slow:  # still open: nothing cut them
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        agent.stop()
        for sock in slow:
            sock.close()
        front.stop()


def test_a_late_head_is_cut_without_a_thread() -> None:
    front = Front(header_timeout=0.3)
    try:
        before = threading.active_count()
        slow = raw(front.port, b"GET /connect HTTP/1.1\r\n")
        silent = raw(front.port, b"")
        with slow, silent:
            assert threading.active_count() == before
            assert read_all(slow) == b"" and read_all(silent) == b""  # closed, nothing answered
        assert front.httpd.heads_cut == 2
    finally:
        front.stop()


def test_shutdown_closes_the_heads_still_waiting() -> None:
    front = Front(header_timeout=None)
    sock = raw(front.port, b"GET /connect HTTP/1.1\r\n")
    with sock:
        wait_for(lambda: front.httpd._heads is not None and len(front.httpd._heads) == 1)
        front.stop()
        assert read_all(sock) == b""


@pytest.mark.parametrize("head", [
    UPGRADE + b"\r\n",
    UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: WebSocket, h2c") + b"\r\n",
    UPGRADE + b"Content-Length: 0\r\n\r\n",
])
def test_parse_upgrade_takes_bodyless_websocket_gets(head: bytes) -> None:
    parsed = parse_upgrade(head)
    assert parsed is not None
    path, version, fields = parsed
    assert (path, version) == ("/connect", "HTTP/1.1") and ("Host", "x") in fields


@pytest.mark.parametrize("head", [
    UPGRADE.replace(b"GET", b"POST") + b"\r\n",
    UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n",
    UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: websockets") + b"\r\n",
    UPGRADE.replace(b"Upgrade: websocket\r\n", b"") + b"\r\n",
    UPGRADE.replace(b"GET /connect", b"GET http://x/connect") + b"\r\n",
    UPGRADE.replace(b"GET /connect", b"GET //connect") + b"\r\n",
    UPGRADE + b"Content-Length: 5\r\n\r\n",
    UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n",
    UPGRADE + b"Bad Header: x\r\n\r\n",
    UPGRADE + b"X: a\nY: b\r\n\r\n",
    UPGRADE.replace(b"\r\n", b"\n", 1) + b"\r\n",
])
def test_parse_upgrade_leaves_everything_else_to_request_threads(head: bytes) -> None:
    assert parse_upgrade(head) is None
