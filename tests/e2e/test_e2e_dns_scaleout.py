"""Scale-out end to end with real processes on loopback.

* Three ``remotedialer server`` processes find each other through a real DNS
  server (dnslib, in this process) whose SRV records give each instance's
  port on 127.0.0.1; a fourth is added and one removed by changing the
  records, and routing follows.
* A gunicorn instance (gthread, one worker) drains on SIGTERM: readiness
  fails, the tunnel is closed with a close frame, the worker exits cleanly.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator

import pytest
import requests

from testkit.dns import ZoneServer
from remotedialer.client import Backoff, TunnelClient

from testkit.peering import (
    Processes,
    free_port,
    gunicorn_control_socket,
    port_open,
    reachable,
    start_client,
    wait_until,
)
from testkit.support import TIMEOUT
from testkit.support import allow_all

TOKEN = "k8s-e2e-token"
NAME = "peers.test"
REFRESH = 0.5


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer() as server:
        yield server


def readyz(port: int) -> str:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz?verbose", timeout=TIMEOUT).text
    except requests.RequestException:
        return ""


def test_three_servers_discover_each_other_and_follow_the_records(
    procs: Processes, files: Dict[str, object], zone: ZoneServer, tmp_path: Path
) -> None:
    file_port = int(files["port"])  # type: ignore[call-overload]
    ports = {name: free_port() for name in "abcd"}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # Each instance gets the token another way: a file, the environment, the flag.
    token_args = {"a": ["--token-file", str(token_file)], "b": [], "c": ["--token", TOKEN],
                  "d": ["--token-file", str(token_file)]}
    dns = f"{zone.address[0]}:{zone.address[1]}"

    def start(name: str) -> None:
        port = ports[name]
        procs.start(name, [
            sys.executable, "-m", "remotedialer.cli", "server", "--listen", f"127.0.0.1:{port}",
            "--id", f"127.0.0.1:{port}", *token_args[name], "--peers-from-dns", f"{NAME}:8123",
            "--dns-server", dns, "--peer-refresh", str(REFRESH),
        ], env={"REMOTEDIALER_TOKEN": TOKEN} if name == "b" else None)

    def publish(names: str) -> None:
        zone.set_endpoints(NAME, [("127.0.0.1", ports[name]) for name in names])

    publish("abc")
    for name in "abc":
        start(name)
    for name in "abc":
        wait_until(lambda n=name: port_open(ports[n]), f"server {name}")
    start_client(procs, ports["a"])
    for name in "bc":
        wait_until(lambda n=name: reachable(ports[n], file_port), f"foo through {name}")
    # Each lists the two others, not itself.
    for name in "abc":
        wait_until(lambda n=name: "[+]peer-links 2/2 up" in readyz(ports[n]), f"{name}'s links")
        assert "[+]peer-discovery 2 peers" in readyz(ports[name])
        # joined: linked both ways, so also the others' links to it, which may come later
        wait_until(lambda n=name: "[+]joined" in readyz(ports[n]), f"{name} to join")

    # d appears in DNS: everyone peers with it, and it routes to foo on a.
    start("d")
    wait_until(lambda: port_open(ports["d"]), "server d")
    publish("abcd")
    wait_until(lambda: reachable(ports["d"], file_port), "foo through d")
    for name in "abcd":
        wait_until(lambda n=name: "[+]peer-links 3/3 up" in readyz(ports[n]), f"{name}'s links to d")

    # c leaves DNS (still running): the others drop it and refuse its links,
    # so c no longer reaches foo, while b and d still do.
    publish("abd")
    for name in "abd":
        wait_until(lambda n=name: "[+]peer-links 2/2 up" in readyz(ports[n]), f"{name} to drop c")
    wait_until(lambda: not reachable(ports["c"], file_port), "c to lose its routes")
    assert reachable(ports["b"], file_port) and reachable(ports["d"], file_port)
    assert f"peer 127.0.0.1:{ports['c']} left {NAME}" in procs.log("a")

    # A resolver failure keeps the last good peers.
    zone.fail()
    wait_until(lambda: "last lookup failed" in readyz(ports["a"]), "a's failed lookup")
    assert "[+]peer-links 2/2 up" in readyz(ports["a"])
    assert reachable(ports["d"], file_port)
    zone.fail(False)
    for name in "abcd":
        procs.stop(name)
    assert TOKEN not in "".join(procs.log(name) for name in "abcd")


def test_gunicorn_worker_drains_on_sigterm(procs: Processes) -> None:
    port = free_port()
    procs.start("g", [
        sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "8",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10",
        *gunicorn_control_socket(procs.tmp_path / "g.ctl"), "remotedialer.cli.server:make_app()",
    ], env={"REMOTEDIALER_DRAIN_SECONDS": "1"})
    wait_until(lambda: readyz(port).endswith("ok\n"), "gunicorn to be ready")
    client = TunnelClient(f"ws://127.0.0.1:{port}/connect", {"X-Tunnel-ID": "foo"}, allow_all,
                          backoff=Backoff(initial=0.05, maximum=0.2))
    client.start()
    try:
        # The session itself, not one recorded by on_connect: that runs on a
        # thread of its own, which had not run yet when readyz failed.
        first = client.wait_connected(TIMEOUT)
        proc = procs.procs["g"]
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT).status_code
                   == 503, "readyz to fail")
        assert not first.closed  # still draining
        wait_until(lambda: first.closed, "the tunnel to close")
        assert first.close_reason == "websocket closed by the server"
        assert proc.wait(TIMEOUT) == 0
        log = procs.log("g")
        assert "shut down: 1 tunnel(s) closed" in log
        assert "SIGKILL" not in log
    finally:
        stopper = threading.Thread(target=client.stop, args=(TIMEOUT,))
        stopper.start()
        stopper.join(TIMEOUT)
