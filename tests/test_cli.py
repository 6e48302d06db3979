"""The ``remotedialer`` command's pieces, in process: argument parsing, the
example server's routing and app factory, logging set-up, the bounded
werkzeug server and the dummy file server."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from remotedialer.cli import build_parser, main, setup_logging
from remotedialer.cli.demo import Check, human_size
from remotedialer.cli.dummy import BLOCK_SIZE, DummyServer, generated_bytes, generated_sha256
from remotedialer.cli.server import (
    BoundedThreadedWSGIServer,
    ServerApp,
    make_app,
    tunnel_id_authorizer,
    wire_peers,
)
from remotedialer.ha.peering import PeerSpec, parse_peers

from testkit.support import TIMEOUT, wait_for

# ------------------------------------------------------------------ parsing


def test_parse_peers() -> None:
    assert parse_peers("") == []
    assert parse_peers(None) == []
    assert parse_peers("a:t1:ws://h:8123/connect, b:t2:wss://[::1]:9/connect,") == [
        PeerSpec("a", "t1", "ws://h:8123/connect"),
        PeerSpec("b", "t2", "wss://[::1]:9/connect"),
    ]
    for bad in ("a:t1", "a::ws://x", ":t:ws://x"):
        with pytest.raises(ValueError):
            parse_peers(bad)


def test_defaults_are_the_go_examples() -> None:
    parser = build_parser()
    server = parser.parse_args(["server"])
    assert (server.listen, server.id, server.token, server.peers, server.debug) == (
        ("0.0.0.0", 8123), "", "", "", False,
    )
    assert server.timeout == 15.0
    client = parser.parse_args(["client"])
    assert (client.connect, client.id) == ("ws://localhost:8123/connect", "foo")
    dummy = parser.parse_args(["dummy"])
    assert (dummy.listen, dummy.directory) == (("0.0.0.0", 8125), ".")
    demo = parser.parse_args(["demo"])
    assert demo.size == 64


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--listen", "nowhere"])
    assert exited.value.code == 2
    assert "invalid listen address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


def test_server_help_carries_the_open_relay_warning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "WARNING: for testing and demos only" in text
    assert "open relay" in text and "listens on every interface" in text
    assert "--listen 127.0.0.1:8123" in text


@pytest.mark.parametrize("spec, reason", [
    ("9125=foo:udp:127.0.0.1:53", "cannot forward proto 'udp'"),
    ("9125=foo:tcp", "want LISTEN=CLIENT_KEY:PROTO:ADDRESS"),
])
def test_bad_forward_exits_2_before_starting(
    spec: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--listen", "127.0.0.1:0", "--forward", spec])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --forward" in err and reason in err


# ------------------------------------------------------ the example server


def _request(**kwargs: Any) -> Request:
    return Request(EnvironBuilder(**kwargs).get_environ())


def test_tunnel_id_authorizer() -> None:
    assert tunnel_id_authorizer(_request(headers={"X-Tunnel-ID": "foo"})) == ("foo", True)
    assert tunnel_id_authorizer(_request(headers={"x-tunnel-id": "bar"})) == ("bar", True)
    assert tunnel_id_authorizer(_request()) == ("", False)
    assert tunnel_id_authorizer(_request(headers={"X-Tunnel-ID": ""})) == ("", False)


def _call(app: Callable[..., Iterable[bytes]], path: str) -> str:
    statuses: List[str] = []
    body = b"".join(app(EnvironBuilder(path=path).get_environ(),
                        lambda status, headers: statuses.append(status)))
    return f"{statuses[0]} {body.decode()}"


def test_server_app_routes() -> None:
    def named(name: str) -> Callable[..., Iterable[bytes]]:
        def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            start_response("200 OK", [])
            return [name.encode()]
        return app

    class FakeForwarder:
        prefix = "/client"
        __call__ = staticmethod(named("forwarder"))

    app = ServerApp(named("connect"), FakeForwarder())  # type: ignore[arg-type]
    app.mount("/metrics", named("metrics"))
    assert _call(app, "/connect") == "200 OK connect"
    assert _call(app, "/client/foo/http/h:1/x") == "200 OK forwarder"
    assert _call(app, "/metrics") == "200 OK metrics"
    assert _call(app, "/metrics/more").startswith("404")
    assert _call(app, "/clientele").startswith("404")
    assert _call(app, "/").startswith("404")


def test_make_app_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTEDIALER_ID", "a")
    monkeypatch.setenv("REMOTEDIALER_TOKEN", "s3cret")
    monkeypatch.setenv("REMOTEDIALER_TIMEOUT", "7.5")
    monkeypatch.setenv("REMOTEDIALER_ALLOW_CLIENT_CONNECT", "true")
    monkeypatch.delenv("REMOTEDIALER_PEERS", raising=False)
    app = make_app()
    try:
        assert (app.server.peer_id, app.server.peer_token) == ("a", "s3cret")
        assert app.forwarder.default_timeout == 7.5
        assert app.server.client_connect_authorizer("tcp", "10.0.0.1:22") is True
    finally:
        app.close()
    explicit = make_app(peer_id="b", peer_token="t", timeout=3, allow_client_connect=False)
    try:
        assert (explicit.server.peer_id, explicit.server.peer_token) == ("b", "t")
        assert explicit.forwarder.default_timeout == 3
        assert explicit.server.client_connect_authorizer is None
    finally:
        explicit.close()


def test_make_app_rejects_malformed_peers() -> None:
    with pytest.raises(ValueError):
        make_app(peers="just-an-id")


def test_wire_peers_calls_add_peer() -> None:
    calls: List[Any] = []

    class WithPeering:
        def add_peer(self, url: str, peer_id: str, token: str) -> None:
            calls.append((url, peer_id, token))

    wire_peers(WithPeering(), parse_peers("b:t:ws://b:1/connect,c:t:ws://c:1/connect"))
    assert calls == [("ws://b:1/connect", "b", "t"), ("ws://c:1/connect", "c", "t")]


# ------------------------------------------------------------------ logging


@pytest.fixture
def clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    names = ["", "werkzeug", "remotedialer", "remotedialer.trace", "urllib3", "websocket",
             "simple_websocket", "gunicorn"]
    levels = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.getLogger().handlers)
    # setenv first: monkeypatch then removes the variable again afterwards,
    # even when the test's setup_logging(debug=True) set it (a bare delenv of
    # an absent variable restores nothing, and tracing leaked into later tests)
    monkeypatch.setenv("CATTLE_TUNNEL_DATA_DEBUG", "")
    monkeypatch.delenv("CATTLE_TUNNEL_DATA_DEBUG")
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_setup_logging_levels(clean_logging: None) -> None:
    setup_logging()
    assert logging.getLogger().level == logging.INFO
    assert not logging.getLogger("remotedialer.trace").isEnabledFor(logging.DEBUG)
    setup_logging(quiet=True)
    assert logging.getLogger().level == logging.ERROR
    assert logging.getLogger("werkzeug").level == logging.ERROR


def test_cattle_tunnel_data_debug_enables_only_the_trace(
    clean_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CATTLE_TUNNEL_DATA_DEBUG", "true")
    setup_logging()
    assert logging.getLogger("remotedialer.trace").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("remotedialer.session").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("remotedialer.session").isEnabledFor(logging.INFO)


def test_debug_turns_tracing_on(clean_logging: None) -> None:
    setup_logging(debug=True)
    assert os.environ["CATTLE_TUNNEL_DATA_DEBUG"] == "true"
    assert logging.getLogger("remotedialer.session").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("remotedialer.trace").isEnabledFor(logging.DEBUG)


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


# ------------------------------------------------------ the dummy server


@pytest.fixture
def dummy(tmp_path: Any) -> Iterator[DummyServer]:
    (tmp_path / "file.bin").write_bytes(os.urandom(300_000))
    (tmp_path / "sub").mkdir()
    server = DummyServer(("127.0.0.1", 0), str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dummy_conn(dummy: DummyServer) -> Iterator[http.client.HTTPConnection]:
    """A keep-alive HTTP connection to the dummy server."""
    conn = http.client.HTTPConnection("127.0.0.1", dummy.port, timeout=TIMEOUT)
    yield conn
    conn.close()


def _get(conn: http.client.HTTPConnection, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn.request(method, path)
    return conn.getresponse()


def _status(conn: http.client.HTTPConnection, path: str) -> int:
    """The status of ``GET path`` (the body is read, so the connection can go on)."""
    response = _get(conn, path)
    response.read()
    return response.status


def test_generated_bytes_are_deterministic() -> None:
    size = BLOCK_SIZE + 12345
    assert hashlib.sha256(generated_bytes(size)).hexdigest() == generated_sha256(size)
    assert generated_bytes(100, seed=1) != generated_bytes(100, seed=0)
    assert generated_sha256(0) == hashlib.sha256(b"").hexdigest()


def test_dummy_serves_files_generated_data_with_keep_alive(
    dummy_conn: http.client.HTTPConnection, tmp_path: Any
) -> None:
    conn = dummy_conn
    response = _get(conn, "/file.bin")
    assert response.status == 200
    assert response.read() == (tmp_path / "file.bin").read_bytes()
    sock = conn.sock
    size = 3 * BLOCK_SIZE + 5
    response = _get(conn, f"/bytes/{size}")
    assert response.getheader("Content-Length") == str(size)
    assert hashlib.sha256(response.read()).hexdigest() == generated_sha256(size)
    response = _get(conn, "/bytes/77?seed=3")
    assert response.read() == generated_bytes(77, seed=3)
    response = _get(conn, "/bytes/10", method="HEAD")
    assert (response.getheader("Content-Length"), response.read()) == ("10", b"")
    response = _get(conn, "/")
    listing = response.read()
    assert b"file.bin" in listing and b"sub/" in listing
    assert conn.sock is sock  # every request went over one kept-alive connection
    assert _status(conn, "/missing") == 404


def test_dummy_answers_a_small_file_in_one_write(dummy: DummyServer, tmp_path: Any) -> None:
    """Head and body of a small file leave together (one segment on loopback),
    a large file still arrives whole (sendfile after the buffered head)."""
    (tmp_path / "small.bin").write_bytes(os.urandom(1024))
    (tmp_path / "large.bin").write_bytes(os.urandom(300_000))
    with socket.create_connection(("127.0.0.1", dummy.port), timeout=TIMEOUT) as sock:
        for _ in range(5):  # a split answer would show in the first recv
            sock.sendall(b"GET /small.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == (tmp_path / "small.bin").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", dummy.port, timeout=TIMEOUT)
    try:
        assert _get(conn, "/large.bin").read() == (tmp_path / "large.bin").read_bytes()
        assert _get(conn, "/small.bin").read() == (tmp_path / "small.bin").read_bytes()
    finally:
        conn.close()


def test_dummy_drip_and_bad_parameters(dummy_conn: http.client.HTTPConnection) -> None:
    assert _get(dummy_conn, "/drip/1000?interval=0.01&chunks=4").read() == generated_bytes(1000)
    assert _status(dummy_conn, "/drip/10?chunks=0") == 400
    assert _status(dummy_conn, "/stall?seconds=-1") == 400


def test_dummy_stall_sends_the_head_at_once(dummy_conn: http.client.HTTPConnection) -> None:
    response = _get(dummy_conn, "/stall?seconds=0.2")
    assert response.status == 200
    assert response.read() == b"finally\n"


# ------------------------------------------------------------------- demo


def test_demo_helpers() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(64 * 1024 * 1024) == "64.0 MiB"
    assert Check("x", True, size=2 << 20, seconds=2.0).rate == 1 << 20
    assert Check("x", True, size=10, seconds=1.0).rate == 0.0


# ------------------------------------------ keep-alive of the built-in server


def _keepalive_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/chunked":  # no Content-Length: chunked on HTTP/1.1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ab", b"", b"cde"]
    if path == "/short":  # promises more than it sends: the connection must close
        start_response("200 OK", [("Content-Length", "10")])
        return [b"abc"]
    if path == "/fail":
        raise RuntimeError("failure under test")
    if path == "/body":  # reads the request body and answers with it
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return [data]
    if path == "/env":  # what the front end parsed
        names = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "HTTP_X_A", "HTTP_X_B")
        body = "|".join(str(environ.get(name)) for name in names).encode("latin-1")
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    body = f"{environ['REQUEST_METHOD']} {path}".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]  # never reads the request body


@pytest.fixture()
def keepalive_server() -> Iterator[BoundedThreadedWSGIServer]:
    server = BoundedThreadedWSGIServer("127.0.0.1", 0, _keepalive_app, max_threads=8, keepalive_timeout=60.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


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


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer to the server's close (or the
    first response, for a kept connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            assert line, f"closed after {head!r}"
            head += line
        length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        return head + (reader.read(int(length[0].split(b":")[1])) if length else b"")


def test_front_end_request_head_parsing(keepalive_server: BoundedThreadedWSGIServer) -> None:
    answer = _raw_exchange(
        keepalive_server.port,
        b"GET //en%76?x=1 HTTP/1.1\r\nHost: h\r\nX-A:  one two \r\nx-b:\xe9\r\nX-Empty:\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nServer: ")
    date = [line for line in head.split(b"\r\n") if line.startswith(b"Date: ")]
    assert len(date) == 1 and date[0].endswith(b" GMT")
    assert body.decode("latin-1") == "GET|/env|x=1|HTTP/1.1|one two|\u00e9"


@pytest.mark.parametrize("lines, status", [
    (b"Bad Name: 1\r\n", b"400"),
    (b"X-A: 1\r\n folded\r\n", b"400"),
    (b"no colon\r\n", b"400"),
    (b": empty name\r\n", b"400"),
    (b"X: y\r\n" * 101, b"431"),
    (b"X: " + b"y" * 70_000 + b"\r\n", b"431"),
])
def test_front_end_refuses_malformed_request_heads(keepalive_server: BoundedThreadedWSGIServer,
                                                   lines: bytes, status: bytes) -> None:
    answer = _raw_exchange(keepalive_server.port, b"GET /a HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status)


def test_front_end_other_request_lines(keepalive_server: BoundedThreadedWSGIServer) -> None:
    assert _raw_exchange(keepalive_server.port, b"GET /a B HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw_exchange(keepalive_server.port, b"GET /env HTTP/1.01\r\nHost: h\r\n\r\n").startswith(
        b"HTTP/1.1 400")
    assert _raw_exchange(keepalive_server.port, b"GET /env HTTP/1.2\r\nHost: h\r\n\r\n").startswith(
        b"HTTP/1.1 505")


def test_bench_subcommand_runs_the_benchmarks_command(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``remotedialer bench`` runs ``python -m benchmarks`` from a source
    checkout, in a child process: this process's ``sys.path`` is untouched."""
    path_before = list(sys.path)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["bench", "--help"]) == 0
    assert "python -m benchmarks" in capfd.readouterr().out
    monkeypatch.chdir(tmp_path)  # not a checkout
    assert main(["bench", "--help"]) == 2
    assert "source checkout" in caplog.text
    assert sys.path == path_before


