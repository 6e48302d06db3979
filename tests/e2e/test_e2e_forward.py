"""Port forwarding end to end: a real Server under werkzeug with real tunnel
clients over loopback WebSockets, and real processes (``remotedialer server
--forward`` and ``remotedialer client``)."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.server.port_forward import PortForward
from remotedialer.piping import Piper

from testkit.support import (
    TIMEOUT,
    SelectorEchoServer,
    TunnelServer,
    echo_concurrently,
    recv_exactly,
    wait_for,
)
from testkit.streams import MiB, SourceServer, payload, recv_to_end


def connect(address: Tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT)
    return sock


def echo_both_ways(address: Tuple[str, int], data: bytes) -> bytes:
    """Write ``data`` on one thread while reading its echo on this one."""
    with connect(address) as sock:
        return echo_concurrently(sock, data)


@contextlib.contextmanager
def echoing_connections(
    address: Tuple[str, int], count: int, size: int, seed: int,
    on_echo: Callable[[], object] = lambda: None,
) -> Iterator[List[socket.socket]]:
    """Open ``count`` connections to ``address`` (an echo), send each its own
    ``size``-byte message, check every echo (calling ``on_echo`` after each),
    and yield the still-open sockets; they are closed afterwards."""
    socks: List[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(connect(address))
        messages = [payload(size, seed + i) for i in range(count)]
        for sock, message in zip(socks, messages):
            sock.sendall(message)
        for sock, message in zip(socks, messages):
            assert recv_exactly(sock, len(message)) == message
            on_echo()
        yield socks
    finally:
        for sock in socks:
            sock.close()


def wait_forward_ready(address: Tuple[str, int]) -> None:
    """Poll (with a deadline) until a connection through the forward echoes:
    until then the client is absent and connections are closed at once."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with connect(address) as sock:
                sock.sendall(b"?")
                if sock.recv(1) == b"?":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"forward {address} never became ready")
        time.sleep(0.02)


# ------------------------------------------------------------- in-process
class InProcess:
    """A real Server (werkzeug, loopback, port 0) and a real TunnelClient
    ``foo``, each with its own piper."""

    def __init__(self) -> None:
        self.server_piper = Piper("e2e-server-piper")
        self.client_piper = Piper("e2e-client-piper")
        self.tunnel = TunnelServer(piper=self.server_piper)
        self.client: Optional[TunnelClient] = None
        self.forwards: List[PortForward] = []

    def start_client(self) -> TunnelClient:
        client = TunnelClient(
            self.tunnel.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
            backoff=Backoff(initial=0.05, maximum=0.2), piper=self.client_piper,
        )
        client.start()
        client.wait_connected(TIMEOUT)
        wait_for(lambda: self.tunnel.server.has_session("foo"))
        self.client = client
        return client

    def forward(self, address: str) -> PortForward:
        fwd = self.tunnel.server.forward(("127.0.0.1", 0), "foo", "tcp", address, dial_timeout=TIMEOUT)
        self.forwards.append(fwd)
        return fwd

    def close(self) -> None:
        for fwd in self.forwards:
            fwd.stop(timeout=TIMEOUT)
        if self.client is not None:
            self.client.stop(TIMEOUT)
        self.tunnel.close()
        self.client_piper.stop()
        self.server_piper.stop()


@pytest.fixture
def live() -> Iterator[InProcess]:
    env = InProcess()
    yield env
    env.close()


def test_server_forward_multi_mib_both_ways(live: InProcess, echo: SelectorEchoServer) -> None:
    live.start_client()
    fwd = live.forward(echo.address)
    data = payload(16 * MiB, 11)
    assert echo_both_ways(fwd.address, data) == data
    wait_for(lambda: fwd.active == 0)


def test_server_forward_many_connections_bounded_threads(
    live: InProcess, echo: SelectorEchoServer
) -> None:
    live.start_client()
    fwd = live.forward(echo.address)
    wait_forward_ready(fwd.address)
    count = 200
    baseline = threading.active_count()
    seen = [baseline]
    with echoing_connections(fwd.address, count, 2048, 200, lambda: seen.append(threading.active_count())):
        wait_for(lambda: fwd.active == count)
        peak = max(seen + [threading.active_count()])
        assert peak - baseline <= 16 + 2, (baseline, peak)  # the client's dial pool, at most
    wait_for(lambda: fwd.active == 0)
    wait_for(lambda: not live.tunnel.server.sessions("foo")[0].connections())


def test_client_disconnect_mid_transfer_closes_forwarded_connections(live: InProcess) -> None:
    source = SourceServer(payload(1 * MiB, 12), hold=True)  # streams forever
    try:
        client = live.start_client()
        fwd = live.forward(source.address)
        socks = [connect(fwd.address) for _ in range(8)]
        for sock in socks:
            recv_exactly(sock, 200_000)
        wait_for(lambda: fwd.active == 8)
        client.stop(TIMEOUT)
        for sock in socks:
            with sock:
                recv_to_end(sock)  # EOF within TIMEOUT, not a hang
        wait_for(lambda: fwd.active == 0)
        assert source.peer_closed.wait(TIMEOUT)  # the far side closed its target too
    finally:
        source.close()


