"""Fault injection in one process, where the faults can be aimed precisely.

A real werkzeug server (:class:`~remotedialer.server.Server`) and a real
:class:`~remotedialer.client.TunnelClient` talk over loopback WebSockets,
optionally through a TCP relay the test can cut or turn into a black hole.
Each fault hits while connections are blocked in every way a user can be
blocked: a ``recv`` on a silent target, a download in full flow, a
``sendall`` held back by PAUSE. Every one of them must return at once with
:class:`~remotedialer.errors.TunnelClosedError` (or within its own timeout),
dials during the outage fail at once with
:class:`~remotedialer.errors.NoSessionError`, the client reconnects with
backoff (the recovery time, fault to first good request through the new
tunnel, is printed), and repeated faults leak no thread and no descriptor.

Real processes (kill -9, SIGTERM, restarts, peers) are in test_e2e_faults.py.
These are the faults without resumption (``resume_window=0``, Go's
behaviour); with it, a cut tunnel suspends instead (test_e2e_resume.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import NoSessionError, RemoteError, TunnelClosedError, TunnelTimeoutError

from testkit.faults import Relay, wait_recovered
from testkit.support import TIMEOUT, EchoServer, LoopbackListener, TunnelServer, recv_up_to, wait_for

KiB = 1024
MiB = 1024 * KiB

#: Fast keepalive so that a black-holed tunnel is declared dead in about two
#: seconds; no resumption (a cut tunnel ends, as without it).
FAULT_LIMITS = Limits(
    resume_window=0,
    ping_interval=0.1,
    read_deadline=2.0,
    pause_threshold=64 * KiB,
    resume_threshold=16 * KiB,
)
FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)


# ------------------------------------------------------------ test targets
class Target(LoopbackListener):
    """A loopback TCP server of one kind, one thread per connection:
    ``source`` sends endless data, ``silent`` never sends, ``sink`` never
    reads (so whoever writes to it is soon paused). ``drop_connections()``
    closes what it accepted (a silent or sink target never notices on its
    own that the far side went away)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._stop = threading.Event()
        super().__init__(name=f"test-{kind}")

    def handle(self, sock: socket.socket) -> None:
        if self.kind == "source":
            self.serve_on_thread(self._source, sock)

    def _source(self, sock: socket.socket) -> None:
        # About 16 MB/s: a transfer in flow that does not saturate the tunnel
        # (a saturated send buffer makes the client skip pings, and the short
        # read deadline used here would then end the session on its own).
        chunk = b"s" * (16 * KiB)
        try:
            while not self._stop.wait(0.001):
                sock.sendall(chunk)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        super().close()


