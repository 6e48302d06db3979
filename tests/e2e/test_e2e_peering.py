"""Peering end to end with real processes on loopback.

Three ``remotedialer server`` processes peered with each other (the Go
example's ``--id/--token/--peers`` flags), and the documented multi-instance
recipe: three single-worker gunicorn instances peered through environment
variables. A ``remotedialer client`` connects to one server; requests to any
server's ``/client/foo/http/...`` endpoint reach the file server behind it.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Dict


from testkit.peering import (
    Processes,
    fetch,
    free_port,
    gunicorn_control_socket,
    port_open,
    reachable,
    start_client,
    wait_until,
)

TOKEN = "e2e-peer-token"
NAMES = ("a", "b", "c")


def peers_of(name: str, ports: Dict[str, int]) -> str:
    return ",".join(
        f"{other}:{TOKEN}:ws://127.0.0.1:{ports[other]}/connect" for other in NAMES if other != name
    )


def start_cli_server(procs: Processes, name: str, ports: Dict[str, int]) -> None:
    procs.start(name, [sys.executable, "-m", "remotedialer.cli", "server",
                       "--listen", f"127.0.0.1:{ports[name]}", "--id", name, "--token", TOKEN,
                       "--peers", peers_of(name, ports)])


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
