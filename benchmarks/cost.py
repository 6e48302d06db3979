"""Cost per request against a fast target: ``python -m benchmarks.cost``.

Every stack runs in the same run, to the same target (:mod:`benchmarks.fast_target`:
nginx, else the Go reference's file server): the target directly, the Python
example server + client (``tunnel``), the Go reference's server + client
(``go``) and their pairings, the Python server under gunicorn gthread as the
fallback recipe (``gunicorn``) and under our worker (``worker``:
``gunicorn -k remotedialer.workers.RemotedialerWorker``), and with
``--forward`` the raw forward beside ``ssh -R``. The runs alternate between
the columns; each cell is the median of ``--runs`` runs with its range. A
row whose rate through a tunnel exceeds a third of the target's direct rate
in the same run is marked *limited by the target* in the notes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from remotedialer.server.process import raise_open_files_limit

from .fast_target import TARGET_KINDS, FastTarget, mark_target_limited, start_fast_target
from .loadgen import wrk_path
from .procs import BenchError, Proc, wait_until
from .report import Report
from .sshd import SSHReverseForward
from .stacks import GO, WORKER, Route, route_label, start_stacks
from .workloads import Options, get_ok, request_rows

__all__ = ["main", "ratio_notes"]

FILE = "1k.bin"


def ratio_notes(report: Report, pairs: Sequence[Tuple[str, str]]) -> None:
    """``a/b`` of the request-rate and CPU medians for each pair present."""
    for row in report.rows:
        if row.unit != "req/s" and "server+client" not in row.metric:
            continue
        for first, second in pairs:
            top, bottom = row.median(first), row.median(second)
            if top is not None and bottom:
                report.note(f"{row.workload} {row.metric}: {first}/{second} = {top / bottom:.2f}")


def _run(args: argparse.Namespace, report: Report, progress: Callable[[str], None]) -> None:
    options = Options(runs=args.runs, request_seconds=args.seconds,
                      concurrency=[int(c) for c in args.concurrency.split(",") if c.strip()],
                      use_wrk=not args.no_wrk, progress=progress)
    procs: Dict[str, Proc] = {}
    ssh: Optional[SSHReverseForward] = None
    with tempfile.TemporaryDirectory(prefix="remotedialer-cost-") as work:
        data = os.path.join(work, "data")
        os.makedirs(data)
        with open(os.path.join(data, FILE), "wb") as handle:
            handle.write(os.urandom(1024))
        try:
            target: FastTarget = start_fast_target(args.target, data, work)
            procs[target.proc.name] = target.proc
            report.note(f"target: {target.label}")
            server_args = ["server", "--listen", "127.0.0.1:0"]
            if args.forward:
                server_args += ["--forward", f"127.0.0.1:0=foo:tcp:{target.address}"]
            server = Proc.remotedialer("server", server_args, work)
            procs["server"] = server
            server_port = int(server.wait_for_log(r"listening on http://[^\s]+:(\d+)")[0].group(1))
            connect = f"ws://127.0.0.1:{server_port}/connect"
            client = Proc.remotedialer("client", ["client", "--connect", connect, "--id", "foo"], work)
            procs["client"] = client
            routes: Dict[str, Route] = {
                "tunnel": Route(f"http://127.0.0.1:{server_port}/client/foo/http/{target.address}/",
                                server, client)}
            notes: List[str] = []
            if not args.forward_only:
                routes.update(start_stacks(work, server, server_port, target.address, not args.no_go,
                                           not args.no_gunicorn, procs, notes.append,
                                           want_worker=not args.no_worker))
            if not args.pairings:
                for path in ("go-srv+py-cli", "py-srv+go-cli"):
                    routes.pop(path, None)
            routes["direct"] = Route(f"http://{target.address}/")
            for name, route in routes.items():
                url = route.url(FILE)
                wait_until(lambda: get_ok(url), 20, f"the {name} path to answer", 0.05)  # noqa: B023
            for note in notes:
                report.note(note)
            for path in routes:
                report.note(f"{path}: {route_label(path)}")
            tool = "wrk" if options.use_wrk and wrk_path() else "built-in Python load generator"
            report.note(f"request rates measured with {tool}; {options.runs} alternating runs "
                        f"of {options.request_seconds:g} s per cell")
            if not args.forward_only:
                request_rows(options, report, "1 KiB GET", routes, {}, {})
            if args.forward:
                forward_port = int(server.wait_for_log(
                    rf"forward 127\.0\.0\.1:(\d+)=\S*{target.address}\b")[0].group(1))
                forward_routes = {"forward": Route(f"http://127.0.0.1:{forward_port}/", server, client)}
                if not args.no_ssh:
                    ssh = SSHReverseForward(work, target.port)
                    try:
                        ssh_port = ssh.start()
                        daemon, ssh_client = ssh.procs[-2:]
                        forward_routes["ssh-R"] = Route(f"http://127.0.0.1:{ssh_port}/", daemon, ssh_client,
                                                        server_tree=True)
                    except (BenchError, OSError) as exc:
                        report.note(f"ssh -R column skipped: {exc}")
                forward_routes["direct"] = routes["direct"]
                for name, route in forward_routes.items():
                    url = route.url(FILE)
                    wait_until(lambda: get_ok(url), 20, f"the {name} path to answer", 0.05)  # noqa: B023
                request_rows(options, report, "raw forward 1 KiB GET", forward_routes, {}, {})
        finally:
            if ssh is not None:
                ssh.stop()
            for proc in reversed(list(procs.values())):
                proc.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGET_KINDS, default="auto",
                        help="the target behind the tunnels (default: nginx when installed, "
                             "else Go's file server)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per cell (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one load run (default 5)")
    parser.add_argument("--concurrency", default="1,10,100", help="connections (default 1,10,100)")
    parser.add_argument("--forward", action="store_true", help="also the raw forward beside ssh -R")
    parser.add_argument("--forward-only", action="store_true",
                        help="only the raw forward, ssh -R and the target (implies --forward)")
    parser.add_argument("--pairings", action="store_true", help="also Go server + Python client and back")
    parser.add_argument("--no-go", action="store_true", help="leave out the Go reference stack")
    parser.add_argument("--no-gunicorn", action="store_true", help="leave out gunicorn gthread")
    parser.add_argument("--no-worker", action="store_true", help="leave out gunicorn with our worker")
    parser.add_argument("--no-ssh", action="store_true", help="leave out ssh -R")
    parser.add_argument("--no-wrk", action="store_true", help="built-in load generator, not wrk")
    parser.add_argument("--json", metavar="PATH", help="write every value as JSON")
    parser.add_argument("--rst", metavar="PATH", help="write the tables as reStructuredText")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run; the tables on stdout, progress on stderr."""
    args = build_parser().parse_args(argv)
    args.forward = args.forward or args.forward_only
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    raise_open_files_limit()
    report = Report()
    failed = False
    try:
        _run(args, report, lambda text: print(text, file=sys.stderr, flush=True))
    except (BenchError, OSError, RuntimeError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        report.note(f"aborted: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        failed = True
    mark_target_limited(report)
    ratio_notes(report, [("tunnel", GO), (WORKER, GO), ("gunicorn", GO), ("forward", "ssh-R")])
    for row in report.rows:
        if row.unit == "req/s" and row.median("direct"):
            print(f"{row.workload}: target direct {statistics.median(row.values['direct']):.0f} req/s",
                  file=sys.stderr)
    print(report.table())
    report.save(args.json, args.rst)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
