"""Accept rate (issue 24): how fast a server takes ``N`` tunnels opened at
once, as in the reconnect storm after a restart.

For each server kind and run (kinds alternate within a run, so they share
the machine's load):

1. start the server on a free port;
2. start :mod:`testkit.fleet` with ``N`` agents (at most 100 handshakes in
   flight, each agent pinging every 5 s once open) and wait until all are
   open: ``N`` / the seconds it took is the accept rate;
3. charge the server's CPU (its process tree: gunicorn's worker included)
   and the fleet's over that opening, per tunnel accepted.

Kinds: ``python`` (``remotedialer server``, werkzeug's threaded server with
the project's front end), ``python-parked`` (the same with ``--park-idle``),
``worker`` (gunicorn with :class:`remotedialer.workers.RemotedialerWorker`,
one worker) and ``go`` (rancher/remotedialer's example server, when built,
see :mod:`benchmarks.goref`). The Go column also shows what the agents'
process can open at most (its CPU per tunnel against Go's is the
generator's own capacity): a Python figure near it would measure the fleet.

``--baseline PATH`` adds a ``python-baseline`` kind: ``remotedialer server``
of the checkout at ``PATH`` (imported from there through ``PYTHONPATH``),
for before/after comparisons in the same run.

``python -m benchmarks.accept [--agents 10000] [--runs 3] [--kinds python,worker,go] [--baseline PATH]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from remotedialer.server.process import raise_open_files_limit

from .goref import GOREF_HINT, go_binary
from .procs import BenchError, FleetProc, Proc, free_port, usage, wait_listening

__all__ = ["Opening", "KINDS", "open_fleet", "main"]

KINDS = ("python", "python-parked", "worker", "go", "python-baseline")

#: The gunicorn worker class measured (README.rst's deployment).
WORKER_CLASS = "remotedialer.workers.RemotedialerWorker"


@dataclass(frozen=True)
class Opening:
    """One fleet opened against one server."""

    kind: str
    agents: int
    seconds: float  # from the fleet's start to every agent open
    server_cpu: float  # CPU seconds of the server's process tree over the opening
    fleet_cpu: float  # CPU seconds of the agents' process over the opening

    @property
    def rate(self) -> float:
        """Tunnels accepted per second."""
        return self.agents / self.seconds

    @property
    def server_us(self) -> float:
        """Server CPU per tunnel accepted, microseconds."""
        return self.server_cpu / self.agents * 1e6

    @property
    def fleet_us(self) -> float:
        """The agents' CPU per tunnel opened, microseconds."""
        return self.fleet_cpu / self.agents * 1e6


def _server(kind: str, log_dir: str, agents: int, baseline: str = "") -> Tuple[Proc, int, bool]:
    """Start the server of ``kind``; ``(process, port, whether to count its children)``."""
    port = free_port()
    if kind == "go":
        binary = go_binary("server")
        if binary is None:
            raise BenchError(f"no Go server: {GOREF_HINT}")
        proc = Proc("server-go", [str(binary), "-listen", f"127.0.0.1:{port}"], log_dir)
        tree = False
    elif kind == "worker":
        proc = Proc("server-worker", [
            sys.executable, "-m", "gunicorn", "-k", WORKER_CLASS, "--workers", "1",
            "--worker-connections", str(agents + 256), "--backlog", "4096",
            "-b", f"127.0.0.1:{port}", "remotedialer.cli.server:make_app()"], log_dir)
        tree = True
    elif kind == "python-baseline":
        if not baseline:
            raise BenchError("python-baseline needs --baseline PATH")
        proc = Proc(f"server-{kind}", [sys.executable, "-m", "remotedialer.cli", "server", "--listen",
                                       f"127.0.0.1:{port}"], log_dir, env={"PYTHONPATH": baseline})
        tree = False
    else:
        park = ["--park-idle"] if kind == "python-parked" else []
        proc = Proc.remotedialer(f"server-{kind}", ["server", "--listen", f"127.0.0.1:{port}", *park],
                                 log_dir)
        tree = False
    try:
        wait_listening(proc, port)
    except BenchError:
        proc.stop()
        raise
    return proc, port, tree


def open_fleet(kind: str, agents: int, log_dir: str, run: int = 1, baseline: str = "") -> Opening:
    """Open ``agents`` tunnels at once on a fresh server of ``kind``; blocks
    until all are open (or raises :class:`BenchError`). ``baseline``: the
    checkout the ``python-baseline`` kind runs."""
    server, port, tree = _server(kind, log_dir, agents, baseline)
    fleet: Optional[FleetProc] = None
    try:
        server_before = usage(server.pid, tree)
        fleet = FleetProc(port, agents, log_dir, f"fleet-{kind}-{run}", report=0.5)
        seconds = fleet.wait_opened(timeout=60 + agents / 50)
        server_cpu = usage(server.pid, tree).cpu_seconds - server_before.cpu_seconds
        fleet_cpu = usage(fleet.proc.pid).cpu_seconds  # the fleet's whole life: an upper bound
        return Opening(kind, agents, seconds, server_cpu, fleet_cpu)
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop(timeout=30)


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def _median_range(values: Sequence[float], digits: int = 0) -> str:
    return (f"{statistics.median(values):,.{digits}f} "
            f"[{min(values):,.{digits}f}-{max(values):,.{digits}f}]")


def summarize(openings: Sequence[Opening]) -> List[str]:
    """One line per kind: accept rate, server and fleet CPU per tunnel
    (median [range]), and each kind's rate over Go's of the same run."""
    by_kind: Dict[str, List[Opening]] = {}
    for opening in openings:
        by_kind.setdefault(opening.kind, []).append(opening)
    go = by_kind.get("go", [])
    lines = []
    for kind, rows in by_kind.items():
        line = (f"{kind}: {_median_range([row.rate for row in rows])} accepted/s, server CPU "
                f"{_median_range([row.server_us for row in rows])} us/tunnel, fleet CPU "
                f"{_median_range([row.fleet_us for row in rows])} us/tunnel")
        if go and kind != "go" and len(go) == len(rows):
            ratios = [row.rate / go_row.rate for row, go_row in zip(rows, go)]
            line += f", rate / Go's same run {_median_range(ratios, 2)}"
        lines.append(line)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accept", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kinds", default="python,worker,go",
                        help=f"comma-separated, from {', '.join(KINDS)} (default: python,worker,go)")
    parser.add_argument("--baseline", default="", metavar="PATH",
                        help="a checkout whose remotedialer server runs as the python-baseline kind")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if args.baseline and "python-baseline" not in kinds:
        kinds.insert(0, "python-baseline")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    if "go" in kinds and go_binary("server") is None:
        print(f"Go column skipped: {GOREF_HINT}", file=sys.stderr)
        kinds.remove("go")
    raise_open_files_limit()
    openings = []
    with tempfile.TemporaryDirectory(prefix="remotedialer-accept-") as log_dir:
        for run in range(1, args.runs + 1):
            for kind in kinds:
                print(f"load {_load()}", flush=True)
                opening = open_fleet(kind, args.agents, log_dir, run, args.baseline)
                openings.append(opening)
                print(f"run {run} {kind}: {args.agents} open in {opening.seconds:.2f}s, "
                      f"{opening.rate:,.0f}/s, server CPU {opening.server_us:.0f} us/tunnel, "
                      f"fleet CPU {opening.fleet_us:.0f} us/tunnel", flush=True)
    print(f"load {_load()}")
    for line in summarize(openings):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