def test_client_absent_closes_accepted_connection_at_once(
    live: InProcess, echo: SelectorEchoServer
) -> None:
    fwd = live.forward(echo.address)  # no client has connected
    for _ in range(3):
        with connect(fwd.address) as sock:
            assert recv_to_end(sock)[0] == b""
    assert fwd.failed == 3
    live.start_client()  # once it is there, the same forward works
    wait_forward_ready(fwd.address)
    assert echo_both_ways(fwd.address, b"late") == b"late"


# ------------------------------------------------------------ real processes
class LogWatcher:
    """Collects a process's stderr lines on a thread; :meth:`wait` polls them."""

    def __init__(self, proc: "subprocess.Popen[str]") -> None:
        self.lines: List[str] = []
        self._cond = threading.Condition()
        assert proc.stderr is not None
        self._stream = proc.stderr
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, pattern: str, timeout: float = TIMEOUT) -> "re.Match[str]":
        """Block until a line matches ``pattern``; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no log line matching {pattern!r} in:\n" + "\n".join(self.lines))
                self._cond.wait(remaining)

    def count(self, pattern: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if re.search(pattern, line))


def _cli(*args: str) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [sys.executable, "-m", "remotedialer.cli", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _thread_count(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Processes:
    """``remotedialer server`` with two forwards (to an echo server and to an
    endless source), and ``remotedialer client`` started on demand. Without
    resumption: a lost client ends its forwarded connections at once (with
    it they would wait out the window, see test_e2e_resume.py)."""

    def __init__(self, echo_address: str, source_address: str) -> None:
        self.procs: List["subprocess.Popen[str]"] = []
        self.server = _cli(
            "server", "--listen", "127.0.0.1:0", "--resume-window", "0",
            "--forward", f"127.0.0.1:0=foo:tcp:{echo_address}",
            "--forward", f"0=foo:tcp:{source_address}",
        )
        self.procs.append(self.server)
        self.client: Optional["subprocess.Popen[str]"] = None
        self.server_log = LogWatcher(self.server)
        try:
            port = int(self.server_log.wait(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
            escaped = [re.escape(f"=foo:tcp:{a}: listening") for a in (echo_address, source_address)]
            self.echo_port = int(self.server_log.wait(r"forward 127\.0\.0\.1:(\d+)" + escaped[0]).group(1))
            self.source_port = int(self.server_log.wait(r"forward 127\.0\.0\.1:(\d+)" + escaped[1]).group(1))
        except BaseException:
            self.close()  # a server that never came up is not left running
            raise
        self.url = f"ws://127.0.0.1:{port}/connect"

    @property
    def echo(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.echo_port)

    @property
    def source(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.source_port)

    def start_client(self) -> None:
        self.client = _cli("client", "--connect", self.url, "--id", "foo")
        self.procs.append(self.client)
        LogWatcher(self.client)  # keep its pipe drained
        wait_forward_ready(self.echo)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:  # pragma: no cover - reported by the kill
                proc.kill()
                proc.wait(TIMEOUT)


@pytest.fixture
def processes(echo: SelectorEchoServer) -> Iterator[Processes]:
    source = SourceServer(payload(1 * MiB, 13), hold=True)
    procs = Processes(echo.address, source.address)
    yield procs
    procs.close()
    source.close()


def test_cli_client_absent_then_present(processes: Processes) -> None:
    for _ in range(2):
        with connect(processes.echo) as sock:
            assert recv_to_end(sock)[0] == b""  # closed at once, not held open
    processes.server_log.wait(r"WARNING.*forward .*dial for .* failed.*NoSessionError")
    processes.start_client()
    data = payload(16 * MiB, 14)
    assert echo_both_ways(processes.echo, data) == data


def test_cli_many_concurrent_connections(processes: Processes) -> None:
    processes.start_client()
    count = 200
    before = _thread_count(processes.server.pid)
    with echoing_connections(processes.echo, count, 1024, 300):
        during = _thread_count(processes.server.pid)
        if before is not None and during is not None:
            assert during - before <= 2, (before, during)  # no thread per connection


def test_cli_client_killed_mid_transfer(processes: Processes) -> None:
    processes.start_client()
    socks = [connect(processes.source) for _ in range(5)]
    for sock in socks:
        recv_exactly(sock, 500_000)  # mid-transfer
    assert processes.client is not None
    processes.client.kill()  # no goodbye: the WebSocket's TCP connection just dies
    processes.client.wait(TIMEOUT)
    for sock in socks:
        with sock:
            recv_to_end(sock)  # EOF (or reset) within TIMEOUT, not a hang
    with connect(processes.source) as sock:
        assert recv_to_end(sock)[0] == b""  # and the client is now absent


def test_cli_rejects_a_bad_forward_spec() -> None:
    proc = _cli("server", "--listen", "127.0.0.1:0", "--forward", "9125=foo")
    try:
        _out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
    assert proc.returncode == 2
    assert "LISTEN=CLIENT_KEY:PROTO:ADDRESS" in err