# ------------------------------------------------------------------ the rig
class Rig:
    """Server, client (directly or through a relay) and the targets."""

    def __init__(self, through_relay: bool) -> None:
        self.source = Target("source")
        self.silent = Target("silent")
        self.sink = Target("sink")
        self.echo = EchoServer()
        self.server = TunnelServer(limits=FAULT_LIMITS)
        self.relay: Optional[Relay] = Relay(("127.0.0.1", self.server.port)) if through_relay else None
        port = self.relay.port if self.relay else self.server.port
        self.client = TunnelClient(
            f"ws://127.0.0.1:{port}/connect", {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
            limits=FAULT_LIMITS, backoff=FAST_BACKOFF,
        )
        self.client.start()
        self.wait_up()

    def wait_up(self) -> None:
        self.client.wait_connected(TIMEOUT)
        wait_for(lambda: any(not s.closed for s in self.server.server.sessions("foo")))

    def dial(self, address: str, timeout: Optional[float] = TIMEOUT) -> TunnelConnection:
        return self.server.server.dial("foo", "tcp", address, timeout)

    def echo_once(self, timeout: float = 2.0) -> bool:
        """One request through the tunnel; False (never raises) if it failed."""
        try:
            with self.dial(self.echo.address, timeout) as conn:
                conn.sendall(b"are you there?")
                return recv_up_to(conn, 14) == b"are you there?"
        except (TunnelClosedError, RemoteError, NoSessionError, TimeoutError, OSError):
            return False

    def restart_server(self, outage: float = 0.3) -> None:
        port = self.server.port
        self.server.close()
        time.sleep(outage)  # the outage itself, not synchronisation
        self.server = TunnelServer(port=port, limits=FAULT_LIMITS)

    def close(self) -> None:
        self.client.stop(TIMEOUT)
        self.server.close()
        if self.relay is not None:
            self.relay.close()
        for target in (self.source, self.silent, self.sink):
            target.close()
        self.echo.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(through_relay=False)
    yield r
    r.close()


@pytest.fixture
def relay_rig() -> Iterator[Rig]:
    r = Rig(through_relay=True)
    yield r
    r.close()


class Blocked:
    """Threads blocked in every way, each recording how its call ended."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.outcomes: Dict[str, BaseException] = {}
        self.ended_at: Dict[str, float] = {}
        self._lock = threading.Lock()
        self.silent = rig.dial(rig.silent.address, None)  # recv with no timeout
        self.download = rig.dial(rig.source.address, None)
        self.upload = rig.dial(rig.sink.address, None)
        self.download.settimeout(None)
        self.threads = [
            threading.Thread(target=self._run, args=(name, call), daemon=True)
            for name, call in (
                ("recv on a silent target", lambda: self.silent.recv(1)),
                ("download in flow", self._drain),
                ("sendall held by PAUSE", self._upload),
            )
        ]
        for thread in self.threads:
            thread.start()
        try:
            wait_for(lambda: self.upload.peer_paused_us, timeout=TIMEOUT)
        except AssertionError:
            session = rig.client.session
            raise AssertionError(f"upload never paused: {self.upload!r} {self.outcomes} "
                                 f"client conns {session and session.connections()}") from None
        wait_for(lambda: self.download.buffered > 0 or "download in flow" in self.outcomes)
        assert not self.outcomes, self.outcomes

    def _upload(self) -> None:
        """sendall into a target that never reads, until the tunnel fails.
        The far side PAUSEs and RESUMEs as its buffers fill; a RESUME that
        lands just before a fault can free the writer into a tunnel that
        silently drops data, so no finite upload is sure to still be held
        when the fault hits: only an error may end this call."""
        chunk = b"u" * MiB
        while True:
            self.upload.sendall(chunk)

    def _drain(self) -> None:
        while self.download.recv(65536):
            pass
        raise AssertionError("download ended with EOF, not an error")

    def _run(self, name: str, call: Callable[[], object]) -> None:
        try:
            call()
            error: BaseException = AssertionError(f"{name} returned normally")
        except BaseException as exc:  # noqa: B036 - recorded and checked by the test
            error = exc
        with self._lock:
            self.outcomes[name] = error
            self.ended_at[name] = time.monotonic()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), f"a blocked call did not return: {self.outcomes}"

    def check_all_closed(self) -> None:
        for name, error in self.outcomes.items():
            assert isinstance(error, TunnelClosedError), f"{name}: {error!r}"

    def close(self) -> None:
        for conn in (self.silent, self.download, self.upload):
            conn.close()
        self.rig.silent.drop_connections()
        self.rig.sink.drop_connections()


def measure_recovery(rig: Rig, scenario: str, fault_at: float, allow: Tuple[type, ...] = ()) -> float:
    """Poll requests through the tunnel until one succeeds; every failed dial
    must fail with a clear error. Returns (and records) the recovery time."""
    return wait_recovered(rig.echo_once, scenario, fault_at, 3 * TIMEOUT, 0.01)


def server_session(rig: Rig) -> object:
    sessions = [s for s in rig.server.server.sessions("foo") if not s.closed]
    assert sessions
    return sessions[0]


FAULTS: Dict[str, Callable[[Rig], None]] = {
    "server closes the websocket": lambda rig: server_session(rig).close("test: fault"),  # type: ignore[attr-defined]
    "client closes the websocket": lambda rig: rig.client.session.close("test: fault"),  # type: ignore[union-attr]
    "server shuts its TCP socket down": lambda rig: server_session(rig)  # type: ignore[attr-defined]
    .transport.sock.shutdown(socket.SHUT_RDWR),
    "client shuts its TCP socket down": lambda rig: rig.client.session  # type: ignore[union-attr]
    .transport.ws.sock.shutdown(socket.SHUT_RDWR),
}


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_mid_transfer_releases_every_blocked_call_and_recovers(rig: Rig, fault: str) -> None:
    blocked = Blocked(rig)
    old_session = rig.client.session
    fault_at = time.monotonic()
    FAULTS[fault](rig)
    blocked.join(TIMEOUT)
    blocked.check_all_closed()
    released = max(blocked.ended_at.values()) - fault_at
    print(f"\n{fault}: every blocked call returned {released * 1000:.0f} ms after the fault")
    measure_recovery(rig, fault, fault_at)
    assert rig.client.session is not old_session
    blocked.close()


def test_relay_cut_mid_transfer(relay_rig: Rig) -> None:
    blocked = Blocked(relay_rig)
    fault_at = time.monotonic()
    assert relay_rig.relay is not None
    relay_rig.relay.cut()
    blocked.join(TIMEOUT)
    blocked.check_all_closed()
    measure_recovery(relay_rig, "TCP under the websocket reset (relay cut)", fault_at)
    blocked.close()


def test_blackholed_tunnel_is_declared_dead_by_the_read_deadline(relay_rig: Rig) -> None:
    blocked = Blocked(relay_rig)
    assert relay_rig.relay is not None
    fault_at = time.monotonic()
    relay_rig.relay.blackhole()
    # While the tunnel is silently dead: a dial still goes out (it does not
    # wait for the far side) and a recv with a timeout returns within it.
    probe = relay_rig.dial(relay_rig.echo.address, 0.2)
    with pytest.raises((TunnelTimeoutError, TunnelClosedError)):
        probe.recv(1)
    # Both ends stop hearing keepalives: the read deadline ends the session
    # and with it every blocked call.
    blocked.join(FAULT_LIMITS.read_deadline + TIMEOUT)
    blocked.check_all_closed()
    released = max(blocked.ended_at.values()) - fault_at
    print(f"\nblack hole: blocked calls released {released * 1000:.0f} ms after the fault "
          f"(read deadline {FAULT_LIMITS.read_deadline}s)")
    assert released >= FAULT_LIMITS.read_deadline * 0.5  # it was the deadline, not something else
    probe.close()
    measure_recovery(relay_rig, "black-holed TCP (read deadline)", fault_at)
    blocked.close()


def test_server_restart_mid_transfer(rig: Rig) -> None:
    blocked = Blocked(rig)
    fault_at = time.monotonic()
    rig.restart_server(outage=0.3)
    blocked.join(TIMEOUT)
    blocked.check_all_closed()
    measure_recovery(rig, "server restart (0.3 s outage)", fault_at)
    blocked.close()


def test_dials_fail_at_once_while_the_client_is_away(rig: Rig) -> None:
    rig.client.stop(TIMEOUT)
    wait_for(lambda: not rig.server.server.has_session("foo"))
    for _ in range(20):
        with pytest.raises(NoSessionError):
            rig.dial(rig.echo.address)
    # and a dial to a target the client cannot reach fails on the first read
    restarted = TunnelClient(rig.client.url, rig.client.headers, lambda p, a: True,
                             limits=FAULT_LIMITS, backoff=FAST_BACKOFF)
    restarted.start()
    try:
        restarted.wait_connected(TIMEOUT)
        wait_for(lambda: rig.server.server.has_session("foo"))
        refused = socket.create_server(("127.0.0.1", 0))
        address = f"127.0.0.1:{refused.getsockname()[1]}"
        refused.close()
        with rig.dial(address) as conn:
            with pytest.raises(RemoteError):
                conn.recv(1)
    finally:
        restarted.stop(TIMEOUT)


# -------------------------------------------------------------------- leaks
def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled(baseline: Tuple[int, int], threads_slack: int, fds_slack: int) -> Tuple[int, int]:
    """Wait (bounded) for threads and descriptors to come back near
    ``baseline``; return the last counts either way."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        counts = (threading.active_count(), _fd_count())
        if counts[0] <= baseline[0] + threads_slack and counts[1] <= baseline[1] + fds_slack:
            return counts
        if time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


LEAK_CYCLES = 4


def test_repeated_faults_leak_no_threads_or_descriptors(relay_rig: Rig) -> None:
    rig = relay_rig
    faults: List[Tuple[str, Callable[[Rig], None]]] = list(FAULTS.items())
    assert rig.relay is not None
    faults.append(("relay cut", lambda r: r.relay.cut()))  # type: ignore[union-attr]

    def cycle() -> None:
        for name, fault in faults:
            blocked = Blocked(rig)
            fault_at = time.monotonic()
            fault(rig)
            blocked.join(TIMEOUT)
            blocked.check_all_closed()
            blocked.close()
            measure_recovery(rig, f"leak cycle: {name}", fault_at)

    cycle()  # warm up: pools and shared threads reach their working size
    baseline = _settled((threading.active_count(), _fd_count()), 0, 0)
    samples = [baseline]
    for _ in range(LEAK_CYCLES):
        cycle()
        samples.append(_settled(baseline, 2, 4))
    print(f"\nthreads/fds after each cycle of {len(faults)} faults: {samples}")
    threads, fds = samples[-1]
    assert threads <= baseline[0] + 2, samples
    assert fds <= baseline[1] + 4, samples
    # no steady growth either: the last cycles are no higher than the first ones
    assert max(s[0] for s in samples[-3:]) <= max(s[0] for s in samples[:3]) + 1, samples
    assert max(s[1] for s in samples[-3:]) <= max(s[1] for s in samples[:3]) + 2, samples


# ------------------------------------------- the reader never blocks on a pong
def test_server_reader_keeps_reading_while_a_send_is_stuck() -> None:
    """The mutual stall the fault tests found: a bulk send holds the
    server's socket (the peer is not reading), a ping arrives. The reader
    must not wait for the socket to answer it: it reads on (so the peer's
    PAUSE gets through), and the pong goes out after the stuck write."""
    from remotedialer.frames import OP_BINARY, OP_PING, OP_PONG
    from remotedialer.transports.wsgi import ServerWebSocket

    from testkit.raw_websocket import client_frame, read_server_frame

    server_sock, client_sock = socket.socketpair()
    client_sock.settimeout(TIMEOUT)
    try:
        ws = ServerWebSocket(server_sock, 1 << 20)
        ws._send_lock.acquire()  # a send stuck on a full socket
        keepalive = ws.last_keepalive
        client_sock.sendall(client_frame(OP_PING, b"p1") + client_frame(OP_BINARY, b"PAUSE"))
        got: List[bytes] = []
        reader = threading.Thread(target=lambda: got.append(ws.receive()), daemon=True)
        reader.start()
        reader.join(TIMEOUT)
        assert got == [b"PAUSE"], "the reader blocked on the pong"
        assert ws.last_keepalive == keepalive  # not answered yet: no keepalive
        ws._send_lock.release()
        ws.send(b"after")  # the next write carries the pong owed
        frames = [read_server_frame(client_sock), read_server_frame(client_sock)]
        assert frames == [(OP_BINARY, b"after"), (OP_PONG, b"p1")]
        assert ws.last_keepalive > keepalive
    finally:
        server_sock.close()
        client_sock.close()
