"""The tunnel stacks compared side by side in one run: every pairing of the
Python and the Go example server with the Python and the Go example client,
plus the Python server under gunicorn: with the project's worker class (as
README.rst recommends) and with gunicorn's gthread worker (the fallback).

Each :class:`Route` is a URL of the 1 KiB file through one server/client
pair (the server's ``/client/<id>/http/<target>/<path>`` route) and the two
processes whose CPU time is charged to the requests it serves. Servers are
shared by the routes that use them (a Python server holds the Python client
``foo`` and the Go client ``gocli``); only one route is loaded at a time, so
the CPU a server spends over a load run belongs to that run's route.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .goref import GOREF_HINT, go_binary
from .procs import BenchError, Proc, Usage, free_port, usage, wait_listening

__all__ = ["Route", "GO", "TUNNEL", "WORKER", "WORKER_CLASS", "start_stacks", "route_label"]

#: Path names (table columns) of the stacks; "tunnel" is Python server + Python client.
TUNNEL = "tunnel"
GO = "go"
GO_SERVER_PY_CLIENT = "go-srv+py-cli"
PY_SERVER_GO_CLIENT = "py-srv+go-cli"
GUNICORN = "gunicorn"
WORKER = "worker"
#: The project's gunicorn worker class (README.rst's deployment).
WORKER_CLASS = "remotedialer.workers.RemotedialerWorker"


def route_label(path: str) -> str:
    """What a path column means, for the notes under the table."""
    return {
        TUNNEL: "Python server + Python client",
        GO: "Go server + Go client",
        GO_SERVER_PY_CLIENT: "Go server + Python client",
        PY_SERVER_GO_CLIENT: "Python server + Go client",
        GUNICORN: "Python server under gunicorn gthread (1 worker, 256 threads) + Python client",
        WORKER: f"Python server under gunicorn -k {WORKER_CLASS} (1 worker) + Python client",
    }.get(path, path)


@dataclass(frozen=True)
class Route:
    """A way to the target's files and the processes that carry it."""

    base_url: str  # append the file name
    server: Optional[Proc] = None
    client: Optional[Proc] = None
    server_tree: bool = False  # charge the server's child processes too (gunicorn's worker, sshd's sessions)

    def url(self, name: str) -> str:
        return self.base_url + name

    def usage(self) -> Optional[Tuple[Usage, Usage]]:
        """CPU and sleeps so far of (server side, client side), or None when
        the route has no processes of its own (the direct path)."""
        if self.server is None or self.client is None:
            return None
        return usage(self.server.pid, self.server_tree), usage(self.client.pid)


def _start_on_free_port(name: str, argv_for: Callable[[int], List[str]], log_dir: str) -> Tuple[Proc, int]:
    """Start a program that cannot report a port it bound to 0: pick a free
    port, retry on a collision."""
    last: Optional[BenchError] = None
    for _attempt in range(3):
        port = free_port()
        proc = Proc(name, argv_for(port), log_dir)
        try:
            wait_listening(proc, port)
            return proc, port
        except BenchError as exc:
            proc.stop()
            last = exc
    raise BenchError(f"{name} did not start: {last}")


def start_stacks(log_dir: str, py_server: Proc, py_server_port: int, target: str,
                 want_go: bool, want_gunicorn: bool, procs: Dict[str, Proc],
                 notes: Callable[[str], None], want_worker: bool = False) -> Dict[str, Route]:
    """Start the Go server and clients and the gunicorn server beside the
    running Python server; return the extra routes by path name. Started
    processes go into ``procs`` (the caller stops them). ``target`` is the
    file server's ``host:port``."""
    routes: Dict[str, Route] = {}

    def client(name: str, server_port: int, client_id: str, go: bool) -> Proc:
        url = f"ws://127.0.0.1:{server_port}/connect"
        if go:
            binary = go_binary("client")
            assert binary is not None
            proc = Proc(name, [str(binary), "-connect", url, "-id", client_id, "-debug=false"], log_dir)
        else:
            proc = Proc.remotedialer(name, ["client", "--connect", url, "--id", client_id], log_dir)
        procs[name] = proc
        return proc

    def route(server_port: int, client_id: str) -> str:
        return f"http://127.0.0.1:{server_port}/client/{client_id}/http/{target}/"

    if want_go:
        server_binary, client_binary = go_binary("server"), go_binary("client")
        if server_binary is None or client_binary is None:
            notes(f"Go columns skipped: the Go reference is not built ({GOREF_HINT})")
        else:
            go_server, go_port = _start_on_free_port(
                "go-server", lambda port: [str(server_binary), "-listen", f"127.0.0.1:{port}"], log_dir)
            procs["go-server"] = go_server
            routes[GO] = Route(route(go_port, "foo"), go_server, client("go-client", go_port, "foo", True))
            routes[GO_SERVER_PY_CLIENT] = Route(route(go_port, "pycli"), go_server,
                                                client("py-client-go", go_port, "pycli", False))
            routes[PY_SERVER_GO_CLIENT] = Route(route(py_server_port, "gocli"), py_server,
                                                client("go-client-py", py_server_port, "gocli", True))
            notes("Go: rancher/remotedialer's example server, client (-debug=false) built by "
                  "shared/goref/build.sh; the Go server logs three lines per request, as shipped")
    if want_gunicorn:
        gunicorn, port = _start_on_free_port("gunicorn", lambda port: [
            sys.executable, "-m", "gunicorn", "-k", "gthread", "--workers", "1", "--threads", "256",
            "-b", f"127.0.0.1:{port}", "remotedialer.cli.server:make_app()"], log_dir)
        procs["gunicorn"] = gunicorn
        routes[GUNICORN] = Route(route(port, "foo"), gunicorn,
                                 client("py-client-gunicorn", port, "foo", False), server_tree=True)
    if want_worker:
        worker, port = _start_on_free_port("gunicorn-worker", lambda port: [
            sys.executable, "-m", "gunicorn", "-k", WORKER_CLASS, "--workers", "1",
            "-b", f"127.0.0.1:{port}", "remotedialer.cli.server:make_app()"], log_dir)
        procs["gunicorn-worker"] = worker
        routes[WORKER] = Route(route(port, "foo"), worker,
                               client("py-client-worker", port, "foo", False), server_tree=True)
    return routes
