"""The ``agents`` workload: many tunnels on one server process (issue 12).

For each count ``N`` and each server (the Python example server, the same
with idle tunnels parked on the shared poller, ``--park-idle``, column
``python-parked``, and the Go example server of rancher/remotedialer when it
is built, see :mod:`benchmarks.goref`), in one run:

1. start the server, ``remotedialer dummy`` and one real ``remotedialer
   client`` (key ``foo``), and measure the 1 KiB GET rate through that
   client with no other tunnel (wrk or the built-in generator, 10
   connections);
2. start :mod:`testkit.fleet`: ``N`` agents from one process, each
   pinging every 5 s, the first three answering CONNECTs; the time until
   all are open gives the tunnels accepted per second;
3. once they are open: the server's CPU over an idle window (the agents
   pinging and nothing else happening) as a percentage of one core, its RSS
   growth per tunnel (and for the Python servers, what it is made of:
   :mod:`benchmarks.memory_map`), the GET rate again with the ``N`` tunnels idle, and a
   GET routed to ``agent-0`` through the server's forwarder;
4. hold the tunnels for the rest of ``seconds`` and count what dropped:
   tunnels closed by the server (the fleet's ``dropped``), handshakes
   refused, pongs missing, and whether the real client had to reconnect.

Run on its own with ``python -m benchmarks --only agents --agents 1000,3000``
(``--agents-seconds`` to hold longer). CPU seconds come from ``/proc``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .goref import GOREF_HINT, go_binary
from .loadgen import run_load
from .memory_map import memory_map
from .procs import BenchError, FleetProc, Proc, ProcStats, free_port, wait_until
from .report import Report

__all__ = ["AgentsOptions", "agents_workload"]

KiB = 1024
GET_CONCURRENCY = 10

ProgressFn = Callable[[str], None]


def _num(record: Dict[str, object], key: str) -> float:
    value = record.get(key, float("nan"))
    return float(value) if isinstance(value, (int, float)) else float("nan")


@dataclass
class AgentsOptions:
    """How many agents, for how long."""

    counts: Sequence[int] = (1000, 3000, 10000)
    #: Servers measured: ``python``, ``python-parked`` (``--park-idle``),
    #: ``go`` (when built).
    kinds: Sequence[str] = ("python", "python-parked", "go")
    #: Seconds the tunnels are held after all are open (the target is 5 minutes).
    seconds: float = 75.0
    #: Seconds of the idle CPU window (within ``seconds``).
    idle_window: float = 30.0
    #: Seconds of each request-rate run.
    request_seconds: float = 5.0
    use_wrk: bool = True


def _get(url: str) -> bytes:
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=15)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"GET {url}: HTTP {response.status} {body[:200]!r}")
        return body
    finally:
        conn.close()


class ServerUnderTest:
    """One server (Python or Go) with the file server and the real client."""

    def __init__(self, kind: str, log_dir: str, data_dir: str) -> None:
        self.kind = kind
        self.log_dir = log_dir
        self.procs: Dict[str, Proc] = {}
        dummy = Proc.remotedialer("dummy", ["dummy", "--listen", "127.0.0.1:0", data_dir], log_dir)
        self.procs["dummy"] = dummy
        self.dummy_port = int(dummy.wait_for_log(r"listening on http://[^\s]+:(\d+)")[0].group(1))
        if kind == "go":
            binary = go_binary("server")
            if binary is None:
                raise BenchError(f"no Go server: {GOREF_HINT}")
            self.port = free_port()
            server = Proc("server-go", [str(binary), "-listen", f"127.0.0.1:{self.port}"], log_dir)
            self.procs["server"] = server
            wait_until(lambda: _port_open(self.port) or not server.alive(), 20, "the Go server to listen")
        else:
            park = ["--park-idle"] if kind == "python-parked" else []
            args = ["server", "--listen", "127.0.0.1:0", *park]
            server = Proc.remotedialer(f"server-{kind}", args, log_dir)
            self.procs["server"] = server
            self.port = int(server.wait_for_log(r"listening on http://[^\s]+:(\d+)")[0].group(1))
        client = Proc.remotedialer(f"client-{kind}", [
            "client", "--connect", f"ws://127.0.0.1:{self.port}/connect", "--id", "foo"], log_dir)
        self.procs["client"] = client
        client.wait_for_log(r"connected to ")
        wait_until(lambda: _get_ok(self.get_url()), 20, "the tunnel to answer", 0.05)

    def get_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/client/foo/http/127.0.0.1:{self.dummy_port}/1k.bin"

    def agent_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port}/client/agent-{index}/http/127.0.0.1:9/routed"

    def server_stats(self) -> ProcStats:
        return self.procs["server"].stats()

    def client_connects(self) -> int:
        return self.procs["client"].log_text().count("connected to ")

    def stop(self) -> None:
        """Stop every process, even if stopping one fails (a 10,000-thread
        server left running loads the machine for everyone)."""
        for name in ("client", "server", "dummy"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                try:
                    proc.stop()
                except Exception as exc:
                    print(f"stopping {name} failed: {exc}", file=sys.stderr)


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _get_ok(url: str) -> bool:
    try:
        _get(url)
        return True
    except (OSError, BenchError):
        return False


def _request_rate(url: str, options: AgentsOptions, runs: int) -> List[float]:
    run_load(url, GET_CONCURRENCY, 1.0, options.use_wrk)  # warm-up
    rates = []
    for _ in range(runs):
        result = run_load(url, GET_CONCURRENCY, options.request_seconds, options.use_wrk)
        rates.append(result.requests_per_second)
    return rates


def _one(kind: str, count: int, options: AgentsOptions, runs: int, report: Report,
         log_dir: str, data_dir: str, progress: ProgressFn) -> None:
    """Everything measured for ``count`` agents on one server."""
    workload = f"agents {count}"
    server = ServerUnderTest(kind, log_dir, data_dir)
    fleet: Optional[FleetProc] = None
    try:
        base_rates = _request_rate(server.get_url(), options, runs)
        progress(f"[{workload}] {kind}: 1 KiB GET with no agents "
                 + ", ".join(f"{rate:.0f}" for rate in base_rates) + " req/s")
        before = server.server_stats()
        map_before = memory_map(server.procs["server"].pid) if kind != "go" else None
        fleet = FleetProc(server.port, count, log_dir, f"fleet-{kind}-{count}")
        open_seconds = fleet.wait_opened(timeout=60 + count / 50)
        opened_at = time.monotonic()
        progress(f"[{workload}] {kind}: {count} open in {open_seconds:.1f}s")
        time.sleep(min(5.0, options.seconds / 4))  # past the first pings (a span, not synchronisation)
        cpu_start, window_start = server.server_stats().cpu_seconds, time.monotonic()
        fleet_cpu_start = fleet.proc.stats().cpu_seconds
        time.sleep(options.idle_window)  # the idle window being measured
        window = time.monotonic() - window_start
        idle_cpu = (server.server_stats().cpu_seconds - cpu_start) / window * 100
        fleet_cpu = (fleet.proc.stats().cpu_seconds - fleet_cpu_start) / window * 100
        after = server.server_stats()
        rss_per = (after.rss_bytes - before.rss_bytes) / count / KiB
        map_after = memory_map(server.procs["server"].pid) if map_before is not None else None
        loaded_rates = _request_rate(server.get_url(), options, runs)
        routed = _get(server.agent_url(0)) == b"ok"
        rest = options.seconds - (time.monotonic() - opened_at)
        if rest > 0:
            time.sleep(rest)  # the hold being measured
        held = time.monotonic() - opened_at
        final = fleet.stop()
        fleet = None
        reconnects = server.client_connects() - 1
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
    base = sorted(base_rates)[len(base_rates) // 2]
    pings, pongs = _num(final, "pings"), _num(final, "pongs")
    for metric, value in (("tunnels dropped by the server", _num(final, "dropped")),
                          ("handshakes refused", _num(final, "failed")),
                          ("pings not answered (in flight at the end)", pings - pongs)):
        report.row(workload, metric, "count", "0", False).add(kind, value)
    report.row(workload, "longest wait for a pong", "s", "", False).add(kind, _num(final, "max_pong_wait"))
    report.row(workload, "real client reconnects", "count", "0", False).add(kind, float(reconnects))
    report.row(workload, "server CPU, agents pinging", "% core", "<= Go", False).add(kind, idle_cpu)
    report.row(workload, "fleet CPU (agents' process)", "% core", "", False).add(kind, fleet_cpu)
    report.row(workload, "server RSS per tunnel", "KiB", "<= Go (26)", False).add(kind, rss_per)
    if map_before is not None and map_after is not None:
        for part, kib in map_after.per(map_before, count).items():
            report.row(workload, f"server RSS per tunnel: {part}", "KiB", "", False).add(kind, kib)
    report.row(workload, "server RSS with all open", "MiB", "", False).add(kind, after.rss_bytes / (1 << 20))
    report.row(workload, "server threads with all open", "count", "", False).add(kind, float(after.threads))
    report.row(workload, "tunnels accepted", "per s", ">= 1000").add(kind, count / open_seconds)
    rps_row = report.row(workload, "1 KiB GET c10 with N idle", "req/s", "")
    ratio_row = report.row(workload, "GET rate with N idle / with none", "%", ">= 90")
    for rate in loaded_rates:
        rps_row.add(kind, rate)
        ratio_row.add(kind, rate / base * 100)
    report.row(workload, "1 KiB GET c10 with no agents", "req/s", "").add(kind, base)
    if not routed:
        report.note(f"{workload} {kind}: the GET routed to agent-0 did not come back")
    progress(f"[{workload}] {kind}: held {held:.0f}s, dropped {final.get('dropped')}, refused "
             f"{final.get('failed')}, pongs {pongs:.0f}/{pings:.0f}, server CPU {idle_cpu:.1f}% "
             f"(fleet {fleet_cpu:.1f}%), RSS/tunnel {rss_per:.1f} KiB, "
             f"accepted {count / open_seconds:.0f}/s, "
             f"GET {min(loaded_rates):.0f}-{max(loaded_rates):.0f} vs {base:.0f} req/s, "
             f"client reconnects {reconnects}, routed {routed}")


def agents_workload(options: AgentsOptions, runs: int, report: Report,
                    progress: ProgressFn = lambda text: print(text, file=sys.stderr, flush=True)) -> None:
    """Run every count on the Python server and, when built, the Go server."""
    kinds = [kind for kind in options.kinds if kind != "go" or go_binary("server")]
    if "go" in options.kinds and "go" not in kinds:
        report.note(f"agents: Go column skipped ({GOREF_HINT})")
    report.note(f"agents: held {options.seconds:.0f}s after all open, idle CPU over "
                f"{options.idle_window:.0f}s, GET rates {runs} run(s) of {options.request_seconds:.0f}s "
                f"at c{GET_CONCURRENCY}, {os.cpu_count()} CPUs shared with the agents' process")
    with tempfile.TemporaryDirectory(prefix="remotedialer-agents-") as log_dir:
        data_dir = os.path.join(log_dir, "data")
        os.makedirs(data_dir)
        with open(os.path.join(data_dir, "1k.bin"), "wb") as handle:
            handle.write(os.urandom(1024))
        for count in options.counts:
            for kind in kinds:
                _one(kind, count, options, runs, report, log_dir, data_dir, progress)
    keys = max(options.counts)
    scrape = report.row(f"agents {keys}", "/metrics scrape with N client keys (CPU)", "s", "<= 1", False)
    for seconds in metrics_scrape_seconds(keys, max(runs, 3)):
        scrape.add("python", seconds)
    websocket_row = report.row("agents (in process)", "CPU per ping via ServerWebSocket", "us", "", False)
    bare_row = report.row("agents (in process)", "CPU per ping via a bare recv/send thread", "us", "", False)
    for _ in range(max(runs, 3)):
        through_websocket, bare = ping_cpu_microseconds()
        websocket_row.add("python", through_websocket)
        bare_row.add("python", bare)


def metrics_scrape_seconds(count: int, runs: int) -> List[float]:
    """CPU seconds of one ``/metrics`` scrape (the endpoint, as a Prometheus
    server asks: OpenMetrics, gzip) with ``count`` client keys, once per
    run (:mod:`benchmarks.metrics_scrape`)."""
    from .metrics_scrape import PROMETHEUS_SCRAPE, scrape_cpu_seconds  # not at import: it is also a script

    return scrape_cpu_seconds(count, runs)[PROMETHEUS_SCRAPE]


def ping_cpu_microseconds(pings: int = 20000) -> Tuple[float, float]:
    """CPU per ping answered, in one process over a socketpair, both ends
    counted: ``(through ServerWebSocket, through a bare recv/send thread)``.
    The difference is what the frame handling costs; the agents workload's
    figure minus this is thread wake-up and GIL hand-off."""
    import resource
    import socket
    import threading

    from remotedialer.frames import OP_PING, encode_masked_frame
    from remotedialer.transports.base import TransportClosed
    from remotedialer.transports.wsgi import ServerWebSocket

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def through_websocket(sock: socket.socket) -> None:
        try:
            ServerWebSocket(sock, 1 << 20).receive()  # answers pings until EOF
        except TransportClosed:
            pass

    def bare(sock: socket.socket) -> None:
        while sock.recv(256):
            sock.sendall(b"\x8a\x00")

    ping = bytes(encode_masked_frame(OP_PING, b""))
    results = []
    for answerer in (through_websocket, bare):
        near, far = socket.socketpair()
        thread = threading.Thread(target=answerer, args=(near,), daemon=True)
        thread.start()
        for _ in range(500):  # warm-up
            far.sendall(ping)
            far.recv(16)
        started = cpu()
        for _ in range(pings):
            far.sendall(ping)
            far.recv(16)
        results.append((cpu() - started) / pings * 1e6)
        far.close()  # EOF ends the answerer
        thread.join(10)
        near.close()
    return results[0], results[1]
