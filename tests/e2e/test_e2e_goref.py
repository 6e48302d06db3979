"""Interop with the Go reference (rancher/remotedialer's example programs):
the Python client behind the Go server, the Go client behind the Python
server. Files go through each server's ``/client/<id>/http/<target>/<path>``
route and are compared byte for byte. Skipped, saying how to build them,
when the Go programs are not built.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from typing import Dict, Iterator, List

import pytest
import requests

from testkit.support import TIMEOUT, go_reference, wait_for
from testkit.cli import LISTENING, Proc

FILES: Dict[str, bytes] = {"/small": b"hello from the target\n", "/big": os.urandom(3 * 1024 * 1024 + 7)}
SKIP_REASON = "Go reference not built: run shared/goref/build.sh, or set REMOTEDIALER_GOREF"


def _go(name: str) -> str:
    path = go_reference(name)
    if path is None:
        pytest.skip(SKIP_REASON)
    return str(path)


class _Files(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """A loopback HTTP server with :data:`FILES`; its ``host:port``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


@pytest.fixture
def procs() -> Iterator[List[Proc]]:
    started: List[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _fetch_all(base: str) -> None:
    """Every file through ``base`` (a ``/client/...`` route prefix), byte for
    byte, once the tunnel answers; then a name the target does not have."""
    with requests.Session() as http:
        http.trust_env = False
        deadline = time.monotonic() + TIMEOUT
        while http.get(base + "/small", timeout=TIMEOUT).status_code != 200:
            assert time.monotonic() < deadline, "the tunnel never answered"
            time.sleep(0.05)
        for path, body in FILES.items():
            response = http.get(base + path, timeout=TIMEOUT)
            assert response.status_code == 200
            assert response.content == body
        assert http.get(base + "/missing", timeout=TIMEOUT).status_code == 404


# Our side with resumption on: the Go side neither makes nor answers the offer,
# so the session is today's (docs/protocol.rst, "Resumption extension").
RESUME_WINDOWS = pytest.mark.parametrize("resume_window", ["0", "30"])


@RESUME_WINDOWS
def test_python_client_behind_go_server(target: str, procs: List[Proc], resume_window: str) -> None:
    server_binary = _go("server")
    for _attempt in range(3):  # the Go server cannot report a port it bound to 0
        port = _free_port()
        server = Proc([server_binary, "-listen", f"127.0.0.1:{port}"])
        procs.append(server)
        wait_for(lambda: _accepts(port) or server.popen.poll() is not None)  # noqa: B023
        if server.popen.poll() is None:
            break
    procs.append(Proc.cli("client", "--connect", f"ws://127.0.0.1:{port}/connect", "--id", "py",
                          "--resume-window", resume_window))
    _fetch_all(f"http://127.0.0.1:{port}/client/py/http/{target}")


@RESUME_WINDOWS
def test_go_client_behind_python_server(target: str, procs: List[Proc], resume_window: str) -> None:
    client_binary = _go("client")
    server = Proc.cli("server", "--listen", "127.0.0.1:0", "--resume-window", resume_window)
    procs.append(server)
    port = int(server.wait_for(LISTENING).group(1))
    procs.append(Proc([client_binary, "-connect", f"ws://127.0.0.1:{port}/connect", "-id", "go",
                       "-debug=false"]))
    _fetch_all(f"http://127.0.0.1:{port}/client/go/http/{target}")