# --------------------------------------- request smuggling at the front end
# Each request is followed on the same connection by a second one, GET
# /smuggled: a refused request must close the connection without answering
# it (bytes another parser could have read as part of the first request
# are never served as a request of their own).
_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


def _read_to_close(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)  # times out (failing the test) unless the server closes
            if not chunk:
                return data
            data += chunk


@pytest.mark.parametrize("head, status", [
    # Content-Length and Transfer-Encoding together (CL.TE and TE.CL desync)
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
     b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
     b"400"),
    # duplicate or malformed Content-Length
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: +2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 1_0\r\n\r\n0123456789", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 0x2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", b"400"),
    # transfer codings: chunked must be the only one, and not in HTTP/1.0
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", b"501"),
    (b"POST /body HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    # obs-fold, bare LF, bare CR, NUL, whitespace before the colon
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\r\n Content-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\nHost: h\r\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"GET /a HTTP/1.1\r\nHost: h\r\n\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\rContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\x00\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length : 2\r\n\r\nab", b"400"),
])
def test_front_end_refuses_ambiguous_framing(keepalive_server: BoundedThreadedWSGIServer, head: bytes,
                                             status: bytes) -> None:
    answer = _read_to_close(keepalive_server.port, head + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in answer


@pytest.mark.parametrize("chunks", [
    b"0x2\r\nab\r\n0\r\n\r\n",  # hex prefix (werkzeug's dechunker takes it)
    b"+2\r\nab\r\n0\r\n\r\n",
    b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    b"-1\r\n",
    b" 2\r\nab\r\n0\r\n\r\n",
    b"\r\nab\r\n0\r\n\r\n",  # no size
    b"2\nab\r\n0\r\n\r\n",  # bare LF after the size
    b"2\r\nabX\r\n0\r\n\r\n",  # no CRLF after the data
    b"2\r\nab\r0\r\n\r\n",  # bare CR after the data
    b"0\r\n" + b"T: x\r\n" * 101 + b"\r\n",  # endless trailer
])
def test_front_end_refuses_invalid_chunked_bodies(keepalive_server: BoundedThreadedWSGIServer,
                                                  chunks: bytes) -> None:
    request = b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    answer = _read_to_close(keepalive_server.port, request + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 500")
    assert answer.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in answer


def test_front_end_reads_valid_framing(keepalive_server: BoundedThreadedWSGIServer) -> None:
    """What is allowed: a chunked body with extensions and a trailer (the
    connection then closes), the same Content-Length twice (kept alive)."""
    chunked = (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
               b"2;name=value\r\nab\r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\n")
    answer = _read_to_close(keepalive_server.port, chunked + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nab0123456789")
    twice = b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"
    last = _SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer = _read_to_close(keepalive_server.port, twice + last)
    assert answer.count(b"HTTP/1.1 200") == 2 and b"\r\n\r\nab" in answer
    assert answer.endswith(b"GET /smuggled")
