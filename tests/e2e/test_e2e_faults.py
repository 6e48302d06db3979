"""Fault injection with real processes: ``remotedialer server`` and
``remotedialer client`` run as subprocesses and are killed (SIGKILL), stopped
(SIGTERM) and restarted mid-transfer; the TCP connection under the WebSocket
is cut by a relay; a peered server is killed.

Requests go through the example server's ``/client/foo/http/...`` forwarder
to an HTTP server in this process. For each fault: the download in flight
ends at once with a truncated body (never a hang, never a silently short
one), requests during the outage are answered at once with an error, and the
client comes back by itself with its backoff; the recovery time (fault to the
first good request through the new tunnel) is printed. Threads
(``/proc/PID/task``) and descriptors (``/proc/PID/fd``) of the surviving
process are counted across repeated faults.

Both run without resumption (``--resume-window 0``, Go's behaviour): these
are the faults that end a session. With resumption a cut tunnel suspends
and carries on instead (test_e2e_resume.py).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from remotedialer.examples.file_server import DummyServer, generated_bytes

from testkit.faults import Relay, wait_recovered
from testkit.support import TIMEOUT

MiB = 1024 * 1024
TOKEN = "e2e-fault-token"


# ----------------------------------------------------------------- processes
class Proc:
    """A ``remotedialer`` subprocess whose stderr is collected on a thread."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "remotedialer.cli", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: List[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_log(self, pattern: str, timeout: float = TIMEOUT, count: int = 1) -> "re.Match[str]":
        """Block until ``count`` lines matched ``pattern``; return the first match."""
        regex = re.compile(pattern)
        with self._cond:
            found: List["re.Match[str]"] = []

            def seen() -> bool:
                found[:] = [m for m in map(regex.search, self.lines) if m]
                return len(found) >= count

            if not self._cond.wait_for(seen, timeout):
                raise AssertionError(f"no log line matching {pattern!r}:\n" + "\n".join(self.lines[-30:]))
            return found[0]

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            self.popen.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover - reported below
            self.popen.kill()
            self.popen.wait(TIMEOUT)
            raise AssertionError(f"{self.args[0]} did not exit on signal {sig}") from None


