"""The HTTP forwarder (:mod:`remotedialer.gateway.forwarder_app`): path
parsing, header handling, and requests through a real tunnel (werkzeug
server + Server + TunnelClient in this process), the connection pool in use."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List

import pytest
import requests
import trustme
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from remotedialer.app import make_app
from remotedialer.examples.agent import make_client
from remotedialer.examples.file_server import DummyServer, generated_bytes, generated_sha256
from remotedialer.gateway.forwarder_app import (
    BadRequest,
    Forwarder,
    _request_headers,
    _response_headers,
    _split_query,
    parse_target,
)
from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from remotedialer.gateway.http1 import parse_response_head
from testkit.support import TIMEOUT, wait_for

# --------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "path, key, scheme, host, address, rest",
    [
        ("/client/foo/http/127.0.0.1:8125/a/b.txt", "foo", "http", "127.0.0.1:8125", "127.0.0.1:8125",
         "/a/b.txt"),
        ("/client/foo/http/example.com", "foo", "http", "example.com", "example.com:80", "/"),
        ("/client/foo/https/example.com/", "foo", "https", "example.com", "example.com:443", "/"),
        ("/client/foo/HTTP/[::1]:9/x", "foo", "http", "[::1]:9", "[::1]:9", "/x"),
        ("/client/foo/https/[::1]/x", "foo", "https", "[::1]", "[::1]:443", "/x"),
        ("/client/a%2Fb/http/h:1/%20sp%41ce", "a/b", "http", "h:1", "h:1", "/%20sp%41ce"),
    ],
)
def test_parse_target(path: str, key: str, scheme: str, host: str, address: str, rest: str) -> None:
    target = parse_target(path)
    assert (target.client_key, target.scheme, target.host, target.address, target.path) == (
        key, scheme, host, address, rest,
    )


@pytest.mark.parametrize(
    "path",
    [
        "/other/foo/http/h:1/",
        "/client/foo",
        "/client/foo/http",
        "/client//http/h:1/",
        "/client/foo/ftp/h:1/",
        "/client/foo/http/h:99999/",
        "/client/foo/http/h:x/",
        "/client/foo/http/[::1/",
    ],
)
def test_parse_target_rejects(path: str) -> None:
    with pytest.raises(BadRequest):
        parse_target(path)


def test_split_query_takes_out_timeout_only() -> None:
    assert _split_query("") == (None, "")
    assert _split_query("timeout=3") == ("3", "")
    assert _split_query("a=1&timeout=2.5&b=%20x&c") == ("2.5", "a=1&b=%20x&c")
    assert _split_query("timeouts=1") == (None, "timeouts=1")


def test_request_headers_drop_hop_by_hop_and_set_host() -> None:
    environ = {
        "HTTP_HOST": "proxy:8123",
        "HTTP_CONNECTION": "keep-alive, X-Secret",
        "HTTP_X_SECRET": "hop",
        "HTTP_KEEP_ALIVE": "timeout=5",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "HTTP_ACCEPT": "*/*",
        "HTTP_EXPECT": "100-continue",
        "HTTP_X_CUSTOM_THING": "yes",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "3",
    }
    headers = _request_headers(environ, "target:80")
    assert headers == {
        "Host": "target:80",
        "Accept": "*/*",
        "X-Custom-Thing": "yes",
        "Content-Type": "text/plain",
        "Content-Length": "3",
    }


def test_response_headers_drop_hop_by_hop() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Transfer-Encoding: chunked\r\nDate: today\r\nServer: far\r\nX-Kept: 2\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2"
    )
    head = parse_response_head(raw)
    assert _response_headers(head.headers) == [("X-Kept", "2"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_unknown_dial_error_is_500_with_text() -> None:
    def dial(client_key: str, proto: str, address: str, timeout: Any) -> Any:
        raise ConnectionRefusedError(f"no way to {client_key} {proto}/{address}")

    forwarder = Forwarder(dial)
    statuses: List[str] = []
    body = b"".join(forwarder(
        {"PATH_INFO": "/client/k/http/h:1/", "REQUEST_METHOD": "GET", "QUERY_STRING": ""},
        lambda status, headers: statuses.append(status),
    ))
    assert statuses == ["500 Internal Server Error"]
    assert body == b"no way to k tcp/h:1"


def test_bad_timeout_is_400() -> None:
    forwarder = Forwarder(lambda *args: pytest.fail("must not dial"))
    statuses: List[str] = []
    forwarder(
        {"PATH_INFO": "/client/k/http/h:1/", "REQUEST_METHOD": "GET", "QUERY_STRING": "timeout=soon"},
        lambda status, headers: statuses.append(status),
    )
    assert statuses == ["400 Bad Request"]


# ------------------------------------------------------ through a real tunnel


class TargetApp:
    """The far side's HTTP service: echo, slow head, gated and chunked bodies."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        if request.path == "/echo":
            body = request.get_data()
            data = {
                "method": request.method,
                "path": environ.get("RAW_URI") or environ.get("REQUEST_URI"),
                "headers": dict(request.headers),
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
            response = Response(json.dumps(data), content_type="application/json",
                                headers={"X-Echo": "yes"})
            return response(environ, start_response)
        if request.path == "/slow-head":
            time.sleep(float(request.args["seconds"]))  # the slowness under test
            return Response("late")(environ, start_response)
        if request.path == "/gate":
            def gated() -> Iterator[bytes]:
                yield b"first part;"
                if not self.gate.wait(TIMEOUT):
                    return
                yield b"second part"

            return Response(gated(), headers={"Content-Length": "22"})(environ, start_response)
        if request.path == "/chunked-stall":
            def stalling() -> Iterator[bytes]:
                yield b"start;"
                self.gate.wait(float(request.args["seconds"]))
                yield b"end"

            return Response(stalling())(environ, start_response)
        if request.path == "/chunked":
            def pieces() -> Iterator[bytes]:
                for i in range(100):
                    yield b"%05d" % i

            return Response(pieces())(environ, start_response)
        return Response("nope", status=404)(environ, start_response)


class Stack:
    """File server, target app, tunnel server (werkzeug) and a client "foo"."""

    def __init__(self) -> None:
        self.dummy = DummyServer(("127.0.0.1", 0))
        self.dummy.start()
        self.target_app = TargetApp()
        self.target = make_server("127.0.0.1", 0, self.target_app, threaded=True)
        threading.Thread(target=self.target.serve_forever, daemon=True).start()
        self.app = make_app(peers="", timeout=5.0)
        self.httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, self.app, max_threads=32)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.client = make_client(f"ws://127.0.0.1:{self.httpd.port}/connect", "foo")
        self.client.start()
        self.client.wait_connected(TIMEOUT)
        wait_for(lambda: self.app.server.has_session("foo"))
        self.http = requests.Session()
        self.http.trust_env = False

    def url(self, port: int, path: str, client: str = "foo", scheme: str = "http") -> str:
        return f"http://127.0.0.1:{self.httpd.port}/client/{client}/{scheme}/127.0.0.1:{port}{path}"

    def close(self) -> None:
        self.http.close()
        self.client.stop()
        self.httpd.shutdown()
        self.app.close()
        self.httpd.server_close()
        self.target.shutdown()
        self.target.server_close()
        self.dummy.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    built = Stack()
    yield built
    built.close()


