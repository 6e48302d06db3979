"""The workloads: each measures one thing on the tunnel and on the direct path
(no tunnel) in the same run, and adds its figures to a :class:`Report`.

:class:`Setup` starts everything as real processes through the command line:
``remotedialer dummy`` (the file server), ``remotedialer server`` (with
``--forward`` ports when the server has that option) and ``remotedialer
client``, plus the scale workload's TCP target.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .agents import AgentsOptions, agents_workload
from .loadgen import LoadResult, run_load, wrk_path
from .procs import BenchError, Proc, ProcStats, Usage, wait_until
from .report import Report
from .fast_target import mark_target_limited, start_fast_target
from .sshd import SSHReverseForward
from .stacks import Route, start_stacks

__all__ = ["Options", "Setup", "WORKLOADS", "run_workloads", "request_rows", "get_ok"]

MiB = 1 << 20
GiB = 1 << 30

#: Targets of issue 13, shown beside the figures (all in the same run: "go" is
#: the Go reference started by this benchmark, not a remembered figure).
TARGETS = {
    "download MB/s": ">= 2x go",
    "rps": "tunnel >= 1.0x go", "p50 c1": "tunnel <= go", "cpu": "tunnel <= go",
    "gunicorn c10": "gunicorn >= 0.8x go", "forward rps": "forward >= 1.0x ssh-R",
}


@dataclass
class Options:
    """What to run and how big."""

    runs: int = 5
    quick: bool = False
    download_bytes: int = GiB
    forward_bytes: int = 256 * MiB
    request_seconds: float = 5.0
    concurrency: Sequence[int] = (1, 10, 100)
    scale_connections: int = 10000
    use_wrk: bool = True
    ssh: bool = True
    agents: AgentsOptions = field(default_factory=AgentsOptions)
    go: bool = True
    gunicorn: bool = True
    worker: bool = True  # gunicorn with remotedialer.workers.RemotedialerWorker
    target: str = "auto"  # the HTTP target (fast_target.TARGET_KINDS)
    progress: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)

    @classmethod
    def quick_options(cls) -> "Options":
        return cls(runs=1, quick=True, download_bytes=16 * MiB, forward_bytes=16 * MiB,
                   request_seconds=1.0, scale_connections=200,
                   agents=AgentsOptions(counts=(200,), seconds=15.0, idle_window=5.0, request_seconds=1.0))


def _cli_has_forward() -> bool:
    """Whether ``remotedialer server`` has the ``--forward`` option yet."""
    done = subprocess.run([sys.executable, "-m", "remotedialer.cli", "server", "--help"],
                          capture_output=True, text=True, timeout=60)
    return "--forward" in done.stdout


class Setup:
    """The processes and files of one benchmark run (a context manager)."""

    def __init__(self, options: Options, want_forward: bool, want_scale: bool,
                 want_stacks: bool = False) -> None:
        self.options = options
        self.tmp = tempfile.TemporaryDirectory(prefix="remotedialer-bench-")
        self.dir = self.tmp.name
        self.data_dir = os.path.join(self.dir, "data")
        self.procs: Dict[str, Proc] = {}
        self.want_forward = want_forward
        self.want_scale = want_scale
        self.want_stacks = want_stacks
        self.stacks: Dict[str, Route] = {}
        self.notes: List[str] = []
        self.has_forward = False
        self.dummy_port = self.server_port = self.target_port = 0
        self.forward_port = self.scale_port = 0
        self.ssh: Optional[SSHReverseForward] = None
        self.ssh_error = ""

    # -- files
    def _make_files(self) -> None:
        os.makedirs(self.data_dir)
        block = os.urandom(MiB)
        sizes = {"big.bin": self.options.download_bytes, "fwd.bin": self.options.forward_bytes}
        for name, size in sizes.items():
            with open(os.path.join(self.data_dir, name), "wb") as handle:
                for offset in range(0, size, MiB):
                    handle.write(block[: min(MiB, size - offset)])
        with open(os.path.join(self.data_dir, "1k.bin"), "wb") as handle:
            handle.write(block[:1024])

    # -- processes
    def __enter__(self) -> "Setup":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        progress = self.options.progress
        progress("setup: writing test files")
        self._make_files()
        http_target = start_fast_target(self.options.target, self.data_dir, self.dir)
        self.procs[http_target.proc.name] = http_target.proc
        self.dummy_port = http_target.port
        self.notes.append(f"target (the file server behind every path, and the direct column): "
                          f"{http_target.label}")
        server_args = ["server", "--listen", "127.0.0.1:0"]
        self.has_forward = (self.want_forward or self.want_scale) and _cli_has_forward()
        forwards = 0
        if self.has_forward:
            server_args += ["--forward", f"127.0.0.1:0=foo:tcp:127.0.0.1:{self.dummy_port}"]
            forwards += 1
            if self.want_scale:
                target = Proc("target", [sys.executable, "-m", "benchmarks.target"], self.dir)
                self.procs["target"] = target
                self.target_port = int(target.wait_for_log(r"listening on [^\s]+:(\d+)")[0].group(1))
                server_args += ["--forward", f"127.0.0.1:0=foo:tcp:127.0.0.1:{self.target_port}"]
                forwards += 1
        server = self._spawn("server", server_args)
        self.server_port = int(server.wait_for_log(r"listening on http://[^\s]+:(\d+)")[0].group(1))
        if forwards:
            self.forward_port = self._forward_port(server, self.dummy_port)
            if self.want_scale:
                self.scale_port = self._forward_port(server, self.target_port)
        client = self._spawn("client", ["client", "--connect",
                                        f"ws://127.0.0.1:{self.server_port}/connect", "--id", "foo"])
        client.wait_for_log(r"connected to ")
        self.stacks["tunnel"] = Route(self.tunnel_url(""), server, client)
        if self.want_stacks:
            self.stacks.update(start_stacks(
                self.dir, server, self.server_port, f"127.0.0.1:{self.dummy_port}", self.options.go,
                self.options.gunicorn, self.procs, self.notes.append, want_worker=self.options.worker))
        for name, route in self.stacks.items():
            url = route.url("1k.bin")
            wait_until(lambda: get_ok(url), 20, f"the {name} tunnel to answer", 0.05)  # noqa: B023
        progress(f"setup: dummy :{self.dummy_port}, server :{self.server_port}, client pid {client.pid}"
                 + (f", forward :{self.forward_port}" if self.forward_port else ""))

    @staticmethod
    def _forward_port(server: Proc, target_port: int) -> int:
        """The bound port of the forward to ``target_port``, from the server's log."""
        pattern = rf"forward 127\.0\.0\.1:(\d+)=\S*127\.0\.0\.1:{target_port}\b"
        return int(server.wait_for_log(pattern)[0].group(1))

    def _spawn(self, name: str, args: List[str]) -> Proc:
        proc = Proc.remotedialer(name, args, self.dir)
        self.procs[name] = proc
        return proc

    def start_ssh(self) -> Optional[int]:
        """Start ``ssh -R`` to the dummy server; the forwarded port, or None
        (with :attr:`ssh_error` saying why) if OpenSSH cannot run here."""
        if self.ssh is not None:
            return self.ssh.port or None
        self.ssh = SSHReverseForward(self.dir, self.dummy_port)
        try:
            port = self.ssh.start()
            wait_until(lambda: get_ok(f"http://127.0.0.1:{port}/1k.bin"), 10, "ssh -R to answer", 0.05)
            return port
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            self.ssh_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.ssh.stop()
            return None

    def stop(self) -> None:
        if self.ssh is not None:
            self.ssh.stop()
        for name in ["client", "server", "dummy", "target", *self.procs]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()
        self.tmp.cleanup()

    # -- addresses
    def tunnel_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/client/foo/http/127.0.0.1:{self.dummy_port}/{name}"

    def direct_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.dummy_port}/{name}"

    def stats(self, name: str) -> ProcStats:
        return self.procs[name].stats()


