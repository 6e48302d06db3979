"""End to end: the example server under a real gunicorn process with our
worker class (``-k remotedialer.workers.RemotedialerWorker``), a real tunnel
client and a real HTTP target on loopback."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import threading
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from remotedialer.client import Backoff, TunnelClient

from testkit import gunicorn as testkit_gunicorn
from testkit.support import TIMEOUT, wait_for

WORKER = "remotedialer.workers.RemotedialerWorker"


class _Target(BaseHTTPRequestHandler):
    """Answers every GET with its path (the HTTP server behind the tunnel)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = f"target saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class Gunicorn(testkit_gunicorn.Gunicorn):
    """``gunicorn -k RemotedialerWorker 'remotedialer.cli.server:make_app()'``
    (one worker, no ``--threads``: the worker's bound is then
    ``--worker-connections``), once its worker booted."""

    def __init__(self, *extra_args: str) -> None:
        super().__init__(*extra_args, app=testkit_gunicorn.EXAMPLE_APP, worker=WORKER, threads=1)
        wait_for(lambda: self.count("Booting worker") >= 1, TIMEOUT * 3)

    def log(self) -> str:
        return self.log_text()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)

    def stop(self) -> int:  # type: ignore[override]
        """Stop gunicorn (SIGTERM); its exit status."""
        super().stop()
        return int(self.process.returncode)


def _client(server: Gunicorn, target: str) -> TunnelClient:
    """A tunnel client ``foo`` of ``server``, once the server routes to it."""
    client = TunnelClient(server.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
                          backoff=Backoff(initial=0.05, maximum=0.2))
    client.start()
    client.wait_connected(TIMEOUT)
    wait_for(lambda: _answers(server, f"/client/foo/http/{target}/ready"))
    return client


