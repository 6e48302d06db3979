"""A target faster than any tunnel in front of it: the HTTP server the
request benchmarks reach through the tunnels and, in the same run, directly.

A benchmark whose target is slower than the tunnel measures the target
(``remotedialer dummy`` answers about 4,000 req/s at c10, less than either
tunnel). The default is nginx from Debian (``apt-get install nginx-light``),
one worker process, configured in the run's directory: on the project's
2-core machine it answered 25,300 req/s at c10 and 19,900 at c100 on one
core, against 12,400-17,500 and 14,000-14,300 for the Go reference's example
file server (the ``dummy`` program, built beside the Go server and client,
see :mod:`benchmarks.goref`; it logs a line per request) with GOMAXPROCS 1
or 2, in the same run (load 6.7). Without nginx the Go file server is
used. Both serve the files of ``data_dir`` on 127.0.0.1. With neither,
``remotedialer dummy`` (about 4,000 req/s, slower than the tunnels) stands
in, and the label says so. nginx runs with ``sendfile off``, so that the
head and a small body leave in one write as from Go's file server (with
``sendfile`` they are two writes, and ``ssh -R`` lost 45% of its c10 rate to
stalls of about 40 ms: 2,988 against 5,391 req/s in the same run).

A rate through a tunnel above a third of the target's direct rate from the
same run is reported as *limited by the target* (:data:`LIMIT_SHARE`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from .goref import go_binary
from .procs import BenchError, Proc, free_port, wait_listening
from .report import Report

__all__ = [
    "FastTarget", "LIMIT_SHARE", "TARGET_KINDS", "mark_target_limited", "nginx_path", "start_fast_target",
]

#: A tunnel row is limited by the target when its rate exceeds this share of
#: the target's direct rate (the issue's "direct rate at least 3x the tunnel's").
LIMIT_SHARE = 1 / 3

#: ``--target`` choices: ``auto`` is nginx when installed, else Go's file server.
TARGET_KINDS = ("auto", "go", "nginx", "python")


@dataclass
class FastTarget:
    """A running target: its process, port and what it is (for the notes)."""

    proc: Proc
    port: int
    label: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def nginx_path() -> Optional[str]:
    """The nginx binary, if installed."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _nginx_user() -> str:
    """nginx's ``user`` directive keeping the current user when run as root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return ""
    import pwd

    return f"user {pwd.getpwuid(0).pw_name};\n"


def _nginx_config(work_dir: str, data_dir: str, port: int) -> str:
    """Write an nginx config serving ``data_dir`` on 127.0.0.1:``port``; its path."""
    temp = os.path.join(work_dir, "nginx-temp")
    os.makedirs(temp, exist_ok=True)
    path = os.path.join(work_dir, "nginx.conf")
    temp_paths = "".join(f"    {name}_temp_path {temp}/{name};\n"
                         for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(path, "w") as handle:
        handle.write(
            "daemon off;\nmaster_process on;\nworker_processes 1;\n"
            # started as root, nginx's worker runs as nobody, who cannot read
            # the run's private (0700) temporary directory: keep our user
            f"{_nginx_user()}"
            f"pid {work_dir}/nginx.pid;\nerror_log {work_dir}/nginx-error.log warn;\n"
            "events { worker_connections 4096; }\n"
            # sendfile off: the head and a small body go out in one write,
            # as from Go's file server and most application servers (with
            # sendfile they are two, and ssh -R then stalls on delayed ACKs)
            "http {\n    access_log off;\n    sendfile off;\n    tcp_nodelay on;\n"
            "    keepalive_requests 100000000;\n    keepalive_timeout 60s;\n"
            f"{temp_paths}"
            f"    server {{\n        listen 127.0.0.1:{port};\n        root {data_dir};\n    }}\n"
            "}\n"
        )
    return path


def _start_on_free_port(name: str, argv_for: Callable[[int], Tuple[List[str], str]],
                        log_dir: str) -> FastTarget:
    last: Optional[BenchError] = None
    for _attempt in range(3):  # neither program reports a port it bound to 0
        port = free_port()
        argv, label = argv_for(port)
        proc = Proc(name, argv, log_dir)
        try:
            wait_listening(proc, port)
            return FastTarget(proc, port, label)
        except BenchError as exc:
            proc.stop()
            last = exc
    raise BenchError(f"{name} did not start: {last}")


def start_fast_target(kind: str, data_dir: str, log_dir: str) -> FastTarget:
    """Start the target ``kind`` (one of :data:`TARGET_KINDS`) serving
    ``data_dir``; blocks until it accepts. ``auto`` is nginx, else Go's
    file server, else the Python file server, saying so in the label.
    Raises :class:`BenchError` when the kind asked for is not installed."""
    go = go_binary("dummy")
    nginx = nginx_path()
    fallback = ""
    if kind == "auto":
        kind = "nginx" if nginx is not None else "go" if go is not None else "python"
        if kind == "python":
            fallback = (" -- no fast target here (apt-get install nginx-light, or build the Go "
                        "reference, see benchmarks/goref.py): the rates through the tunnels may be "
                        "this target's, see the limited-by-the-target notes")
    if kind == "go":
        if go is None:
            raise BenchError("the Go reference's dummy file server is not built")
        binary = str(go)
        # it serves its working directory: sh changes there and execs it (same pid)
        return _start_on_free_port("http-target", lambda port: (
            ["sh", "-c", 'cd "$0" && exec "$1" -listen "$2"', data_dir, binary, f"127.0.0.1:{port}"],
            "Go reference's example file server (dummy: net/http FileServer, one log line per request)"),
            log_dir)
    if kind == "nginx":
        if nginx is None:
            raise BenchError("nginx is not installed (apt-get install nginx-light)")
        binary = nginx
        return _start_on_free_port("http-target", lambda port: (
            [binary, "-c", _nginx_config(log_dir, data_dir, port), "-p", log_dir],
            "nginx (1 worker process, access log off, head and body in one write)"), log_dir)
    if kind == "python":
        proc = Proc.remotedialer("http-target", ["dummy", "--listen", "127.0.0.1:0", data_dir], log_dir)
        port = int(proc.wait_for_log(r"listening on http://[^\s]+:(\d+)")[0].group(1))
        return FastTarget(proc, port, "remotedialer dummy (the slow Python file server)" + fallback)
    raise BenchError(f"unknown target {kind!r}: one of {', '.join(TARGET_KINDS)}")


def mark_target_limited(report: Report, direct: str = "direct") -> List[str]:
    """Note every request-rate row where a path's median exceeds
    :data:`LIMIT_SHARE` of the direct path's median (same row, same run):
    that figure is limited by the target. Returns the notes."""
    marked = []
    for row in report.rows:
        if row.unit != "req/s":
            continue
        target = row.median(direct)
        if not target:
            continue
        for path in row.values:
            rate = row.median(path)
            if path != direct and rate is not None and rate > target * LIMIT_SHARE:
                text = (f"{row.workload} {path}: {rate:.0f} req/s is more than a third of the "
                        f"target's direct {target:.0f} req/s: limited by the target")
                report.note(text)
                marked.append(text)
    return marked
