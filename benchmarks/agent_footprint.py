"""What an agent costs on the machine it runs on (issue 24): the time to
import the client side, and the RSS of an idle ``remotedialer client``
connected to a server, with Go's client beside it.

* import: ``python -X importtime -c 'import remotedialer.cli.client'``, the
  cumulative time of that one import, and the CPU time of the same import
  without ``-X importtime`` (``time.process_time`` around it); ``--runs`` fresh interpreters each, the
  minimum and the median printed (the minimum is the one to compare on a
  loaded machine: waiting for a core only ever adds). A bare interpreter's
  ``site`` import is printed beside it for scale.
* stages: where the RSS and the import CPU go, each stage a fresh
  interpreter that does everything the stages before it did and then its
  own step (a bare interpreter, ``import ssl``, ``import websocket``, the
  ``TunnelClient``, the CLI, four idle threads like the agent's), ``VmRSS``
  from ``/proc/self/status`` at its end; ``--instructions`` adds each
  stage's instruction count under callgrind (when valgrind is installed),
  which a loaded machine does not change.
* idle RSS: a Python server (``remotedialer server``), then ``--runs`` times
  an agent (``remotedialer client``, then Go's client when built, see
  :mod:`benchmarks.goref`) connects, waits ``--settle`` seconds after the
  server logged its session, and ``VmRSS`` is read from
  ``/proc/PID/status``, with its thread count, the CPU time it took to get
  there (start, imports, connection, ``--settle`` idle seconds; clock ticks
  of ``/proc/PID/stat``) and its wake-ups per second (voluntary context
  switches of all its threads over ``--idle`` seconds).

The package's bytecode is compiled first (``compileall``), as ``pip
install`` does: without it (``PYTHONDONTWRITEBYTECODE`` set, a read-only
checkout) every import compiles the package's source again, which cost more
than everything else the agent imports put together.

``--source DIR`` measures the package in another checkout (another commit:
``git archive COMMIT | tar -x -C DIR``) with this interpreter and its
installed dependencies, for before/after numbers from one run.

Run: ``python -m benchmarks.agent_footprint [--runs 7] [--source DIR] [--instructions]``.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

from .goref import GOREF_HINT, go_binary
from .procs import Proc, usage

__all__ = ["STAGES", "IdleAgent", "import_times", "idle_agent", "stage_costs", "main"]

MiB = 1024 * 1024


def _prelude(source: Optional[str]) -> str:
    """Python run first in each interpreter: with ``source``, the package is
    taken from that folder (the editable install's finder set aside)."""
    if source is None:
        return "import sys\n"
    return (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
        f"sys.path.insert(0, {os.path.abspath(source)!r})\n"
    )


def _compile_package(source: Optional[str]) -> None:
    """Write the package's ``.pyc`` files (quietly; errors are the import's to report)."""
    if source is None:
        import remotedialer

        folder = os.path.dirname(remotedialer.__file__)
    else:
        folder = os.path.join(source, "remotedialer")
    compileall.compile_dir(folder, quiet=1)


def _importtime_total(stderr: str, module: str) -> int:
    """The cumulative microseconds of ``module`` in ``-X importtime`` output."""
    for line in stderr.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    raise RuntimeError(f"no importtime line for {module}:\n{stderr[-2000:]}")


def import_times(module: str, runs: int, source: Optional[str]) -> List[Tuple[float, float, int]]:
    """Per fresh interpreter: (importtime milliseconds, CPU milliseconds, modules loaded)."""
    code = (
        _prelude(source)
        + "import time\nstart = time.process_time()\n"
        + f"import {module}\n"
        + "cpu = time.process_time() - start\n"
        + "print(cpu * 1000, len(sys.modules))\n"
    )
    rows = []
    for _ in range(runs):  # importtime's own printing slows it: CPU is timed in a run without
        traced = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                                capture_output=True, text=True, timeout=120, check=True)
        total = _importtime_total(traced.stderr, module) / 1000
        done = subprocess.run([sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=120, check=True)
        cpu, modules = done.stdout.split()
        rows.append((total, float(cpu), int(modules)))
    return rows


STAGES: Sequence[Tuple[str, str]] = (
    ("bare interpreter", ""),
    ("+ import ssl", "import ssl\n"),
    ("+ import websocket (websocket-client)", "import websocket\n"),
    ("+ from remotedialer.client import TunnelClient", "from remotedialer.client import TunnelClient\n"),
    ("+ import remotedialer.cli.client", "import remotedialer.cli.client\n"),
    ("+ 4 idle threads (64 KiB buffer each)",
     "import threading\n"
     "_idle = threading.Event()\n"
     "def _hold():\n    _buffer = bytearray(65536)\n    _idle.wait()\n"
     "_threads = [threading.Thread(target=_hold, daemon=True) for _ in range(4)]\n"
     "for _t in _threads: _t.start()\n"
     "time.sleep(0.2)\n"),
)
"""Cumulative steps from a bare interpreter to the agent, with the statement
each adds (the last one: what four more threads cost, each having touched
its stack and a buffer the size of the agent's receive buffer)."""

_STAGE_REPORT = (
    "cpu = time.process_time() - start\n"
    "rss = [line for line in open('/proc/self/status') if line.startswith('VmRSS:')][0].split()[1]\n"
    "print(cpu * 1000, int(rss) * 1024, len(sys.modules))\n"
)


def _stage_code(upto: int, source: Optional[str]) -> str:
    body = "".join(statement for _label, statement in STAGES[1:upto + 1])
    return _prelude(source) + "import time\nstart = time.process_time()\n" + body + _STAGE_REPORT


class StageCost(NamedTuple):
    """One stage: its label, the minimum CPU milliseconds and RSS bytes of
    ``runs`` fresh interpreters, the modules loaded, and the instructions
    of the whole process under callgrind (0 when not counted)."""

    label: str
    cpu_ms: float
    rss: int
    modules: int
    instructions: int


def _instructions(code: str) -> int:
    """Instructions executed by ``python -c code`` (callgrind's ``I refs``)."""
    with tempfile.TemporaryDirectory(prefix="agent-callgrind-") as folder:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out",
             sys.executable, "-c", code],
            capture_output=True, text=True, timeout=600, check=True)
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def stage_costs(runs: int, source: Optional[str], instructions: bool) -> List[StageCost]:
    """The cost of each of :data:`STAGES`, cumulative."""
    costs = []
    for upto, (label, _statement) in enumerate(STAGES):
        code = _stage_code(upto, source)
        rows = []
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", code],
                                  capture_output=True, text=True, timeout=120, check=True)
            cpu, rss, modules = done.stdout.split()
            rows.append((float(cpu), int(rss), int(modules)))
        counted = _instructions(code) if instructions else 0
        costs.append(StageCost(label, min(r[0] for r in rows), min(r[1] for r in rows),
                               rows[0][2], counted))
    return costs


