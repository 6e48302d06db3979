"""The ``python -m benchmarks`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

from remotedialer.cli import OneLineErrorParser
from remotedialer.server.process import raise_open_files_limit

from .fast_target import TARGET_KINDS
from .procs import BenchError
from .report import Report
from .workloads import WORKLOADS, Options, run_workloads

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(  # `remotedialer bench` errors are one line, as the other commands'
        prog="python -m benchmarks",
        description="Benchmark remotedialer's example server + client against the Go reference, ssh -R "
                    "and the direct path, side by side in one run.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 run, small sizes, 1 s load runs, 200 scale connections")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 5, quick 1)")
    parser.add_argument("--only", action="append", choices=WORKLOADS, metavar="WORKLOAD",
                        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)} "
                             "(agents runs only when named)")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="write every value as JSON")
    parser.add_argument("--rst", metavar="PATH", help="write the table as a reStructuredText list-table")
    parser.add_argument("--download-mib", type=int, default=None, help="download size in MiB (default 1024)")
    parser.add_argument("--forward-mib", type=int, default=None, help="forward download MiB (default 256)")
    parser.add_argument("--seconds", type=float, default=None, help="length of one load run (default 5)")
    parser.add_argument("--concurrency", default=None, help="load concurrencies (default 1,10,100)")
    parser.add_argument("--connections", type=int, default=None, help="scale connections (default 10000)")
    parser.add_argument("--no-wrk", action="store_true", help="built-in load generator, not wrk")
    parser.add_argument("--no-ssh", action="store_true", help="skip the ssh -R comparison")
    parser.add_argument("--agents", default=None, metavar="N,N,...",
                        help="agents workload: tunnel counts (default 1000,3000,10000)")
    parser.add_argument("--agents-kinds", default=None, metavar="KIND,...",
                        help="agents workload: servers (default python,python-parked,go)")
    parser.add_argument("--agents-seconds", type=float, default=None,
                        help="agents workload: seconds the tunnels are held (default 75)")
    parser.add_argument("--no-go", action="store_true",
                        help="skip the Go reference stacks (run when built: see benchmarks/goref.py)")
    parser.add_argument("--no-gunicorn", action="store_true", help="skip the gunicorn gthread stack")
    parser.add_argument("--no-worker", action="store_true",
                        help="skip gunicorn with the project's worker class (remotedialer.workers)")
    parser.add_argument("--target", choices=TARGET_KINDS, default="auto",
                        help="the HTTP server behind the tunnels: nginx when installed, else Go's example "
                             "file server (auto, the default); python is remotedialer dummy, slower than "
                             "the tunnels")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks; print the table on stdout, progress on stderr."""
    args = build_parser().parse_args(argv)
    options = Options.quick_options() if args.quick else Options()
    if args.runs is not None:
        if args.runs < 1:
            print("--runs must be at least 1", file=sys.stderr)
            return 2
        options.runs = args.runs
    if args.download_mib is not None:
        options.download_bytes = args.download_mib << 20
    if args.forward_mib is not None:
        options.forward_bytes = args.forward_mib << 20
    if args.seconds is not None:
        options.request_seconds = args.seconds
    if args.concurrency:
        options.concurrency = [int(part) for part in args.concurrency.split(",") if part.strip()]
    if args.connections is not None:
        options.scale_connections = args.connections
    options.use_wrk = not args.no_wrk
    if args.agents:
        options.agents.counts = [int(part) for part in args.agents.split(",") if part.strip()]
    if args.agents_kinds:
        options.agents.kinds = [part.strip() for part in args.agents_kinds.split(",") if part.strip()]
    if args.agents_seconds is not None:
        options.agents.seconds = args.agents_seconds
        options.agents.idle_window = min(options.agents.idle_window, args.agents_seconds / 2)
    options.agents.use_wrk = options.use_wrk
    options.ssh = not args.no_ssh
    options.go = not args.no_go
    options.gunicorn = not args.no_gunicorn
    options.worker = not args.no_worker
    options.target = args.target
    raise_open_files_limit()
    report = Report()
    started = time.monotonic()
    only: List[str] = args.only or []
    failed = False
    try:
        run_workloads(options, only, report)
    except (BenchError, OSError, RuntimeError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        report.note(f"aborted: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        failed = True
    report.meta["seconds"] = round(time.monotonic() - started, 1)
    print(report.table())
    report.save(args.json, args.rst)
    if args.chart:
        try:
            report.chart(args.chart)
        except ImportError:
            print("--chart needs matplotlib (the bench extra): pip install matplotlib", file=sys.stderr)
            return 1
    return 1 if failed else 0
