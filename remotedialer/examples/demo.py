"""Server, client and file server in one process, tried out (``remotedialer demo``).

Starts a file server, the example tunnel server and a client on free
loopback ports, downloads files through the tunnel (checking every byte with
sha256), shows that an unknown client and a refused target are answered with
500, prints what happened and the throughput, and exits 0 if every check
passed (1 otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, TextIO

import requests

from .file_server import DummyServer, generated_sha256

__all__ = ["Demo", "Check", "human_size", "human_time", "MiB"]

log = logging.getLogger(__name__)

#: Bytes in a mebibyte.
MiB = 1 << 20
CLIENT_ID = "demo"
TIMEOUT = 30.0


@dataclass
class Check:
    """One request the demo made and what came of it."""

    name: str
    ok: bool
    status: int = 0
    size: int = 0
    seconds: float = 0.0
    detail: str = ""

    @property
    def rate(self) -> float:
        """Bytes per second (0 when not measured)."""
        return self.size / self.seconds if self.seconds > 0 and self.size >= MiB else 0.0


def human_size(size: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def human_time(seconds: float) -> str:
    """``0.25`` -> ``250 ms``, ``2.5`` -> ``2.50 s``."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """The three components on loopback plus the checks made through them."""

    def __init__(self, size: int, out: TextIO = sys.stdout) -> None:
        self.size = size
        self.out = out
        self.checks: List[Check] = []
        self._directory = ""
        self.http = requests.Session()
        self.http.trust_env = False  # no proxies from the environment: loopback only

    # ------------------------------------------------------------ components
    def run(self) -> bool:
        """Start everything, run the checks, stop everything; True if all passed."""
        from ..app import make_app
        from ..client import TunnelClient
        from .agent import make_client
        from ..gateway.frontend import BoundedThreadedWSGIServer

        with tempfile.TemporaryDirectory(prefix="remotedialer-demo-") as directory:
            self._directory = directory
            self._write_files(directory)
            dummy = DummyServer(("127.0.0.1", 0), directory)
            dummy.start()
            app = make_app(peers="", timeout=TIMEOUT)
            httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, app, max_threads=64)
            server_thread = threading.Thread(target=httpd.serve_forever, name="demo-http", daemon=True)
            server_thread.start()
            client: Optional[TunnelClient] = None
            try:
                self.dummy_url = f"http://127.0.0.1:{dummy.port}"
                self.server_url = f"http://127.0.0.1:{httpd.port}"
                self._say("remotedialer demo: a tunnel server, a client and a file server on loopback")
                self._say("")
                self._say(f"  file server    {self.dummy_url}  (serving {directory})")
                self._say(f"  tunnel server  {self.server_url}  (tunnels connect to "
                          f"ws://127.0.0.1:{httpd.port}/connect)")
                started = time.monotonic()
                client = make_client(f"ws://127.0.0.1:{httpd.port}/connect", CLIENT_ID)
                client.start()
                client.wait_connected(TIMEOUT)
                deadline = time.monotonic() + TIMEOUT
                while not app.server.has_session(CLIENT_ID):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the server never registered the client's tunnel")
                    time.sleep(0.01)
                self._say(f"  client         id {CLIENT_ID!r}, tunnel up in "
                          f"{human_time(time.monotonic() - started)}")
                self._say("")
                self._say(f"  requests to {self.server_url}/client/{CLIENT_ID}/http/"
                          f"127.0.0.1:{dummy.port}/<path> go through the tunnel:")
                self._run_checks(dummy.port)
            finally:
                if client is not None:
                    client.stop()
                httpd.shutdown()
                app.close()
                httpd.server_close()
                dummy.stop()
                self.http.close()
        return self._summary()

    def _write_files(self, directory: str) -> None:
        with open(os.path.join(directory, "hello.txt"), "wb") as f:
            f.write(b"Hello from the far side of the tunnel!\n")
        with open(os.path.join(directory, "random-8MiB.bin"), "wb") as f:
            f.write(os.urandom(8 * MiB))

    def _file_sha256(self, directory: str, name: str) -> str:
        with open(os.path.join(directory, name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    # ----------------------------------------------------------------- checks
    def _run_checks(self, dummy_port: int) -> None:
        base = f"{self.server_url}/client/{CLIENT_ID}/http/127.0.0.1:{dummy_port}"
        directory = self._directory
        self._download("GET /hello.txt", f"{base}/hello.txt",
                       self._file_sha256(directory, "hello.txt"))
        self._download("GET /random-8MiB.bin", f"{base}/random-8MiB.bin",
                       self._file_sha256(directory, "random-8MiB.bin"))
        big = self._download(f"GET /bytes/{self.size}", f"{base}/bytes/{self.size}",
                             generated_sha256(self.size))
        direct = self._measure_direct(f"{self.dummy_url}/bytes/{self.size}")
        self._expect_error("unknown client -> 500",
                           f"{self.server_url}/client/nobody/http/127.0.0.1:{dummy_port}/hello.txt")
        self._expect_error("refused target -> 500",
                           f"{self.server_url}/client/{CLIENT_ID}/http/127.0.0.1:{_refused_port()}/")
        self._say("")
        if big.ok and big.rate:
            line = f"  throughput through the tunnel: {human_size(big.rate)}/s"
            if direct:
                line += f" (the file server directly: {human_size(direct)}/s)"
            self._say(line)

    def _download(self, name: str, url: str, expected_sha256: str) -> Check:
        check = Check(name, ok=False)
        started = time.monotonic()
        try:
            with self.http.get(url, stream=True, timeout=TIMEOUT) as response:
                check.status = response.status_code
                digest = hashlib.sha256()
                for chunk in response.iter_content(256 * 1024):
                    digest.update(chunk)
                    check.size += len(chunk)
            check.seconds = time.monotonic() - started
            if check.status != 200:
                check.detail = f"expected 200, got {check.status}"
            elif digest.hexdigest() != expected_sha256:
                check.detail = "sha256 MISMATCH"
            else:
                check.ok = True
                check.detail = "sha256 ok"
        except requests.RequestException as exc:
            check.detail = f"failed: {exc}"
        self._record(check)
        return check

    def _measure_direct(self, url: str) -> float:
        """Bytes per second downloading ``url`` without the tunnel (0 on failure)."""
        started = time.monotonic()
        size = 0
        try:
            with self.http.get(url, stream=True, timeout=TIMEOUT) as response:
                for chunk in response.iter_content(256 * 1024):
                    size += len(chunk)
        except requests.RequestException:
            return 0.0
        seconds = time.monotonic() - started
        return size / seconds if seconds > 0 else 0.0

    def _expect_error(self, name: str, url: str) -> Check:
        check = Check(name, ok=False)
        started = time.monotonic()
        try:
            response = self.http.get(url, timeout=TIMEOUT)
            check.status = response.status_code
            check.size = len(response.content)
            text = response.text.strip().replace("\n", " ")
            check.detail = f'"{text[:60]}"'
            check.ok = response.status_code == 500 and bool(text)
        except requests.RequestException as exc:
            check.detail = f"failed: {exc}"
        check.seconds = time.monotonic() - started
        self._record(check)
        return check

    # ---------------------------------------------------------------- output
    def _record(self, check: Check) -> None:
        self.checks.append(check)
        rate = f"{human_size(check.rate)}/s" if check.rate else ""
        self._say(
            f"  {'ok  ' if check.ok else 'FAIL'}  {check.name:<24} {check.status or '-':>3}  "
            f"{human_size(check.size):>9}  {human_time(check.seconds):>7}  {rate:>11}  {check.detail}"
        )

    def _summary(self) -> bool:
        failed = [check for check in self.checks if not check.ok]
        self._say("")
        if failed:
            self._say(f"  {len(failed)} of {len(self.checks)} checks FAILED")
        else:
            self._say(f"  all {len(self.checks)} checks passed")
        return not failed

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)
