"""The example server's HTTP front end against slow and hostile clients:
connections that send nothing, half a request line, half a head, or drip a
head byte by byte are closed once the header timeout runs out, their threads
end, and real requests are served meanwhile; a slow *answer* (or a tunnel)
is not cut."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List

import pytest

from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from testkit.support import TIMEOUT, wait_for

HEADER_TIMEOUT = 1.0


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/slow":
        time.sleep(HEADER_TIMEOUT * 2)  # longer than the head may take: must not be cut
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@pytest.fixture
def server() -> Iterator[BoundedThreadedWSGIServer]:
    httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, app, max_threads=2048, header_timeout=HEADER_TIMEOUT)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(TIMEOUT)


def get(port: int, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return answer
            answer += chunk


def request_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("Thread-"))


def test_silent_partial_and_dripping_heads_are_cut(server: BoundedThreadedWSGIServer) -> None:
    port = server.server_port
    baseline = request_threads()
    starts = [b"", b"GET /hal", b"GET / HTTP/1.1\r\nHost: x\r\n", b"GET / HTTP/1.1\r\nX-Long: aaaa"]
    socks: List[socket.socket] = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if starts[i % 4]:
            sock.sendall(starts[i % 4])
        socks.append(sock)
    dripping = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(20)]
    stop_dripping = threading.Event()

    def drip() -> None:  # one byte per connection every 0.2 s: a head that never ends
        for sock in dripping:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        while not stop_dripping.wait(0.2):
            for sock in dripping:
                try:
                    sock.sendall(b"a")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip)
    dripper.start()
    started = time.monotonic()
    try:
        wait_for(lambda: request_threads() >= baseline + 300)
        # a real request is served while they hold their threads
        assert get(port).endswith(b"\r\n\r\nok")
        for sock in socks + dripping:
            assert sock.recv(4096) == b""  # closed by the server (recv would time out otherwise)
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT
        # the threads end
        wait_for(lambda: request_threads() <= baseline + 2)
        assert server.head_deadlines is not None and server.head_deadlines.cut >= 320
    finally:
        stop_dripping.set()
        dripper.join(TIMEOUT)
        for sock in socks + dripping:
            sock.close()
    assert get(port).endswith(b"\r\n\r\nok")


def test_slow_answer_and_keepalive_are_not_cut(server: BoundedThreadedWSGIServer) -> None:
    assert get(server.server_port, "/slow").endswith(b"\r\n\r\nok")
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=TIMEOUT) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                answer += sock.recv(4096)
            time.sleep(HEADER_TIMEOUT * 1.5)  # idle between requests: the keep-alive timeout's business


def test_no_header_timeout_keeps_the_old_behaviour() -> None:
    httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, app, max_threads=8, header_timeout=None)
    try:
        assert httpd.head_deadlines is None
    finally:
        httpd.server_close()


def test_a_cut_head_is_not_answered_nor_logged(server: BoundedThreadedWSGIServer,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The partial head a cut connection leaves (a request line without its
    CRLF, a header line cut short) is not answered with a 400 to a socket
    that is gone, nor logged as an error."""
    for partial in (b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\nHost: x"):
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=TIMEOUT) as sock:
            sock.sendall(partial)
            assert sock.recv(4096) == b""
    assert server.head_deadlines is not None
    wait_for(lambda: server.head_deadlines is not None and server.head_deadlines.cut == 2)
    assert get(server.server_port).endswith(b"ok")  # its thread went on to serve nothing else
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING") or "400" in r.getMessage()]
