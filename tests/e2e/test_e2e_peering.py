"""Peering end to end with real processes on loopback.

Three ``remotedialer server`` processes peered with each other (the Go
example's ``--id/--token/--peers`` flags), and the documented multi-instance
recipe: three single-worker gunicorn instances peered through environment
variables. A ``remotedialer client`` connects to one server; requests to any
server's ``/client/foo/http/...`` endpoint reach the file server behind it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import requests

from testkit.support import TIMEOUT

TOKEN = "e2e-peer-token"
NAMES = ("a", "b", "c")


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


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.close()


@pytest.fixture
def files(tmp_path: Path, procs: Processes) -> Dict[str, object]:
    """A dummy file server with a small and a 3 MiB file."""
    root = tmp_path / "files"
    root.mkdir()
    (root / "small.txt").write_bytes(b"hello through the mesh\n")
    big = os.urandom(3 * 1024 * 1024)
    (root / "big.bin").write_bytes(big)
    port = free_port()
    cli = [sys.executable, "-m", "remotedialer.cli"]
    procs.start("dummy", cli + ["dummy", "--listen", f"127.0.0.1:{port}", str(root)])
    wait_until(lambda: port_open(port), "the file server")
    return {"port": port, "big_sha": hashlib.sha256(big).hexdigest()}


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


def peers_of(name: str, ports: Dict[str, int]) -> str:
    return ",".join(
        f"{other}:{TOKEN}:ws://127.0.0.1:{ports[other]}/connect" for other in NAMES if other != name
    )


def start_cli_server(procs: Processes, name: str, ports: Dict[str, int]) -> None:
    procs.start(name, [sys.executable, "-m", "remotedialer.cli", "server",
                       "--listen", f"127.0.0.1:{ports[name]}", "--id", name, "--token", TOKEN,
                       "--peers", peers_of(name, ports)])


def gunicorn_control_socket(path: Path) -> List[str]:
    """Newer gunicorn opens one control socket per user by default: give each
    instance its own so they do not fight over it."""
    import gunicorn.config

    if any(setting.name == "control_socket" for setting in gunicorn.config.KNOWN_SETTINGS):
        return ["--control-socket", str(path)]
    return []


def start_gunicorn(procs: Processes, name: str, ports: Dict[str, int]) -> None:
    procs.start(
        name,
        [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "16",
         "-b", f"127.0.0.1:{ports[name]}", "--graceful-timeout", "1",
          *gunicorn_control_socket(procs.tmp_path / f"{name}.ctl"),
         "remotedialer.cli.server:make_app()"],
        env={"REMOTEDIALER_ID": name, "REMOTEDIALER_TOKEN": TOKEN,
             "REMOTEDIALER_PEERS": peers_of(name, ports)},
    )


def check_mesh(procs: Processes, ports: Dict[str, int], files: Dict[str, object], start) -> None:  # type: ignore[no-untyped-def]
    file_port = int(files["port"])  # type: ignore[call-overload]
    for name in NAMES:
        start(procs, name, ports)
    for name in NAMES:
        wait_until(lambda n=name: port_open(ports[n]), f"server {name}")
    start_client(procs, ports["a"])
    # A request on any instance reaches the client held by a.
    for name in NAMES:
        wait_until(lambda n=name: reachable(ports[n], file_port), f"foo through {name}")
    big = fetch(ports["c"], file_port, "big.bin")
    assert big.status_code == 200
    assert hashlib.sha256(big.content).hexdigest() == files["big_sha"]

    # The client moves to b: c follows (REMOVE_CLIENT from a, ADD_CLIENT from b).
    procs.stop("client")
    wait_until(lambda: not reachable(ports["c"], file_port), "c to stop routing to a")
    assert fetch(ports["c"], file_port, "small.txt").status_code == 500
    start_client(procs, ports["b"])
    wait_until(lambda: reachable(ports["c"], file_port), "c to route to b")
    wait_until(lambda: reachable(ports["a"], file_port), "a to route to b")

    # A peer dies and comes back: the others reconnect to it on their own.
    procs.kill("a")
    wait_until(lambda: not port_open(ports["a"]), "a to die")
    assert reachable(ports["c"], file_port)  # b and c are unaffected
    start(procs, "a", ports)
    wait_until(lambda: reachable(ports["a"], file_port), "the restarted a to route to b")


def test_three_cli_servers_route_to_a_client_on_any_of_them(
    procs: Processes, files: Dict[str, object]
) -> None:
    ports = {name: free_port() for name in NAMES}
    check_mesh(procs, ports, files, start_cli_server)


def test_multi_instance_gunicorn_recipe(procs: Processes, files: Dict[str, object]) -> None:
    """docs/deployment.rst: single-worker gunicorn instances peered over loopback."""
    ports = {name: free_port() for name in NAMES}
    check_mesh(procs, ports, files, start_gunicorn)


def test_wrong_token_is_refused(procs: Processes, files: Dict[str, object]) -> None:
    ports = {"a": free_port(), "b": free_port()}
    file_port = int(files["port"])  # type: ignore[call-overload]
    cli = [sys.executable, "-m", "remotedialer.cli", "server"]
    procs.start("a", cli + ["--listen", f"127.0.0.1:{ports['a']}", "--id", "a", "--token", TOKEN,
                            "--peers", f"b:{TOKEN}:ws://127.0.0.1:{ports['b']}/connect"])
    procs.start("b", cli + ["--listen", f"127.0.0.1:{ports['b']}", "--id", "b", "--token", "wrong",
                            "--peers", f"a:wrong:ws://127.0.0.1:{ports['a']}/connect"])
    wait_until(lambda: port_open(ports["a"]) and port_open(ports["b"]), "both servers")
    start_client(procs, ports["b"])
    wait_until(lambda: reachable(ports["b"], file_port), "foo through b")
    # a expects b to present TOKEN; b presents "wrong": a never learns of foo.
    wait_until(lambda: "401" in procs.log("b") or "failed authentication" in procs.log("b"),
               "b's peer link to be refused")
    assert fetch(ports["a"], file_port, "small.txt").status_code == 500
    assert TOKEN not in procs.log("a") + procs.log("b")