@pytest.mark.parametrize("size", [0, 1, 100_000, 5 * 1024 * 1024 + 7])
def test_download_is_byte_exact(stack: Stack, size: int) -> None:
    response = stack.http.get(stack.url(stack.dummy.port, f"/bytes/{size}"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(size)
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert hashlib.sha256(response.content).hexdigest() == generated_sha256(size)


def test_request_method_headers_query_and_body_are_forwarded(stack: Stack) -> None:
    body = bytes(range(256)) * 1000
    response = stack.http.post(
        stack.url(stack.target.port, "/echo") + "?a=1&timeout=5&b=%2F",
        data=body, headers={"X-Custom": "v", "Content-Type": "application/x-test"}, timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.headers["X-Echo"] == "yes"
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo?a=1&b=%2F"
    assert echoed["headers"]["X-Custom"] == "v"
    assert echoed["headers"]["Content-Type"] == "application/x-test"
    assert echoed["headers"]["Host"] == f"127.0.0.1:{stack.target.port}"
    assert (echoed["length"], echoed["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_chunked_request_body_is_forwarded(stack: Stack) -> None:
    parts = [b"x" * 70000, b"y" * 3, b"z" * 100000]
    response = stack.http.put(stack.url(stack.target.port, "/echo"), data=iter(parts), timeout=TIMEOUT)
    echoed = response.json()
    whole = b"".join(parts)
    assert echoed["method"] == "PUT"
    assert (echoed["length"], echoed["sha256"]) == (len(whole), hashlib.sha256(whole).hexdigest())


def test_chunked_response_is_streamed_back(stack: Stack) -> None:
    response = stack.http.get(stack.url(stack.target.port, "/chunked"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.content == b"".join(b"%05d" % i for i in range(100))


def test_head_request(stack: Stack) -> None:
    response = stack.http.head(stack.url(stack.dummy.port, "/bytes/12345"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == "12345"
    assert response.content == b""


def test_upstream_status_is_kept(stack: Stack) -> None:
    response = stack.http.get(stack.url(stack.target.port, "/missing"), timeout=TIMEOUT)
    assert (response.status_code, response.text) == (404, "nope")


def test_response_is_streamed_not_buffered(stack: Stack) -> None:
    """The first part arrives while the target still holds back the rest."""
    stack.target_app.gate.clear()
    with stack.http.get(stack.url(stack.target.port, "/gate"), stream=True, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        first = response.raw.read(11)
        assert first == b"first part;"
        stack.target_app.gate.set()
        assert response.raw.read() == b"second part"


def test_unknown_client_is_500(stack: Stack) -> None:
    response = stack.http.get(stack.url(stack.dummy.port, "/bytes/1", client="nobody"), timeout=TIMEOUT)
    assert response.status_code == 500
    assert "nobody" in response.text


def test_refused_target_is_500(stack: Stack) -> None:
    refused = DummyServer(("127.0.0.1", 0))
    port = refused.port
    refused.server_close()  # nothing listens there any more
    response = stack.http.get(stack.url(port, "/"), timeout=TIMEOUT)
    assert response.status_code == 500
    assert "refused" in response.text.lower()


def test_timeout_before_head_is_500(stack: Stack) -> None:
    response = stack.http.get(stack.url(stack.target.port, "/slow-head?seconds=2&timeout=0.3"),
                              timeout=TIMEOUT)
    assert response.status_code == 500
    assert "timeout" in response.text


def test_idle_timeout_lets_a_flowing_download_finish(stack: Stack) -> None:
    """1.2 s of download, never idle for 0.6 s: completes although it takes
    longer than the timeout."""
    started = time.monotonic()
    response = stack.http.get(
        stack.url(stack.dummy.port, "/drip/5000?interval=0.15&chunks=9&timeout=0.6"), timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == generated_sha256(5000)
    assert time.monotonic() - started > 0.6


def test_idle_timeout_cuts_a_stalled_body(stack: Stack) -> None:
    """The head arrives, then nothing for longer than the timeout: the
    downstream response is aborted, never completed short."""
    with pytest.raises(requests.exceptions.RequestException):
        response = stack.http.get(stack.url(stack.dummy.port, "/stall?seconds=5&timeout=0.3"),
                                  timeout=TIMEOUT)
        response.raise_for_status()


def test_idle_timeout_aborts_a_chunked_body_rather_than_ending_it(stack: Stack) -> None:
    """Without Content-Length a clean end would look complete: the forwarder
    must drop the downstream connection instead."""
    stack.target_app.gate.clear()
    with stack.http.get(stack.url(stack.target.port, "/chunked-stall?seconds=3&timeout=0.3"),
                        stream=True, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert "Content-Length" not in response.headers
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            _ = response.content


def test_bad_path_is_400(stack: Stack) -> None:
    response = stack.http.get(f"http://127.0.0.1:{stack.httpd.port}/client/foo/gopher/h:1/",
                              timeout=TIMEOUT)
    assert response.status_code == 400


def test_concurrent_downloads(stack: Stack) -> None:
    sizes = [3 * 1024 * 1024 + i for i in range(6)]
    results: Dict[int, str] = {}

    def fetch(size: int) -> None:
        with requests.Session() as http:
            http.trust_env = False
            response = http.get(stack.url(stack.dummy.port, f"/bytes/{size}"), timeout=TIMEOUT)
            results[size] = hashlib.sha256(response.content).hexdigest()

    threads = [threading.Thread(target=fetch, args=(size,)) for size in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert results == {size: generated_sha256(size) for size in sizes}


def test_https_target(stack: Stack, tmp_path: Any) -> None:
    """TLS to the target runs over the tunnel (ssl over a bridged socket pair)."""
    import ssl

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    tls_target = make_server("127.0.0.1", 0, stack.target_app, threaded=True, ssl_context=server_context)
    threading.Thread(target=tls_target.serve_forever, daemon=True).start()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    forwarder = Forwarder(stack.app.server.dial, ssl_context=client_context)
    front = make_server("127.0.0.1", 0, forwarder, threaded=True)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{front.port}/client/foo/https/127.0.0.1:{tls_target.port}/echo"
        response = stack.http.post(url, data=b"secret", timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json()["sha256"] == hashlib.sha256(b"secret").hexdigest()
        # Without trusting the CA the certificate is refused: 500 before any head.
        plain = Forwarder(stack.app.server.dial)
        statuses: List[str] = []
        body = b"".join(plain(
            {"PATH_INFO": f"/client/foo/https/127.0.0.1:{tls_target.port}/echo",
             "REQUEST_METHOD": "GET", "QUERY_STRING": ""},
            lambda status, headers: statuses.append(status),
        ))
        assert statuses == ["500 Internal Server Error"]
        assert b"CERTIFICATE_VERIFY_FAILED" in body
    finally:
        front.shutdown()
        tls_target.shutdown()


# ------------------------------------------------ keep-alive connection pool


class CountingDial:
    """``Server.dial`` that counts the dials and keeps what it returned."""

    def __init__(self, dial: Callable[..., Any]) -> None:
        self.dial = dial
        self.connections: List[Any] = []

    def __call__(self, *args: Any) -> Any:
        conn = self.dial(*args)
        self.connections.append(conn)
        return conn


class Front:
    """A Forwarder with a counting dial behind its own keep-alive front end."""

    def __init__(self, stack: Stack) -> None:
        self.dial = CountingDial(stack.app.server.dial)
        self.forwarder = Forwarder(self.dial, default_timeout=5.0)
        self.httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, self.forwarder, max_threads=16)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.http = requests.Session()
        self.http.trust_env = False

    def url(self, port: int, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.port}/client/foo/http/127.0.0.1:{port}{path}"

    def close(self) -> None:
        self.http.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.forwarder.close()


@pytest.fixture()
def front(stack: Stack) -> Iterator[Front]:
    built = Front(stack)
    yield built
    built.close()


def test_sequential_requests_reuse_one_tunneled_connection(stack: Stack, front: Front) -> None:
    for size in (1024, 0, 70_000):
        response = front.http.get(front.url(stack.dummy.port, f"/bytes/{size}"), timeout=TIMEOUT)
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == generated_sha256(size)
    response = front.http.head(front.url(stack.dummy.port, "/bytes/5"), timeout=TIMEOUT)
    assert response.headers["Content-Length"] == "5"
    assert len(front.dial.connections) == 1
    wait_for(lambda: len(front.forwarder.pool) == 1)  # put back once the front end closed the body


def test_targets_get_their_own_connections_and_close_is_honoured(stack: Stack, front: Front) -> None:
    """The file server keeps its connection alive: one dial for both of its
    requests. werkzeug's dev server (the target app) answers
    ``Connection: close``: its connections are never pooled."""
    for _ in range(2):
        assert front.http.get(front.url(stack.dummy.port, "/bytes/10"), timeout=TIMEOUT).status_code == 200
        assert front.http.get(front.url(stack.target.port, "/echo"), timeout=TIMEOUT).status_code == 200
    addresses = [conn.address for conn in front.dial.connections]
    assert addresses.count(f"127.0.0.1:{stack.dummy.port}") == 1
    assert addresses.count(f"127.0.0.1:{stack.target.port}") == 2
    wait_for(lambda: len(front.forwarder.pool) == 1)  # put back once the front end closed the body


def test_an_aborted_body_never_returns_to_the_pool(stack: Stack, front: Front) -> None:
    with pytest.raises(requests.exceptions.RequestException):
        front.http.get(front.url(stack.dummy.port, "/stall?seconds=5&timeout=0.3"),
                       timeout=TIMEOUT).raise_for_status()
    assert len(front.forwarder.pool) == 0
    wait_for(lambda: front.dial.connections[0].closed)
    response = front.http.get(front.url(stack.dummy.port, "/bytes/3"), timeout=TIMEOUT)
    assert response.content == generated_bytes(3)
    assert len(front.dial.connections) == 2


def test_a_pooled_connection_that_ended_is_not_reused(stack: Stack, front: Front) -> None:
    assert front.http.get(front.url(stack.dummy.port, "/bytes/10"), timeout=TIMEOUT).status_code == 200
    first = front.dial.connections[0]
    first.abort(ConnectionResetError("cut under test"))  # as if the far side went away
    response = front.http.get(front.url(stack.dummy.port, "/bytes/10"), timeout=TIMEOUT)
    assert response.content == generated_bytes(10)
    assert len(front.dial.connections) == 2


class OneRequestPerConnection:
    """A raw HTTP target that answers the first request of each connection
    (keep-alive, as far as the client can tell) and drops the connection at
    the second one without answering: the race of a target closing an idle
    connection just as a request is sent on it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    @staticmethod
    def _handle(sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        with sock, sock.makefile("rb") as reader:
            for answered in range(2):
                line = reader.readline()
                while line not in (b"\r\n", b""):
                    line = reader.readline()
                if not line or answered:
                    return  # the second request: close without a word
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.listener.close()


def test_replayable_request_is_retried_once_on_a_fresh_connection(stack: Stack, front: Front) -> None:
    target = OneRequestPerConnection()
    try:
        url = front.url(target.port, "/")
        assert front.http.get(url, timeout=TIMEOUT).text == "ok"
        wait_for(lambda: len(front.forwarder.pool) == 1)  # put back once the front end closed the body
        assert front.http.get(url, timeout=TIMEOUT).text == "ok"  # pooled one dropped: retried
        assert len(front.dial.connections) == 2
        # A POST is never sent twice: the failure is the answer.
        response = front.http.post(url, data=b"", timeout=TIMEOUT)
        assert response.status_code == 500
        assert len(front.dial.connections) == 2
    finally:
        target.close()


def test_pooled_connections_are_closed_when_the_session_ends() -> None:
    dummy = DummyServer(("127.0.0.1", 0))
    dummy.start()
    app = make_app(peers="", timeout=5.0)
    httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, app, max_threads=16)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = make_client(f"ws://127.0.0.1:{httpd.port}/connect", "bar")
    client.start()
    try:
        client.wait_connected(TIMEOUT)
        wait_for(lambda: app.server.has_session("bar"))
        url = f"http://127.0.0.1:{httpd.port}/client/bar/http/127.0.0.1:{dummy.port}/bytes/100"
        with requests.Session() as http:
            http.trust_env = False
            assert http.get(url, timeout=TIMEOUT).content == generated_bytes(100)
        wait_for(lambda: len(app.forwarder.pool) == 1)
        client.stop()
        wait_for(lambda: len(app.forwarder.pool) == 0)
    finally:
        client.stop()
        httpd.shutdown()
        app.close()
        httpd.server_close()
        dummy.stop()
