"""A download through ``/client/`` cut short (the agent goes away, the idle
timeout passes, the server gets SIGTERM) is logged as one WARNING line, with
no ERROR and no traceback, under every server the example server is
documented under (its own, gunicorn gthread, our gunicorn worker)."""

from __future__ import annotations

import http.server
import threading
from typing import Iterator, List

import pytest
import requests

from testkit.front import FRONT_ENDS, start_agent, start_front
from testkit.support import TIMEOUT, wait_for

MiB = 1024 * 1024
STALL_AFTER = 256 * 1024
AGENT = "cut-agent"


class LongBodies(http.server.BaseHTTPRequestHandler):
    """``/flow``: a 1 GiB body sent as fast as it is read; ``/stall``: 256
    KiB of a 1 GiB body, then nothing until the connection goes away."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(1024 * MiB))
        self.end_headers()
        chunk = b"x" * (64 * 1024)
        sent = 0
        try:
            while sent < 1024 * MiB:
                if self.path.startswith("/stall") and sent >= STALL_AFTER:
                    self.connection.settimeout(TIMEOUT * 3)
                    self.connection.recv(1)  # returns once the forwarder gave up
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def target() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LongBodies)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _start_download(port: int, target_port: int, path: str) -> requests.Response:
    """GET through the tunnel until its first 64 KiB arrived (retrying while
    the server does not know the agent yet); the response is left open."""
    url = f"http://127.0.0.1:{port}/client/{AGENT}/http/127.0.0.1:{target_port}{path}"
    responses: List[requests.Response] = []

    def started() -> bool:
        response = requests.get(url, stream=True, timeout=TIMEOUT)
        if response.status_code != 200:
            response.close()
            return False
        responses.append(response)
        return True

    wait_for(started)
    response = responses[0]
    got = 0
    for data in response.raw.stream(64 * 1024, decode_content=False):
        got += len(data)
        if got >= 64 * 1024:
            break
    return response


#: (front end, how the download is cut); SIGTERM of ``remotedialer server``
#: itself is tests/e2e/test_e2e_cli.py's.
CASES = [
    (front_end, cut)
    for front_end in FRONT_ENDS
    for cut in ("agent gone", "idle timeout", "SIGTERM")
    if not (front_end == "example" and cut == "SIGTERM")
]


@pytest.mark.parametrize("front_end, cut", CASES)
def test_a_cut_download_is_one_warning(
    target: int, caplog: pytest.LogCaptureFixture, front_end: str, cut: str
) -> None:
    front = start_front(front_end, caplog)
    agent = start_agent(front.port, AGENT)
    try:
        path = "/stall?timeout=2" if cut == "idle timeout" else "/flow"
        response = _start_download(front.port, target, path)
        if cut == "agent gone":
            agent.stop(TIMEOUT)
        elif cut == "SIGTERM":
            front.process.terminate()  # type: ignore[union-attr]
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the body ends short
            for _ in response.iter_content(MiB):
                pass
        response.close()
        wait_for(lambda: "REQ ABORTED" in front.log_text())
    finally:
        agent.stop(TIMEOUT)
        front.stop()
    log = front.log_text()
    aborted = [line for line in log.splitlines() if "REQ ABORTED" in line]
    assert len(aborted) == 1 and "WARNING" in aborted[0], log
    assert "[ERROR]" not in log and "ERROR " not in log and "Traceback" not in log, log
