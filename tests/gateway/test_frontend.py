"""The keep-alive front end (:mod:`remotedialer.gateway.frontend`): the
bounded threaded server, keep-alive, request head parsing (its framing
rules against smuggling: tests/gateway/test_http1.py)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, List

import pytest

from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from testkit.gateway import raw_exchange
from testkit.support import TIMEOUT, wait_for

# ------------------------------------------------- the bounded WSGI server


def test_bounded_server_runs_at_most_max_threads() -> None:
    release = threading.Event()
    lock = threading.Lock()
    running: List[int] = []
    started: List[int] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            running.append(1)
            started.append(1)
        release.wait(TIMEOUT)
        with lock:
            running.pop()
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = BoundedThreadedWSGIServer("127.0.0.1", 0, app, max_threads=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    socks = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        wait_for(lambda: len(started) == 2)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # the third waits for a free thread
            assert len(started) == 2
            time.sleep(0.01)
        release.set()
        wait_for(lambda: len(started) == 3)
        for sock in socks:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        release.set()
        for sock in socks:
            sock.close()
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)
    assert not thread.is_alive()


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
              headers: Any = None) -> http.client.HTTPResponse:
    conn.request(method, path, body=body or None, headers=headers or {})
    response = conn.getresponse()
    response.read()
    return response


def test_keepalive_serves_many_requests_on_one_connection(
    keepalive_server: BoundedThreadedWSGIServer,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", keepalive_server.port, timeout=TIMEOUT)
    try:
        first = _exchange(conn, "GET", "/a")
        sock = conn.sock
        assert first.getheader("Connection") is None and not first.will_close
        # An unread request body is drained, the connection kept.
        assert _exchange(conn, "POST", "/b", body=b"x" * 5000).status == 200
        conn.request("GET", "/chunked")
        chunked = conn.getresponse()
        assert chunked.getheader("Transfer-Encoding") == "chunked"
        assert chunked.read() == b"abcde"
        assert _exchange(conn, "HEAD", "/c").status == 200
        conn.request("GET", "/d")
        assert conn.getresponse().read() == b"GET /d"
        assert conn.sock is sock  # never reconnected
    finally:
        conn.close()


@pytest.mark.parametrize("path, headers", [
    ("/short", {}),  # body shorter than its Content-Length
    ("/a", {"Connection": "close"}),  # the client asks
    ("/fail", {}),  # the app failed: 500, then close
])
def test_keepalive_closes_when_it_must(keepalive_server: BoundedThreadedWSGIServer, path: str,
                                       headers: Dict[str, str]) -> None:
    with socket.create_connection(("127.0.0.1", keepalive_server.port), timeout=TIMEOUT) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(request.encode() + b"\r\n")
        data = b""
        while True:
            chunk = sock.recv(4096)  # times out (failing the test) unless the server closes
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 ")


def test_keepalive_http10_and_idle_timeout(keepalive_server: BoundedThreadedWSGIServer) -> None:
    keepalive_server.keepalive_timeout = 1.0
    with socket.create_connection(("127.0.0.1", keepalive_server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /a HTTP/1.0\r\n\r\n")
        assert sock.makefile("rb").read().endswith(b"GET /a")  # read to the close
    with socket.create_connection(("127.0.0.1", keepalive_server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert reader.read().endswith(b"GET /a")  # then closed after the 1 s idle timeout
        assert time.monotonic() - started > 0.5


def test_front_end_request_head_parsing(keepalive_server: BoundedThreadedWSGIServer) -> None:
    answer = raw_exchange(
        keepalive_server.port,
        b"GET //en%76?x=1 HTTP/1.1\r\nHost: h\r\nX-A:  one two \r\nx-b:\xe9\r\nX-Empty:\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nServer: ")
    date = [line for line in head.split(b"\r\n") if line.startswith(b"Date: ")]
    assert len(date) == 1 and date[0].endswith(b" GMT")
    assert body.decode("latin-1") == "GET|/env|x=1|HTTP/1.1|one two|\u00e9"


# -- the environ built from the header list is werkzeug's

_ENVIRON_CASES = [
    b"GET /client/foo/http/127.0.0.1:8125/1k.bin?x=1&timeout=3 HTTP/1.1\r\nHost: a:8123\r\n"
    b"User-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"GET /a%20b/%C3%A9t%C3%A9?q=%41%42 HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /\u00e9t\u00e9/raw?\u00e9=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    b"X-Dup: 1\r\nx-dup: 2\r\nX_Under: no\r\nConnection: keep-alive, Upgrade\r\n\r\nabc",
    b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET //double/slash HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://example.test:81/absolute?y=2 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /old HTTP/1.0\r\n\r\n",
]


class _EnvironServer:
    """What the handler reads of its server for ``make_environ``."""

    multithread = True
    multiprocess = False
    server_address = ("127.0.0.1", 8123)
    _server_version = "Werkzeug/test"
    ssl_context = None


@pytest.mark.parametrize("head", _ENVIRON_CASES)
def test_environ_from_the_header_list_is_werkzeugs(head: bytes) -> None:
    import io
    import socket

    from werkzeug.serving import WSGIRequestHandler

    from remotedialer.gateway.frontend import KeepAliveRequestHandler
    from remotedialer.transports.wsgi import NODELAY_SET

    ours, _theirs = socket.socketpair()
    with ours, _theirs:
        handler = KeepAliveRequestHandler.__new__(KeepAliveRequestHandler)
        handler.server = _EnvironServer()  # type: ignore[assignment]
        handler.client_address = ("127.0.0.1", 5555)
        handler.connection = handler.request = ours
        handler.rfile = io.BytesIO(head)
        handler.wfile = io.BytesIO()
        handler.raw_requestline = handler.rfile.readline(65537)
        assert handler.parse_request()
        built = handler.make_environ()
        expected = WSGIRequestHandler.make_environ(handler)  # from handler.headers, werkzeug's way
    assert built.pop(NODELAY_SET) is True  # socketserver's setup() sets TCP_NODELAY (ours only)
    for environ in (built, expected):
        environ.pop("wsgi.input")  # werkzeug wraps a chunked body here; run_wsgi replaces it anyway
    assert built == expected


def test_pipelined_requests_are_answered_from_the_read_buffer(
    keepalive_server: BoundedThreadedWSGIServer,
) -> None:
    # Three requests in one send: after the first, the next ones sit in the
    # handler's read buffer, not in the socket. The keep-alive wait must find
    # them there (a wait on the socket alone would last the keep-alive timeout).
    keepalive_server.keepalive_timeout = 60.0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", keepalive_server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3)))
        received = b""
        while received.count(b"GET /p") < 3:
            data = sock.recv(4096)
            assert data, received
            received += data
    assert [f"GET /p{i}".encode() in received for i in range(3)] == [True] * 3
    assert time.monotonic() - started < TIMEOUT


def test_probing_reader_never_blocks_while_probing() -> None:
    from remotedialer.gateway.frontend import _ProbingReader

    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = _ProbingReader(ours)  # on a blocking socket, as the front end's
        buffer = bytearray(16)
        reader.probing = True
        assert reader.readinto(buffer) is None  # nothing there: no wait
        assert ours.gettimeout() is None  # the socket's mode is untouched
        theirs.sendall(b"abc")
        wait_for(lambda: reader.readinto(buffer) == 3)
        reader.probing = False
        theirs.sendall(b"de")
        assert reader.readinto(buffer) == 2 and buffer[:2] == b"de"  # a plain read again
        reader.close()
        assert reader.closed


def test_a_tunnel_through_the_front_end_has_tcp_nodelay(caplog: pytest.LogCaptureFixture) -> None:
    """The front end sets TCP_NODELAY and says so in the environ; the
    tunnel's socket has it (set once, by the front end)."""
    import socket

    from testkit.front import ExampleServer, start_agent

    front = ExampleServer(caplog)
    agent = None
    try:
        agent = start_agent(front.port, "nodelay")
        sessions = front.app.server.sessions("nodelay")
        assert len(sessions) == 1
        sock = sessions[0].transport.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        if agent is not None:
            agent.stop()
        front.stop()