def _print_stages(costs: Sequence[StageCost]) -> None:
    print(f"{'stage (each adds to the ones above)':<50} {'CPU ms':>7} {'RSS MiB':>8} {'+MiB':>6} "
          f"{'modules':>7}" + (f" {'M instr':>8} {'+M':>6}" if costs[0].instructions else ""))
    previous = costs[0]
    for cost in costs:
        line = (f"{cost.label:<50} {cost.cpu_ms:7.1f} {cost.rss / MiB:8.2f} "
                f"{(cost.rss - previous.rss) / MiB:6.2f} {cost.modules:7d}")
        if cost.instructions:
            line += (f" {cost.instructions / 1e6:8.1f}"
                     f" {(cost.instructions - previous.instructions) / 1e6:6.1f}")
        print(line)
        previous = cost


def _site_ms(runs: int) -> List[float]:
    times = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                              capture_output=True, text=True, timeout=60, check=True)
        times.append(_importtime_total(done.stderr, "site") / 1000)
    return times


def _vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        match = re.search(r"^VmRSS:\s+(\d+) kB", handle.read(), re.M)
    assert match is not None
    return int(match.group(1)) * 1024


class IdleAgent(NamedTuple):
    """An idle agent: RSS bytes, threads, wake-ups per second, CPU seconds
    spent until idle."""

    rss: int
    threads: int
    wakeups: float
    cpu: float