def _get(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
    conn.request("GET", path)
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    return response


@pytest.fixture
def gunicorn() -> Iterator[Gunicorn]:
    server = Gunicorn("--graceful-timeout", "30")
    yield server
    server.stop()
    assert not server.errors(), server.log()


def test_requests_through_a_tunnel_on_one_kept_alive_connection(gunicorn: Gunicorn, target: str) -> None:
    client = _client(gunicorn, target)
    try:
        conn = gunicorn.connection()
        local_ports = set()
        for number in range(5):
            response = _get(conn, f"/client/foo/http/{target}/file{number}?x=1")
            assert response.status == 200, response.body  # type: ignore[attr-defined]
            assert response.body == f"target saw /file{number}?x=1".encode()  # type: ignore[attr-defined]
            assert response.getheader("Connection") != "close"
            assert conn.sock is not None
            local_ports.add(conn.sock.getsockname()[1])
        assert len(local_ports) == 1  # all five on one connection: kept alive
        conn.close()
    finally:
        client.stop(TIMEOUT)


def test_pipelined_requests_answered_in_order(gunicorn: Gunicorn, target: str) -> None:
    client = _client(gunicorn, target)
    try:
        with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"".join(f"GET /client/foo/http/{target}/p{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                                  for n in range(3)))
            received = b""
            while received.count(b"target saw") < 3:
                data = sock.recv(65536)
                assert data, received
                received += data
        assert [int(n) for n in re.findall(rb"target saw /p(\d)", received)] == [0, 1, 2]
    finally:
        client.stop(TIMEOUT)


def test_sigterm_drains_with_a_tunnel_open(target: str) -> None:
    """SIGTERM to the arbiter: the app's graceful shutdown closes the open
    tunnel, the worker exits well before its 60 s graceful timeout would cut
    it, and gunicorn exits 0."""
    server = Gunicorn("--graceful-timeout", "60")
    client = _client(server, target)
    try:
        with closing(server.connection()) as conn:
            assert _get(conn, f"/client/foo/http/{target}/before").status == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(TIMEOUT * 3) == 0  # far below the graceful timeout
        assert server.count("received SIGTERM: shutting down gracefully") == 1, server.log()
        assert server.count("graceful timeout") == 0, server.log()
        assert not server.errors(), server.log()
    finally:
        client.stop(TIMEOUT)
        server.stop()


def test_max_requests_recycles_the_worker(target: str) -> None:
    """--max-requests: the worker stops as on SIGTERM (the app's drain
    closes the tunnel), the arbiter boots another, the client reconnects."""
    server = Gunicorn("--max-requests", "20", "--graceful-timeout", "60")
    client = _client(server, target)  # its readiness checks count too
    first_session = client.session
    try:
        for number in range(40):  # the tunnel's own request counts only when it ends
            if server.count("Autorestarting worker after current request."):
                break
            _answers(server, f"/client/foo/http/{target}/n{number}")  # 200, or 5xx once it drains
        wait_for(lambda: server.count("Autorestarting worker after current request.") == 1, TIMEOUT * 3)
        # well within the 60 s graceful timeout: the drain closed the tunnel
        wait_for(lambda: server.count("Booting worker") >= 2, TIMEOUT * 2)
        assert server.count("graceful timeout") == 0, server.log()
        # the client reconnects (to the new worker); a few requests only, so
        # that the new worker does not reach its own --max-requests meanwhile
        wait_for(lambda: client.session not in (None, first_session), TIMEOUT * 3)
        wait_for(lambda: _answers(server, f"/client/foo/http/{target}/after"), TIMEOUT * 3, interval=0.5)
    finally:
        client.stop(TIMEOUT)
        assert server.stop() == 0
    assert not server.errors(), server.log()


def _answers(server: Gunicorn, path: str) -> bool:
    try:
        with closing(server.connection()) as conn:
            return _get(conn, path).status == 200
    except OSError:
        return False


def test_hooks_fire(tmp_path: Path, target: str) -> None:
    marks = tmp_path / "marks"
    config = tmp_path / "gunicorn_conf.py"
    config.write_text(
        "import os\n"
        f"MARKS = {str(marks)!r}\n"
        "def _mark(text):\n"
        "    with open(MARKS, 'a') as handle:\n"
        "        handle.write(text + '\\n')\n"
        "def post_worker_init(worker):\n"
        "    _mark('post_worker_init %d' % os.getpid())\n"
        "def pre_request(worker, req):\n"
        "    _mark('pre_request %s %s' % (req.method, req.path))\n"
        "def post_request(worker, req, environ, resp):\n"
        "    _mark('post_request %s %s' % (req.path, resp.status))\n"
    )
    access_log = tmp_path / "access.log"
    server = Gunicorn("-c", str(config), "--access-logfile", str(access_log))
    client = _client(server, target)
    try:
        with closing(server.connection()) as conn:
            assert _get(conn, f"/client/foo/http/{target}/hooked").status == 200
        wait_for(lambda: f"post_request /client/foo/http/{target}/hooked 200 OK" in marks.read_text())
        text = marks.read_text()
        assert f"post_worker_init {_worker_pid(server)}" in text
        assert f"pre_request GET /client/foo/http/{target}/hooked" in text
        wait_for(lambda: access_log.exists() and "/hooked" in access_log.read_text())
        assert '"GET /client/foo/http/' in access_log.read_text()
    finally:
        client.stop(TIMEOUT)
        assert server.stop() == 0
    assert not server.errors(), server.log()


def _worker_pid(server: Gunicorn) -> int:
    match = re.search(r"Booting worker with pid: (\d+)", server.log())
    assert match, server.log()
    return int(match.group(1))


def test_threads_are_bounded(target: str) -> None:
    """--threads 2: a tunnel holds one thread; idle keep-alive connections
    give theirs up to newcomers, so requests on new connections still pass."""
    server = Gunicorn("--threads", "2", "--keep-alive", "30")
    client = _client(server, target)
    try:
        idle = server.connection()
        assert _get(idle, f"/client/foo/http/{target}/first").status == 200
        for number in range(3):  # each waits for the idle one to let go
            with closing(server.connection()) as conn:
                assert _get(conn, f"/client/foo/http/{target}/next{number}").status == 200
        idle.close()
        assert "serving at most 2 connections at once" in server.log()
    finally:
        client.stop(TIMEOUT)
        assert server.stop() == 0
    assert not server.errors(), server.log()


def test_no_worker_timeout_while_idle() -> None:
    """The accept loop notifies the arbiter: an idle worker is not killed
    by a short --timeout."""
    server = Gunicorn("--timeout", "4")  # the loop notifies at least once a second
    try:
        done = threading.Event()
        done.wait(9)  # idle for twice the timeout (the thing under test is time)
        assert server.count("WORKER TIMEOUT") == 0, server.log()
        assert server.count("Booting worker") == 1, server.log()
    finally:
        assert server.stop() == 0


def test_tls(tmp_path: Path, target: str) -> None:
    """--certfile: each connection thread does the handshake; a tunnel over
    wss and requests over https pass, a plain-text client is dropped."""
    import ssl

    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    server = Gunicorn("--certfile", str(pem), "--keyfile", str(pem))
    client = TunnelClient(server.url, {"X-Tunnel-ID": "foo"},
                          lambda proto, address: True, ssl_context=context)
    try:
        client.start()
        client.wait_connected(TIMEOUT)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = plain.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"HTTP/")
        secure = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=TIMEOUT, context=context)
        wait_for(lambda: _get(secure, f"/client/foo/http/{target}/ready").status == 200)
        response = _get(secure, f"/client/foo/http/{target}/secret")
        assert response.body == b"target saw /secret"  # type: ignore[attr-defined]
        secure.close()
    finally:
        client.stop(TIMEOUT)
        assert server.stop() == 0
    assert not server.errors(), server.log()
