"""The ``remotedialer`` command's processes for end-to-end tests: a child
process with its output collected (:class:`Proc`), and the file server,
tunnel server and client started together (:class:`CliStack`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import requests

from .support import TIMEOUT

__all__ = ["REPO", "LISTENING", "Proc", "CliStack", "cli_env", "http_session", "wait_tunnel", "refused_port"]

REPO = Path(__file__).resolve().parents[1]
"""The source checkout (the processes run there, with it on ``PYTHONPATH``)."""
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def cli_env(**extra: str) -> dict:
    """The environment of a child process: no proxies, no trace, the checkout importable."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("CATTLE_TUNNEL_DATA_DEBUG", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class Proc:
    """A child process whose combined output is collected line by line."""

    def __init__(self, args: List[str], env: Optional[dict] = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env=env or cli_env(), cwd=str(REPO),
        )
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def cli(cls, *args: str, env: Optional[dict] = None) -> "Proc":
        return cls([sys.executable, "-m", "remotedialer.cli", *args], env)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, pattern: "re.Pattern[str]", timeout: float = TIMEOUT) -> "re.Match[str]":
        """Block until a line matches; fail with the output so far if not."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{pattern.pattern!r} not seen from {self.args}:\n{''.join(self.lines)}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def stop(self) -> int:
        """SIGTERM, then wait; kill if it does not exit in time. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(TIMEOUT)
            raise AssertionError(f"{self.args} ignored SIGTERM:\n{self.output}") from None
        self._reader.join(TIMEOUT)
        return code


def http_session() -> requests.Session:
    """A requests session that ignores proxy settings (loopback only)."""
    session = requests.Session()
    session.trust_env = False
    return session


def wait_tunnel(http: requests.Session, url: str) -> None:
    """Poll ``url`` until it answers 200 (the tunnel is registered)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        response = http.get(url, timeout=TIMEOUT)
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"tunnel not usable: {response.status_code} {response.text}")
        time.sleep(0.05)


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CliStack:
    """``remotedialer dummy``, ``server`` and ``client --id foo`` as processes
    on free loopback ports, the tunnel up."""

    def __init__(self, directory: Path, server_args: Optional[List[str]] = None) -> None:
        self.procs: List[Proc] = []
        self.dummy = self._start(Proc.cli("dummy", "--listen", "127.0.0.1:0", str(directory)))
        self.dummy_port = int(self.dummy.wait_for(LISTENING).group(1))
        self.server = self._start(Proc.cli("server", "--listen", "127.0.0.1:0", *(server_args or [])))
        self.server_port = int(self.server.wait_for(LISTENING).group(1))
        self.client = self._start(Proc.cli(
            "client", "--connect", f"ws://127.0.0.1:{self.server_port}/connect", "--id", "foo",
        ))
        self.http = http_session()
        wait_tunnel(self.http, self.url("/small.txt"))

    def _start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def url(self, path: str, client: str = "foo", port: Optional[int] = None) -> str:
        target = port or self.dummy_port
        return f"http://127.0.0.1:{self.server_port}/client/{client}/http/127.0.0.1:{target}{path}"

    def close(self) -> List[int]:
        self.http.close()
        return [proc.stop() for proc in reversed(self.procs)]