def idle_agent(argv: Sequence[str], server: Proc, name: str, log_dir: str, settle: float,
               idle: float) -> IdleAgent:
    """The agent ``argv`` idle: its RSS ``settle`` seconds after the server
    logged its session (its id is ``name``), its thread count, and its
    threads' voluntary sleeps per second over the next ``idle`` seconds."""
    before = server.log_text().count(f"client session started for {name} ")
    agent = Proc(name, argv, log_dir)
    try:
        server.wait_for_log(f"client session started for {name} ", count=before + 1, timeout=60)
        time.sleep(settle)  # idle: what it holds once connected, not what connecting touched
        if not agent.alive():
            raise RuntimeError(f"{name} exited:\n{agent.tail()}")
        rss = _vm_rss(agent.pid)
        start = usage(agent.pid)
        time.sleep(idle)  # the window the wake-ups are counted over
        wakeups = (usage(agent.pid) - start).sleeps / idle
        return IdleAgent(rss, agent.stats().threads, wakeups, start.cpu_seconds)
    finally:
        agent.stop()


def _summary(values: Sequence[float], unit: str, digits: int = 1) -> str:
    return (f"min {min(values):.{digits}f} {unit}, "
            f"median {statistics.median(values):.{digits}f} {unit}, "
            f"max {max(values):.{digits}f} {unit} ({len(values)} runs)")


def _print_agents(name: str, agents: Sequence[IdleAgent]) -> None:
    print(f"idle {name}, VmRSS: {_summary([a.rss / MiB for a in agents], 'MiB')}")
    print(f"{'':6}threads {sorted({a.threads for a in agents})}, wake-ups per second: "
          f"{_summary([a.wakeups for a in agents], '/s')}")
    print(f"{'':6}CPU until idle: {_summary([a.cpu * 1000 for a in agents], 'ms', 0)}")


def _print_imports(args: argparse.Namespace) -> None:
    site = _site_ms(args.runs)
    print(f"bare interpreter, site import:          {_summary(site, 'ms')}")
    for module in ("remotedialer.client", "remotedialer.cli.client"):
        rows = import_times(module, args.runs, args.source)
        print(f"import {module:<24} importtime {_summary([r[0] for r in rows], 'ms')}")
        print(f"{'':31} CPU        {_summary([r[1] for r in rows], 'ms')}; "
              f"{rows[0][2]} modules in sys.modules")
    _print_stages(stage_costs(args.runs, args.source, args.instructions))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_footprint",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per measurement (default 7)")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before reading RSS")
    parser.add_argument("--source", metavar="DIR", help="measure the package in this checkout instead")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds over which an idle agent's wake-ups are counted (default 10)")
    parser.add_argument("--skip-rss", action="store_true", help="only the import times and stages")
    parser.add_argument("--skip-imports", action="store_true", help="only the idle agents")
    parser.add_argument("--instructions", action="store_true",
                        help="count each stage's instructions under callgrind (needs valgrind)")
    args = parser.parse_args(argv)
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind")
    label = args.source or "this checkout"
    print(f"python {sys.version.split()[0]} ({sys.executable}); package: {label}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}: compare minimums")
    _compile_package(args.source)
    if not args.skip_imports:
        _print_imports(args)
    if args.skip_rss:
        return 0
    with tempfile.TemporaryDirectory(prefix="agent-footprint-") as log_dir:
        server = Proc.remotedialer("server", ["server", "--listen", "127.0.0.1:0"], log_dir)
        try:
            port = int(server.wait_for_log(r"listening on http://[^\s]+:(\d+)")[0].group(1))
            url = f"ws://127.0.0.1:{port}/connect"
            python_agent = [sys.executable, "-c", _prelude(args.source)
                            + "from remotedialer.cli import main\nsys.exit(main(sys.argv[1:]))",
                            "client", "--connect", url, "--id", "py-agent"]
            agents = [idle_agent(python_agent, server, "py-agent", log_dir, args.settle, args.idle)
                      for _ in range(args.runs)]
            _print_agents("remotedialer client", agents)
            go_client = go_binary("client")
            if go_client is None:
                print(f"Go client: not built ({GOREF_HINT})")
            else:
                go_agent = [str(go_client), "-connect", url, "-id", "go-agent"]
                agents = [idle_agent(go_agent, server, "go-agent", log_dir, args.settle, args.idle)
                          for _ in range(args.runs)]
                _print_agents("Go client", agents)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