def start_server(port: int = 0, *extra: str) -> Tuple[Proc, int]:
    """``remotedialer server`` on ``port``; returns it and its port. A port
    just freed by a killed server is retried for a moment."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        proc = Proc("server", "--listen", f"127.0.0.1:{port}", "--timeout", "5", "--resume-window", "0",
                    *extra)
        try:
            match = proc.wait_log(r"listening on http://127\.0\.0\.1:(\d+)|(Address already in use)")
        except AssertionError:
            proc.kill()
            raise
        if match.group(1):
            return proc, int(match.group(1))
        proc.kill()
        assert time.monotonic() < deadline, f"port {port} stayed in use"
        time.sleep(0.1)


def start_client(url: str) -> Proc:
    client = Proc("client", "--connect", url, "--id", "foo", "--resume-window", "0")
    try:
        client.wait_log(r"connected to ")
    except AssertionError:
        client.kill()  # a client that never connected is not left running
        raise
    return client


class Deployment:
    """Server and client processes, an HTTP target, and the processes to
    clean up whatever a test did to them."""

    def __init__(self) -> None:
        self.web = DummyServer(("127.0.0.1", 0))
        self.web.start()
        self.procs: List[Proc] = []
        self.server, self.port = self.track(*start_server())
        self.client: Optional[Proc] = None

    def track(self, proc: Proc, *rest: int) -> Tuple[Proc, int]:
        self.procs.append(proc)
        return (proc, *rest)  # type: ignore[return-value]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connect"

    def start_client(self, url: Optional[str] = None, server: Optional[Proc] = None) -> Proc:
        """Start the client (on ``url``, else this deployment's server) and
        wait until ``server`` (default: this deployment's) registered its
        session: the server answers the handshake before it registers it, so
        the client's "connected" alone does not make it reachable yet."""
        server = server or self.server
        started = r"client session started for foo "
        before = sum(1 for line in server.lines if re.search(started, line))
        self.client = start_client(url or self.url)
        self.procs.append(self.client)
        server.wait_log(started, count=before + 1)
        return self.client

    def path(self, size: int) -> str:
        return f"/client/foo/http/127.0.0.1:{self.web.port}/bytes/{size}"

    def close(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.kill(signal.SIGTERM)
        self.web.stop()


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    d = Deployment()
    yield d
    d.close()


# ------------------------------------------------------------------ requests
def get(port: int, path: str, timeout: float = 5.0) -> Tuple[int, bytes]:
    """One GET; returns status and body, raises on a broken connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ok(port: int, path: str, size: int) -> bool:
    try:
        status, body = get(port, path)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200 and body == generated_bytes(size)


class Download:
    """A large download through the tunnel, read slowly on a thread, so that
    a fault hits it mid-transfer; records how it ended."""

    SIZE = 256 * MiB

    def __init__(self, port: int, path: str) -> None:
        self.received = 0
        self.outcome: Optional[BaseException] = None
        self.ended_at = 0.0
        self.started = threading.Event()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        self.conn.request("GET", path)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(TIMEOUT), "the download never started"

    def _run(self) -> None:
        try:
            response = self.conn.getresponse()
            assert response.status == 200, response.status
            length = int(response.getheader("Content-Length") or 0)
            while True:
                chunk = response.read(64 * 1024)
                if not chunk:
                    if self.received < length:  # read(n) reports a cut body as EOF
                        raise http.client.IncompleteRead(b"", length - self.received)
                    break
                self.received += len(chunk)
                if self.received >= MiB:
                    self.started.set()
                time.sleep(0.001)  # a slow reader: the transfer is still going when the fault hits
            self.outcome = AssertionError(f"download ended normally after {self.received} bytes")
        except BaseException as exc:  # noqa: B036 - recorded for the test
            self.outcome = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()
            self.conn.close()

    def check_cut(self, fault_at: float) -> float:
        """The download ended with an error (a truncated body), not a hang."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the download hung after the fault"
        assert isinstance(self.outcome, (http.client.IncompleteRead, OSError, http.client.HTTPException)), \
            repr(self.outcome)
        assert self.received < self.SIZE
        return self.ended_at - fault_at


def measure_recovery(port: int, path: str, size: int, scenario: str, fault_at: float,
                     timeout: float = 6 * TIMEOUT) -> float:
    """Poll until a request through the tunnel succeeds; each failed one must
    fail fast (an HTTP 500 from the forwarder or a refused connection while
    the server is down). Returns and records the recovery time."""
    return wait_recovered(lambda: ok(port, path, size), scenario, fault_at, timeout, 0.02)


def settled(counts: Callable[[], Tuple[int, int]], baseline: Tuple[int, int]) -> Tuple[int, int]:
    """Poll ``counts()`` (threads, descriptors) until it is at most one thread
    and two descriptors above ``baseline``, or TIMEOUT passed; returns the
    last counts (the caller asserts on them)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        now = counts()
        if now[0] <= baseline[0] + 1 and now[1] <= baseline[1] + 2:
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def assert_fails_fast(port: int, path: str) -> None:
    """While the client is away the forwarder answers 500 at once (no session)."""
    status, body = get(port, path)
    assert status == 500, (status, body[:200])


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_client_killed_mid_transfer_and_restarted(deployment: Deployment, sig: int) -> None:
    d = deployment
    client = d.start_client()
    size = 64 * 1024
    assert ok(d.port, d.path(size), size)
    download = Download(d.port, d.path(Download.SIZE))
    fault_at = time.monotonic()
    client.kill(sig)
    cut = download.check_cut(fault_at)
    print(f"\nclient {signal.Signals(sig).name}: download cut {cut * 1000:.0f} ms after the fault "
          f"({download.received / MiB:.1f} MiB in)")
    d.server.wait_log(r"client session for foo ended")
    assert_fails_fast(d.port, d.path(size))
    d.start_client()
    measure_recovery(d.port, d.path(size), size, f"client {signal.Signals(sig).name} + restart", fault_at)


def test_server_killed_mid_transfer_and_restarted(deployment: Deployment) -> None:
    d = deployment
    d.start_client()
    size = 64 * 1024
    assert ok(d.port, d.path(size), size)
    download = Download(d.port, d.path(Download.SIZE))
    fault_at = time.monotonic()
    d.server.kill()
    download.check_cut(fault_at)
    d.server, _ = d.track(*start_server(d.port))
    measure_recovery(d.port, d.path(size), size, "server kill -9 + restart (client backoff)", fault_at)
    assert d.client is not None and d.client.popen.poll() is None  # the same client process


def test_tcp_under_the_websocket_cut(deployment: Deployment) -> None:
    d = deployment
    relay = Relay(("127.0.0.1", d.port))
    try:
        d.start_client(f"ws://127.0.0.1:{relay.port}/connect")
        size = 64 * 1024
        assert ok(d.port, d.path(size), size)
        download = Download(d.port, d.path(Download.SIZE))
        fault_at = time.monotonic()
        relay.cut()
        download.check_cut(fault_at)
        measure_recovery(d.port, d.path(size), size, "TCP reset between the processes", fault_at)
    finally:
        relay.close()


def test_repeated_client_kills_leak_nothing_in_the_server(deployment: Deployment) -> None:
    d = deployment
    size = 16 * 1024

    kills = [0]

    def cycle() -> None:
        client = d.start_client()
        assert ok(d.port, d.path(size), size) or measure_recovery(
            d.port, d.path(size), size, "leak cycle", time.monotonic()) >= 0
        download = Download(d.port, d.path(Download.SIZE))
        fault_at = time.monotonic()
        client.kill()
        download.check_cut(fault_at)
        kills[0] += 1
        d.server.wait_log(r"client session for foo ended", count=kills[0])
        d.procs.remove(client)

    def counts() -> Tuple[int, int]:
        return d.server.threads(), d.server.fds()

    cycle()
    cycle()
    baseline = settled(counts, (10**6, 10**6))
    samples = [baseline]
    for _ in range(5):
        cycle()
        samples.append(settled(counts, baseline))
    print(f"\nserver threads/fds after each kill -9 of the client: {samples}")
    assert samples[-1][0] <= baseline[0] + 1, samples
    assert samples[-1][1] <= baseline[1] + 2, samples


def test_repeated_tunnel_cuts_leak_nothing_in_the_client(deployment: Deployment) -> None:
    d = deployment
    relay = Relay(("127.0.0.1", d.port))
    size = 16 * 1024
    try:
        client = d.start_client(f"ws://127.0.0.1:{relay.port}/connect")

        def cycle() -> None:
            measure_recovery(d.port, d.path(size), size, "leak cycle: relay cut", time.monotonic())
            # Pacing, not synchronisation: a tunnel cut within the client's
            # initial backoff (1 s) counts as a failed attempt, and quick
            # repeated cuts would (rightly) make it wait longer and longer.
            time.sleep(1.2)
            download = Download(d.port, d.path(Download.SIZE))
            fault_at = time.monotonic()
            relay.cut()
            download.check_cut(fault_at)

        def counts() -> Tuple[int, int]:
            return client.threads(), client.fds()

        cycle()
        cycle()
        measure_recovery(d.port, d.path(size), size, "leak cycle: relay cut", time.monotonic())
        baseline = settled(counts, (10**6, 10**6))
        samples = [baseline]
        for _ in range(4):
            cycle()
            measure_recovery(d.port, d.path(size), size, "leak cycle: relay cut", time.monotonic())
            samples.append(settled(counts, baseline))
        print(f"\nclient threads/fds after each cut of its tunnel: {samples}")
        assert samples[-1][0] <= baseline[0] + 1, samples
        assert samples[-1][1] <= baseline[1] + 2, samples
    finally:
        relay.close()


def test_peer_killed_and_restarted(deployment: Deployment) -> None:
    """Servers A and B peered; the client is on A; requests go to B. Killing A
    makes B answer at once (no session), and once A is back B routes again."""
    d = deployment
    a, a_port = d.track(*start_server(0, "--id", "A", "--token", TOKEN))
    free = socket.create_server(("127.0.0.1", 0))
    b_port = free.getsockname()[1]
    free.close()
    b, b_port = d.track(*start_server(b_port, "--id", "B", "--token", TOKEN,
                                      "--peers", f"A:{TOKEN}:ws://127.0.0.1:{a_port}/connect"))
    a.kill(signal.SIGTERM)  # restart A knowing B's port
    a, _ = d.track(*start_server(a_port, "--id", "A", "--token", TOKEN,
                                 "--peers", f"B:{TOKEN}:ws://127.0.0.1:{b_port}/connect"))
    d.start_client(f"ws://127.0.0.1:{a_port}/connect", server=a)
    size = 32 * 1024
    measure_recovery(b_port, d.path(size), size, "peered setup", time.monotonic())
    download = Download(b_port, d.path(Download.SIZE))
    fault_at = time.monotonic()
    a.kill()
    download.check_cut(fault_at)
    # B forgets the client once its link to A is gone: it answers at once.
    deadline = fault_at + TIMEOUT
    while True:
        status, _body = get(b_port, d.path(size))
        assert status == 500 or time.monotonic() < deadline, status
        if status == 500:
            break
        time.sleep(0.02)
    a, _ = d.track(*start_server(a_port, "--id", "A", "--token", TOKEN,
                                 "--peers", f"B:{TOKEN}:ws://127.0.0.1:{b_port}/connect"))
    measure_recovery(b_port, d.path(size), size, "peer kill -9 + restart (via the other server)", fault_at)
    assert b.popen.poll() is None
