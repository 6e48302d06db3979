"""Soak: many concurrent connections through a real server and client for a
long time (``python -m benchmarks.soak [--minutes 10] [--connections 100]``).

Starts ``remotedialer server`` (with a ``--forward`` port to an echo server)
and ``remotedialer client`` as processes, then keeps ``--connections`` workers
busy until the time is up. Even workers hold a TCP connection through the
forward and do echo round trips of random sizes (a new connection every 20
round trips); odd workers fetch generated data through the example server's
``/client/foo/http/...`` forwarder (a new tunnel connection per request).
Every byte is checked. RSS, threads and open descriptors of both processes
are sampled throughout; the table shows them after warm-up ("start"), at the
end of the load ("end"), the largest seen, and once the load stopped
("idle"). Exits 1 on any error or if a process died.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from remotedialer.server.process import raise_open_files_limit

from testkit.support import EchoServer

from .procs import BenchError, Proc

__all__ = ["SoakOptions", "SoakResult", "run_soak", "main"]

ECHO_ROUND_TRIPS = 20
MAX_ECHO = 64 * 1024
HTTP_SIZES = (1024, 16 * 1024, 256 * 1024)


@dataclass
class SoakOptions:
    """What to run: length, concurrency, sampling."""

    seconds: float = 600.0
    connections: int = 100
    sample_interval: float = 5.0
    warmup: float = 5.0
    agents: int = 0  # idle fleet agents (testkit.fleet) holding tunnels beside the load


@dataclass
class Sample:
    """One reading of a process."""

    at: float
    rss_bytes: int
    threads: int
    fds: int


@dataclass
class SoakResult:
    """Counts and samples of one soak run."""

    seconds: float = 0.0
    connections: int = 0
    echo_round_trips: int = 0
    http_requests: int = 0
    connections_opened: int = 0
    bytes_checked: int = 0
    errors: int = 0
    first_errors: List[str] = field(default_factory=list)
    samples: Dict[str, List[Sample]] = field(default_factory=dict)
    idle: Dict[str, Sample] = field(default_factory=dict)
    died: List[str] = field(default_factory=list)
    agents: int = 0
    agents_status: Dict[str, object] = field(default_factory=dict)  # the fleet's last status

    @property
    def ok(self) -> bool:
        return self.errors == 0 and not self.died and not self.agents_status.get("dropped")

    def table(self) -> str:
        """The figures as a plain-text table."""
        mib = 1024 * 1024
        lines = [
            f"soak: {self.connections} connections for {self.seconds:.0f} s: "
            f"{self.echo_round_trips} echo round trips, {self.http_requests} HTTP requests, "
            f"{self.connections_opened} connections opened, {self.bytes_checked / mib:.0f} MiB checked, "
            f"{self.errors} errors",
            "",
            f"{'process':<8} {'RSS start':>10} {'RSS end':>10} {'RSS max':>10} {'RSS idle':>10} "
            f"{'thr start':>9} {'thr end':>8} {'thr idle':>8} "
            f"{'fds start':>9} {'fds end':>8} {'fds idle':>8}",
        ]
        for name, samples in self.samples.items():
            if not samples:
                continue
            start = samples[0]
            end = samples[-1]
            idle = self.idle.get(name, end)
            lines.append(
                f"{name:<8} {start.rss_bytes / mib:>8.1f}Mi {end.rss_bytes / mib:>8.1f}Mi "
                f"{max(s.rss_bytes for s in samples) / mib:>8.1f}Mi {idle.rss_bytes / mib:>8.1f}Mi "
                f"{start.threads:>9} {end.threads:>8} {idle.threads:>8} "
                f"{start.fds:>9} {end.fds:>8} {idle.fds:>8}"
            )
        if self.agents:
            status = self.agents_status
            lines.append(f"agents: {self.agents} idle tunnels beside the load: "
                         f"{status.get('dropped', '?')} dropped, {status.get('pongs', '?')} pongs")
        for error in self.first_errors:
            lines.append(f"error: {error}")
        for name in self.died:
            lines.append(f"process died: {name}")
        return "\n".join(lines)


# ------------------------------------------------------------------ targets
def _read_stats(proc: Proc) -> Sample:
    stats = proc.stats()
    fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    return Sample(time.monotonic(), stats.rss_bytes, stats.threads, fds)


# ------------------------------------------------------------------ workers
class Load:
    """The worker threads and their counters."""

    def __init__(self, forward_port: int, http_port: int, web_port: int, result: SoakResult) -> None:
        self.forward_port = forward_port
        self.http_port = http_port
        self.web_port = web_port
        self.result = result
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def error(self, text: str) -> None:
        with self.lock:
            self.result.errors += 1
            if len(self.result.first_errors) < 10:
                self.result.first_errors.append(text)

    def echo_worker(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.forward_port), timeout=30) as sock:
                    with self.lock:
                        self.result.connections_opened += 1
                    for _ in range(ECHO_ROUND_TRIPS):
                        if self.stop.is_set():
                            return
                        message = rng.randbytes(rng.randint(1, MAX_ECHO))
                        sock.sendall(message)
                        got = bytearray()
                        while len(got) < len(message):
                            chunk = sock.recv(65536)
                            if not chunk:
                                raise ConnectionError(f"EOF after {len(got)} of {len(message)} bytes")
                            got += chunk
                        if got != message:
                            raise ValueError("echo mismatch")
                        with self.lock:
                            self.result.echo_round_trips += 1
                            self.result.bytes_checked += 2 * len(message)
            except (OSError, ValueError) as exc:
                if not self.stop.is_set():
                    self.error(f"echo worker {index}: {exc!r}")

    def http_worker(self, index: int) -> None:
        import http.client

        from remotedialer.examples.file_server import generated_bytes

        rng = random.Random(index)
        expected = {size: generated_bytes(size, index) for size in HTTP_SIZES}
        conn: Optional[http.client.HTTPConnection] = None
        while not self.stop.is_set():
            size = rng.choice(HTTP_SIZES)
            path = f"/client/foo/http/127.0.0.1:{self.web_port}/bytes/{size}?seed={index}"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or body != expected[size]:
                    raise ValueError(f"HTTP {response.status}, {len(body)} bytes: {body[:80]!r}")
                with self.lock:
                    self.result.http_requests += 1
                    self.result.connections_opened += 1
                    self.result.bytes_checked += len(body)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if not self.stop.is_set():
                    self.error(f"http worker {index}: {exc!r}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------------- run
def run_soak(options: SoakOptions, log=lambda text: print(text, file=sys.stderr)) -> SoakResult:  # noqa: ANN001
    """Run the soak; blocks for ``options.seconds`` (plus start-up). Raises
    :class:`~benchmarks.procs.BenchError` if the processes cannot start."""
    from remotedialer.examples.file_server import DummyServer

    raise_open_files_limit()
    result = SoakResult(seconds=options.seconds, connections=options.connections)
    echo = EchoServer(backlog=1024, name="soak-echo")
    web = DummyServer(("127.0.0.1", 0))
    web.start()
    procs: List[Proc] = []
    with tempfile.TemporaryDirectory(prefix="remotedialer-soak-") as log_dir:
        try:
            server = Proc.remotedialer(
                "server", ["server", "--listen", "127.0.0.1:0", "--timeout", "30",
                           "--forward", f"127.0.0.1:0=foo:tcp:127.0.0.1:{echo.port}"], log_dir)
            procs.append(server)
            http_port = int(server.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)")[0].group(1))
            forward_port = int(server.wait_for_log(r"forward 127\.0\.0\.1:(\d+)=foo")[0].group(1))
            client = Proc.remotedialer(
                "client", ["client", "--connect", f"ws://127.0.0.1:{http_port}/connect", "--id", "foo"],
                log_dir)
            procs.append(client)
            client.wait_for_log(r"connected to ")
            server.wait_for_log(r"client session started for foo")
            fleet = None
            if options.agents:
                from .procs import FleetProc

                result.agents = options.agents
                fleet = FleetProc(http_port, options.agents, log_dir)
                opened = fleet.wait_opened(timeout=60 + options.agents / 50)
                log(f"soak: {options.agents} agents opened their tunnels in {opened:.1f} s")
            load = Load(forward_port, http_port, web.port, result)
            workers = [
                threading.Thread(
                    target=load.echo_worker if i % 2 == 0 else load.http_worker, args=(i,),
                    name=f"soak-worker-{i}", daemon=True,
                )
                for i in range(options.connections)
            ]
            log(f"soak: {options.connections} connections for {options.seconds:.0f} s "
                f"(server pid {server.pid}, client pid {client.pid})")
            started = time.monotonic()
            for worker in workers:
                worker.start()
            result.samples = {"server": [], "client": []}
            load.stop.wait(min(options.warmup, options.seconds / 4))
            end = started + options.seconds
            while True:
                for name, proc in (("server", server), ("client", client)):
                    if proc.alive():
                        result.samples[name].append(_read_stats(proc))
                    elif name not in result.died:
                        result.died.append(name)
                now = time.monotonic()
                if now >= end or result.died:
                    break
                log(f"  {now - started:6.0f} s: {result.echo_round_trips} round trips, "
                    f"{result.http_requests} requests, {result.errors} errors")
                load.stop.wait(min(options.sample_interval, end - now))
            load.stop.set()
            for worker in workers:
                worker.join(60)
            if fleet is not None:
                result.agents_status = fleet.stop()
            # Idle: give the processes a moment to close what the load left open.
            deadline = time.monotonic() + min(10.0, max(2.0, options.seconds))
            first = {name: samples[0] for name, samples in result.samples.items() if samples}
            while True:
                for name, proc in (("server", server), ("client", client)):
                    if proc.alive():
                        result.idle[name] = _read_stats(proc)
                settled = all(
                    idle.threads <= first[name].threads and idle.fds <= first[name].fds
                    for name, idle in result.idle.items() if name in first
                )
                if settled or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for proc in procs:
                proc.stop()
            web.stop()
            echo.close()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--seconds", type=float, default=None, help="how long to run, in seconds")
    parser.add_argument("--connections", type=int, default=100, help="concurrent connections (default 100)")
    parser.add_argument("--sample-interval", type=float, default=None,
                        help="seconds between samples (default 5, less for short runs)")
    parser.add_argument("--agents", type=int, default=0,
                        help="idle agents (testkit.fleet) holding tunnels on the server throughout")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the soak, print the table on stdout; 0 if there was no error."""
    args = build_parser().parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if seconds <= 0 or args.connections < 1:
        print("need a positive duration and at least one connection", file=sys.stderr)
        return 2
    interval = args.sample_interval or min(5.0, max(0.5, seconds / 10))
    options = SoakOptions(seconds=seconds, connections=args.connections, sample_interval=interval,
                          warmup=min(5.0, seconds / 4), agents=max(0, args.agents))
    try:
        result = run_soak(options)
    except BenchError as exc:
        print(f"soak failed to start: {exc}", file=sys.stderr)
        return 1
    print(result.table())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(asdict(result), handle, indent=2)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
