"""What an agent costs on the machine it runs on (issue 24): the time to
import the client side, and the RSS of an idle ``remotedialer client``
connected to a server, with Go's client beside it.

* import: ``python -X importtime -c 'import remotedialer.cli.client'``, the
  cumulative time of that one import, and the CPU time of the same import
  without ``-X importtime`` (``time.process_time`` around it); ``--runs`` fresh interpreters each, the
  minimum and the median printed (the minimum is the one to compare on a
  loaded machine: waiting for a core only ever adds). A bare interpreter's
  ``site`` import is printed beside it for scale.
* idle RSS: a Python server (``remotedialer server``), then ``--runs`` times
  an agent (``remotedialer client``, then Go's client when built, see
  :mod:`benchmarks.goref`) connects, waits ``--settle`` seconds after the
  server logged its session, and ``VmRSS`` is read from
  ``/proc/PID/status``.

``--source DIR`` measures the package in another checkout (another commit:
``git archive COMMIT | tar -x -C DIR``) with this interpreter and its
installed dependencies, for before/after numbers from one run.

Run: ``python -m benchmarks.agent_footprint [--runs 7] [--source DIR]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

from .goref import GOREF_HINT, go_binary
from .procs import Proc

__all__ = ["import_times", "idle_rss", "main"]

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


def idle_rss(argv: Sequence[str], server: Proc, name: str, log_dir: str, settle: float) -> int:
    """RSS in bytes of the agent ``argv``, ``settle`` seconds after the
    server logged its session (its id is ``name``)."""
    before = server.log_text().count(f"client session started for {name} ")
    agent = Proc(name, argv, log_dir)
    try:
        server.wait_for_log(f"client session started for {name} ", count=before + 1, timeout=60)
        time.sleep(settle)  # idle: what it holds once connected, not what connecting touched
        if not agent.alive():
            raise RuntimeError(f"{name} exited:\n{agent.tail()}")
        return _vm_rss(agent.pid)
    finally:
        agent.stop()


def _summary(values: Sequence[float], unit: str, digits: int = 1) -> str:
    return (f"min {min(values):.{digits}f} {unit}, "
            f"median {statistics.median(values):.{digits}f} {unit}, "
            f"max {max(values):.{digits}f} {unit} ({len(values)} runs)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agent_footprint",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per measurement (default 7)")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before reading RSS")
    parser.add_argument("--source", metavar="DIR", help="measure the package in this checkout instead")
    parser.add_argument("--skip-rss", action="store_true", help="only the import times")
    args = parser.parse_args(argv)
    label = args.source or "this checkout"
    print(f"python {sys.version.split()[0]} ({sys.executable}); package: {label}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}: compare minimums")
    site = _site_ms(args.runs)
    print(f"bare interpreter, site import:          {_summary(site, 'ms')}")
    for module in ("remotedialer.client", "remotedialer.cli.client"):
        rows = import_times(module, args.runs, args.source)
        print(f"import {module:<24} importtime {_summary([r[0] for r in rows], 'ms')}")
        print(f"{'':31} CPU        {_summary([r[1] for r in rows], 'ms')}; "
              f"{rows[0][2]} modules in sys.modules")
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
            rss = [idle_rss(python_agent, server, "py-agent", log_dir, args.settle) / MiB
                   for _ in range(args.runs)]
            print(f"idle remotedialer client, VmRSS:        {_summary(rss, 'MiB')}")
            go_client = go_binary("client")
            if go_client is None:
                print(f"Go client: not built ({GOREF_HINT})")
            else:
                go_agent = [str(go_client), "-connect", url, "-id", "go-agent"]
                rss = [idle_rss(go_agent, server, "go-agent", log_dir, args.settle) / MiB
                       for _ in range(args.runs)]
                print(f"idle Go client, VmRSS:                  {_summary(rss, 'MiB')}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
