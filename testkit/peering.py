"""Server, agent and file server processes on loopback for the end-to-end
tests of peering and scale-out: a set of processes that is killed at the
end, waiting for a port or a route, and a request through a server to the
file server behind the agent ``foo``. The fixtures built on these are in
``tests/e2e/conftest.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import requests

from .support import TIMEOUT

__all__ = [
    "free_port", "wait_until", "port_open", "Processes", "fetch", "reachable", "start_client",
    "gunicorn_control_socket",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, what: str, timeout: float = 2 * TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Processes:
    """Starts CLI processes and kills whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: Dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log = open(self.tmp_path / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,  # kill() takes gunicorn's workers down with it
        )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything it started (a crash)."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(TIMEOUT)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def fetch(server_port: int, file_port: int, name: str) -> requests.Response:
    url = f"http://127.0.0.1:{server_port}/client/foo/http/127.0.0.1:{file_port}/{name}"
    return requests.get(url, timeout=TIMEOUT)


def reachable(server_port: int, file_port: int) -> bool:
    try:
        return fetch(server_port, file_port, "small.txt").status_code == 200
    except requests.RequestException:
        return False


def start_client(procs: Processes, server_port: int) -> None:
    procs.start("client", [sys.executable, "-m", "remotedialer.cli", "client",
                           "--connect", f"ws://127.0.0.1:{server_port}/connect", "--id", "foo"])


def gunicorn_control_socket(path: Path) -> List[str]:
    """Newer gunicorn opens one control socket per user by default: give each
    instance its own so they do not fight over it."""
    import gunicorn.config

    if any(setting.name == "control_socket" for setting in gunicorn.config.KNOWN_SETTINGS):
        return ["--control-socket", str(path)]
    return []