def get_ok(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 (False on any socket error)."""
    try:
        host, port, path = _split_url(url)
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status == 200
    except OSError:
        return False


def _split_url(url: str) -> Tuple[str, int, str]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), "/" + path


def download(url: str, timeout: float = 300.0) -> Tuple[int, float]:
    """GET ``url`` and read the body into a reused buffer; ``(bytes, seconds)``.
    Raises ``OSError`` or :class:`BenchError` on failure."""
    host, port, path = _split_url(url)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            raise BenchError(f"GET {url}: HTTP {response.status}")
        buffer = memoryview(bytearray(MiB))
        total = 0
        while True:
            count = response.readinto(buffer)
            if not count:
                break
            total += count
    finally:
        conn.close()
    return total, time.perf_counter() - started


# --------------------------------------------------------------- workloads
def idle_workload(setup: Setup, report: Report) -> None:
    """RSS and threads of the server and the client, connected and idle
    (Python's, and Go's when the Go stack runs)."""
    for path in ("tunnel", "go"):
        route = setup.stacks.get(path)
        if route is None or route.server is None or route.client is None:
            continue
        for name, proc in (("server", route.server), ("client", route.client)):
            stats = proc.stats()
            report.row("idle", f"RSS {name}", "MiB", "", False).add(path, stats.rss_bytes / MiB)
            report.row("idle", f"threads {name}", "count", "", False).add(path, stats.threads)


def _download_rows(setup: Setup, report: Report, workload: str, size: int, routes: Dict[str, Route],
                   name: str, target: str) -> None:
    options = setup.options
    rate_row = report.row(workload, "throughput", "MB/s", target)
    cpu_row = report.row(workload, "CPU server+client", "s/GiB", "", False)
    for path, route in routes.items():
        options.progress(f"[{workload}] {path}: warm-up")
        download(route.url(name))
        failures = 0
        run = 0
        while run < options.runs:
            cpu_before = route.usage()
            total, seconds = download(route.url(name))
            cpu_after = route.usage()
            if total != size:
                failures += 1
                problem = f"{workload} {path}: got {total} bytes of {size}"
                report.note(f"{problem} (run repeated)")
                options.progress(f"{problem}; server log:\n{setup.procs['server'].tail(10)}\n"
                                 f"client log:\n{setup.procs['client'].tail(10)}")
                if failures > 2:
                    raise BenchError(problem)
                continue
            rate = total / seconds / 1e6
            rate_row.add(path, rate)
            extra = ""
            if cpu_before is not None and cpu_after is not None:
                cpu = sum((after - before).cpu_seconds for after, before in zip(cpu_after, cpu_before))
                cpu_row.add(path, cpu / (total / GiB))
                extra = f", {cpu / (total / GiB):.1f} CPU-s/GiB"
            options.progress(f"[{workload}] {path} run {run + 1}/{options.runs}: {rate:.0f} MB/s{extra}")
            run += 1


def download_workload(setup: Setup, report: Report) -> None:
    """1 GiB (``--quick``: 16 MiB) file through ``/client/foo/http/...`` (the
    Python and, when built, the Go stack) and directly."""
    size = setup.options.download_bytes
    routes: Dict[str, Route] = {path: setup.stacks[path] for path in ("tunnel", "go") if path in setup.stacks}
    routes["direct"] = Route(setup.direct_url(""))
    # ?timeout=: the Go example server gives up on a request after 15 s by default
    _download_rows(setup, report, f"download {_size(size)}", size, routes, "big.bin?timeout=600",
                   TARGETS["download MB/s"] if "go" in routes else "")


@dataclass(frozen=True)
class LoadRun:
    """One load run on one route: the load tool's result and what the route's
    server and client used during it (None for the direct path)."""

    result: LoadResult
    used: Optional[Tuple[Usage, Usage]]

    def per_request(self) -> Optional[Tuple[float, float, float, float]]:
        """(server CPU us, client CPU us, server sleeps, client sleeps) per request."""
        count = self.result.requests
        if self.used is None or not count:
            return None
        server, client = self.used
        return (server.cpu_seconds / count * 1e6, client.cpu_seconds / count * 1e6,
                server.sleeps / count, client.sleeps / count)


def _load_once(route: Route, name: str, connections: int, seconds: float, use_wrk: bool) -> LoadRun:
    before = route.usage()
    result = run_load(route.url(name), connections, seconds, use_wrk)
    after = route.usage()
    if before is None or after is None:
        return LoadRun(result, None)
    return LoadRun(result, (after[0] - before[0], after[1] - before[1]))


def request_rows(options: Options, report: Report, workload_prefix: str, routes: Dict[str, Route],
                 targets: Dict[str, str], cache: Dict[Tuple[str, int], List[LoadRun]]) -> None:
    """1 KiB GETs on every route at every concurrency. The runs alternate
    between the routes (run 1 of each, then run 2 of each...), so that a
    change in the machine's load hits every route alike."""
    warmup = min(1.0, options.request_seconds)
    for connections in options.concurrency:
        workload = f"{workload_prefix} c{connections}"
        rps_row = report.row(workload, "requests", "req/s", targets.get(f"c{connections} rps", ""))
        p50_row = report.row(workload, "latency p50", "ms", targets.get(f"c{connections} p50", ""), False)
        cpu_rows = [report.row(workload, f"CPU {side}", "us/req", targets.get(f"cpu {side}", ""), False)
                    for side in ("server", "client", "server+client")]
        sleep_rows = [report.row(workload, f"wake-ups {side}", "per req", "", False)
                      for side in ("server", "client")]
        todo = {path: route for path, route in routes.items()
                if (route.url("1k.bin"), connections) not in cache}
        for path, route in todo.items():
            options.progress(f"[{workload}] {path}: warm-up")
            run_load(route.url("1k.bin"), connections, warmup, options.use_wrk)
            cache[(route.url("1k.bin"), connections)] = []
        for run in range(options.runs):
            for path, route in todo.items():
                done = _load_once(route, "1k.bin", connections, options.request_seconds, options.use_wrk)
                result = done.result
                if result.errors:
                    report.note(f"{workload} {path}: {result.errors} errors in run {run + 1}")
                cache[(route.url("1k.bin"), connections)].append(done)
                cpu_text = ""
                figures = done.per_request()
                if figures is not None:
                    cpu_text = f", {figures[0] + figures[1]:.0f} CPU-us/req"
                options.progress(f"[{workload}] {path} run {run + 1}/{options.runs}: "
                                 f"{result.requests_per_second:.0f} req/s, p50 {result.p50_ms:.2f} ms"
                                 f"{cpu_text} ({result.tool})")
        for path, route in routes.items():
            for done in cache[(route.url("1k.bin"), connections)]:
                rps_row.add(path, done.result.requests_per_second)
                p50_row.add(path, done.result.p50_ms)
                figures = done.per_request()
                if figures is not None:
                    server, client, server_sleeps, client_sleeps = figures
                    for row, value in zip(cpu_rows + sleep_rows,
                                          (server, client, server + client, server_sleeps, client_sleeps)):
                        row.add(path, value)


def requests_workload(setup: Setup, report: Report, cache: Dict[Tuple[str, int], List[LoadRun]]) -> None:
    """1 KiB GET at each concurrency through every stack (Python, Go, their
    pairings, gunicorn) and directly."""
    tool = "wrk" if setup.options.use_wrk and wrk_path() else "built-in Python load generator"
    report.note(f"request rates measured with {tool}")
    for note in setup.notes:
        report.note(note)
    routes = dict(setup.stacks)
    routes["direct"] = Route(setup.direct_url(""))
    targets = {}
    if "go" in routes:
        targets = {f"c{c} rps": TARGETS["rps"] for c in setup.options.concurrency}
        targets.update({"c1 p50": TARGETS["p50 c1"], "cpu server+client": TARGETS["cpu"]})
        if "gunicorn" in routes:
            targets["c10 rps"] += "; " + TARGETS["gunicorn c10"]
    request_rows(setup.options, report, "1 KiB GET", routes, targets, cache)
    mark_target_limited(report)


def forward_workload(setup: Setup, report: Report, cache: Dict[Tuple[str, int], List[LoadRun]]) -> None:
    """Issue 9's raw forward: download and 1 KiB GETs through ``--forward``,
    beside ``ssh -R`` (when OpenSSH can run) and the direct path."""
    if not setup.forward_port:
        report.note("raw forward skipped: `remotedialer server` has no --forward option")
        return
    routes = {"forward": Route(f"http://127.0.0.1:{setup.forward_port}/", setup.procs["server"],
                               setup.procs["client"]),
              "direct": Route(setup.direct_url(""))}
    if setup.options.ssh:
        ssh_port = setup.start_ssh()
        if ssh_port and setup.ssh is not None:
            daemon, client = setup.ssh.procs[-2:]
            routes["ssh-R"] = Route(f"http://127.0.0.1:{ssh_port}/", daemon, client, server_tree=True)
            report.note("ssh -R: private OpenSSH sshd on loopback, default cipher, `ssh -N -R 0:...`; "
                        "its CPU is sshd with its session processes + ssh")
        else:
            report.note(f"ssh -R column skipped: {setup.ssh_error}")
    size = setup.options.forward_bytes
    _download_rows(setup, report, f"raw forward {_size(size)}", size, routes, "fwd.bin", "")
    targets = {f"c{c} rps": TARGETS["forward rps"] for c in (10, 100)} if "ssh-R" in routes else {}
    request_rows(setup.options, report, "raw forward 1 KiB GET", routes, targets, cache)
    mark_target_limited(report)


def _open_many(port: int, count: int, batch: int = 100, timeout: float = 60.0) -> List[socket.socket]:
    """Open ``count`` connections to ``port`` and wait for each one's greeting byte."""
    opened: List[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        for start in range(0, count, batch):
            waiting = 0
            for _ in range(min(batch, count - start)):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                selector.register(sock, selectors.EVENT_READ)
                waiting += 1
            deadline = time.monotonic() + timeout
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{waiting} connections got no greeting within {timeout:.0f}s")
                for key, _ in selector.select(remaining):
                    sock = key.fileobj  # type: ignore[assignment]
                    selector.unregister(sock)
                    waiting -= 1
                    try:
                        greeting = sock.recv(1)
                    except OSError as exc:
                        raise BenchError(f"connection failed: {exc}") from exc
                    if greeting != b"+":
                        raise BenchError("connection closed before its greeting")
                    opened.append(sock)
    except BaseException:
        for sock in opened:
            sock.close()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        raise
    finally:
        selector.close()
    return opened


def _first_byte_times(port: int, samples: int) -> List[float]:
    """Milliseconds from ``connect`` to the greeting byte, one connection at a time."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if sock.recv(1) != b"+":
                raise BenchError("no greeting")
            times.append((time.perf_counter() - started) * 1000)
    return times


def scale_workload(setup: Setup, report: Report) -> None:
    """Many idle tunneled connections on one session (through a forward port
    to a greeting/echo target): threads and RSS per idle connection in each
    process, and dial -> first byte."""
    options = setup.options
    if not setup.scale_port:
        report.note("scale skipped: `remotedialer server` has no --forward option")
        return
    count = options.scale_connections
    workload = f"scale {count} conns"
    samples = 50 if options.quick else 200
    runs = max(1, min(options.runs, 3))
    for run in range(runs):
        _first_byte_times(setup.scale_port, 20)  # warm-up
        idle_first = _first_byte_times(setup.scale_port, samples)
        direct_first = _first_byte_times(setup.target_port, samples)
        before = {name: setup.stats(name) for name in ("server", "client")}
        fds_before = _fd_count(setup.procs["server"].pid)
        options.progress(f"[{workload}] run {run + 1}/{runs}: opening {count} connections")
        started = time.perf_counter()
        socks = _open_many(setup.scale_port, count)
        open_seconds = time.perf_counter() - started
        try:
            time.sleep(0.5)  # let late allocations settle before reading RSS (not synchronisation)
            after = {name: setup.stats(name) for name in ("server", "client")}
            loaded_first = _first_byte_times(setup.scale_port, samples)
            alive = _check_alive(socks[:: max(1, len(socks) // 100)])
        finally:
            for sock in socks:
                sock.close()
        for name in ("server", "client"):
            report.row(workload, f"threads {name} (open)", "count", "<= 32", False).add(
                "tunnel", after[name].threads)
            per_conn = (after[name].rss_bytes - before[name].rss_bytes) / count / 1024
            report.row(workload, f"RSS per conn {name}", "KiB", "<= 16", False).add("tunnel", per_conn)
        report.row(workload, "dial->first byte p50 (idle session)", "ms", "<= 1", False).add(
            "tunnel", statistics.median(idle_first))
        report.row(workload, "dial->first byte p50 (idle session)", "ms", "<= 1", False).add(
            "direct", statistics.median(direct_first))
        report.row(workload, "dial->first byte p50 (with all open)", "ms", "<= 1", False).add(
            "tunnel", statistics.median(loaded_first))
        report.row(workload, "open all (rate)", "conn/s", "", True).add("tunnel", count / open_seconds)
        if alive is not True:
            report.note(f"{workload} run {run + 1}: {alive}")
        options.progress(
            f"[{workload}] run {run + 1}/{runs}: threads server {after['server'].threads}, "
            f"client {after['client'].threads}; first byte p50 {statistics.median(loaded_first):.2f} ms"
        )
        _wait_fds_at_most(setup.procs["server"].pid, fds_before + 50)


def _wait_fds_at_most(pid: int, limit: int) -> None:
    """Block until process ``pid`` has at most ``limit`` descriptors (60 s)."""
    wait_until(lambda: _fd_count(pid) <= limit, 60, "the server to close the connections")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _check_alive(socks: Sequence[socket.socket]) -> object:
    """Echo one byte on each sampled connection; True or a description of the failure."""
    failed = 0
    for sock in socks:
        try:
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                failed += 1
        except OSError:
            failed += 1
    return True if not failed else f"{failed} of {len(socks)} sampled idle connections did not echo"


def _size(size: int) -> str:
    if size >= GiB and size % GiB == 0:
        return f"{size // GiB} GiB"
    return f"{size // MiB} MiB"


WORKLOADS = ("idle", "download", "requests", "forward", "scale", "agents")
#: Workloads run only when asked for with ``--only`` (they take many minutes).
OPT_IN = ("agents",)


def run_workloads(options: Options, only: Sequence[str], report: Report) -> None:
    """Start everything, run the chosen workloads, stop everything."""
    chosen = [name for name in WORKLOADS if name in only or (not only and name not in OPT_IN)]
    cache: Dict[Tuple[str, int], List[LoadRun]] = {}
    report.meta.update({
        "runs": options.runs, "quick": options.quick, "workloads": chosen,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
    })
    if "agents" in chosen:  # its own servers (Python and Go), see agents.py
        agents_workload(options.agents, options.runs, report, options.progress)
        chosen = [name for name in chosen if name != "agents"]
        if not chosen:
            return
    # Go runs beside every Python figure it has a counterpart for; gunicorn only for requests.
    options = dataclasses.replace(options, gunicorn=options.gunicorn and "requests" in chosen,
                                  worker=options.worker and "requests" in chosen)
    with Setup(options, "forward" in chosen, "scale" in chosen,
               want_stacks=bool({"idle", "download", "requests"} & set(chosen))) as setup:
        for name in chosen:
            if name == "idle":
                idle_workload(setup, report)
            elif name == "download":
                download_workload(setup, report)
            elif name == "requests":
                requests_workload(setup, report, cache)
            elif name == "forward":
                forward_workload(setup, report, cache)
            elif name == "scale":
                scale_workload(setup, report)
