"""ResumableSession over in-memory WebSockets that are cut mid-transfer:
connections carry on, byte-exact, after a reattach."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import List, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import TunnelClosedError
from remotedialer.observer import Observer
from remotedialer.resumable import ATTACHED, SUSPENDED, ResumableSession, keepable
from remotedialer.session import Session
from remotedialer.testing import MemoryTransport, memory_pair

LIMITS = Limits(resume_window=30.0, resume_buffer_per_connection=256 * 1024,
                resume_buffer_per_session=1024 * 1024)
TIMEOUT = 30.0


class Recorder(Observer):
    def __init__(self) -> None:
        self.suspended: List[str] = []
        self.resumed: List[int] = []
        self.resumed_event = threading.Event()

    def session_suspended(self, session: Session, reason: str) -> None:
        self.suspended.append(reason)

    def session_resumed(self, session: Session, resent_bytes: int) -> None:
        self.resumed.append(resent_bytes)
        self.resumed_event.set()


def _echo(conn: TunnelConnection) -> None:
    def run() -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
            except OSError:  # the session ended (the test is over)
                return

    threading.Thread(target=run, daemon=True).start()


class Pair:
    """A client and a server ResumableSession over a memory pair."""

    def __init__(self) -> None:
        self.observer = Recorder()
        client_end, server_end = memory_pair()
        self.client = ResumableSession(
            client_end, resume_window=30.0, is_client=True, connect_handler=_echo, limits=LIMITS,
            observer=self.observer,
        )
        self.server = ResumableSession(
            server_end, resume_window=30.0, is_client=False, limits=LIMITS, observer=self.observer,
        )
        self.threads = [self.client.start(), self.server.start()]
        self.ends: Tuple[MemoryTransport, MemoryTransport] = (client_end, server_end)

    def cut(self) -> None:
        self.ends[0].cut()

    def reattach(self) -> None:
        client_end, server_end = memory_pair()
        self.ends = (client_end, server_end)
        # the server answers the upgrade first, then the client reads it
        self.server.reattach(server_end)
        self.threads.append(self.server.start())
        self.client.reattach(client_end)
        self.threads.append(self.client.start())

    def close(self) -> None:
        self.client.close()
        self.server.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def pair() -> "Pair":
    made = Pair()
    yield made
    made.close()


def _wait_suspended(session: ResumableSession) -> None:
    for _ in range(1000):
        if session.resume_state == SUSPENDED:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"{session} not suspended: {session.resume_state}")


def test_echo_stream_carries_on_across_cuts(pair: Pair) -> None:
    conn = pair.server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    for round_ in range(5):
        message = b"round %d " % round_ * 1000
        conn.sendall(message)
        if round_ % 2:
            pair.cut()
            _wait_suspended(pair.client)
            _wait_suspended(pair.server)
            assert pair.client.connections() and pair.server.connections()
            pair.reattach()
        got = b""
        while len(got) < len(message):
            got += conn.recv(65536)
        assert got == message
    assert pair.server.resume_state == ATTACHED
    assert len(pair.observer.suspended) >= 2


def test_bulk_transfer_cut_many_times_is_byte_exact(pair: Pair) -> None:
    conn = pair.server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    total = 8 * 1024 * 1024
    block = bytes(range(256)) * 256  # 64 KiB
    sent_digest = hashlib.sha256()
    received = hashlib.sha256()
    got = 0

    def reader() -> None:
        nonlocal got
        while got < total:
            data = conn.recv(1 << 20)
            assert data
            received.update(data)
            got += len(data)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    for index in range(total // len(block)):
        payload = bytes([index % 251]) + block[1:]
        sent_digest.update(payload)
        conn.sendall(payload)
        if index % 32 == 31:
            pair.cut()
            _wait_suspended(pair.server)
            _wait_suspended(pair.client)
            pair.reattach()
    thread.join(TIMEOUT)
    assert got == total
    assert received.hexdigest() == sent_digest.hexdigest()
    assert sum(pair.observer.resumed) > 0  # something was in flight and went again


def test_writes_while_suspended_are_kept_until_the_cap(pair: Pair) -> None:
    conn = pair.server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    conn.sendall(b"x")
    assert conn.recv(1) == b"x"
    pair.cut()
    _wait_suspended(pair.server)
    conn.settimeout(0.5)
    conn.sendall(b"a" * 100_000)  # kept: under the cap
    with pytest.raises(TimeoutError):
        conn.sendall(b"b" * LIMITS.resume_buffer_per_connection)  # past it: blocks
    pair.reattach()
    conn.settimeout(TIMEOUT)
    got = b""
    while len(got) < 100_000:
        got += conn.recv(1 << 20)
    assert got[:100_000] == b"a" * 100_000


def test_a_suspended_session_is_ticked_every_ping_interval(pair: Pair) -> None:
    """While suspended, the heartbeat comes back after a ping interval, not
    at the end of the window: a reattach does not reschedule it, and the
    resumed session must ping again at once (it waited out the window)."""
    pair.cut()
    _wait_suspended(pair.client)
    assert pair.client.heartbeat(time.monotonic()) <= LIMITS.ping_interval
    pair.reattach()
    pair.observer.resumed_event.wait(TIMEOUT)
    conn = pair.server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    conn.sendall(b"x")
    assert conn.recv(1) == b"x"


@pytest.mark.parametrize("closer", ["client", "server"])
def test_closing_on_purpose_ends_the_peer_too(closer: str) -> None:
    """A session closed on purpose (a client stopping, a server shutting
    down) tells its peer with the WebSocket's normal close: the peer ends
    too, with no suspension; a cut suspends (the tests above)."""
    made = Pair()
    try:
        conn = made.server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
        ending, peer = (made.client, made.server) if closer == "client" else (made.server, made.client)
        ending.close("stopping")
        assert peer.wait_closed(TIMEOUT)
        assert made.observer.suspended == []
        with pytest.raises(TunnelClosedError):
            conn.recv(1)
    finally:
        made.close()


def test_window_passed_ends_connections_as_today() -> None:
    limits = LIMITS.replace(resume_window=0.3, ping_interval=0.1)
    client_end, server_end = memory_pair()
    server = ResumableSession(server_end, resume_window=0.3, is_client=False, limits=limits)
    client = ResumableSession(client_end, resume_window=0.3, is_client=True, connect_handler=_echo,
                              limits=limits)
    threads = [server.start(), client.start()]
    conn = server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    conn.sendall(b"hi")
    assert conn.recv(2) == b"hi"
    client_end.cut()
    assert server.wait_closed(10) and client.wait_closed(10)
    assert server.close_reason == "resume window passed"
    with pytest.raises(TunnelClosedError):
        conn.recv(1)
    for thread in threads:
        thread.join(5)



def test_one_flusher_thread_carries_a_transfers_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    flushers: List[threading.Thread] = []
    start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        if thread.name.startswith("remotedialer-flush-"):
            flushers.append(thread)
        start(thread)

    total = 4 * 1024 * 1024
    received = threading.Event()

    def sink(conn: TunnelConnection) -> None:  # reads only: its ACKs go by the flusher
        def run() -> None:
            with conn:
                conn.settimeout(TIMEOUT)
                got = 0
                while got < total:
                    data = conn.recv(1 << 20)
                    assert data
                    got += len(data)
                received.set()

        threading.Thread(target=run, daemon=True).start()

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    client_end, server_end = memory_pair()
    client = ResumableSession(client_end, resume_window=30.0, is_client=True, connect_handler=sink,
                              limits=LIMITS)
    server = ResumableSession(server_end, resume_window=30.0, is_client=False, limits=LIMITS)
    threads = [client.start(), server.start()]
    conn = server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    conn.settimeout(TIMEOUT)
    block = b"z" * client.ledger.ack_threshold  # an ACK per block
    for _ in range(total // len(block)):
        conn.sendall(block)
        with server._resume_cond:  # each ACK arrives before the next block goes
            assert server._resume_cond.wait_for(lambda: not server.ledger.unacked(conn.conn_id), TIMEOUT)
    assert received.wait(TIMEOUT)
    # one flusher thread per ACK (64) before; now one, unless a stall on a
    # loaded machine outlasted FLUSHER_LINGER
    assert 1 <= len(flushers) <= 3, len(flushers)
    client.close()
    server.close()
    for thread in threads + flushers:
        thread.join(5)
        assert not thread.is_alive()  # close() ends a lingering flusher


def test_the_ledger_keeps_immutable_payloads_by_reference_and_copies_the_rest() -> None:
    """What the agent's pipes send (views of the ``bytes`` a ``recv``
    returned) is kept as it is; a view of a mutable or oversized buffer is
    copied, so that a later change or a large base never reaches the ledger."""
    chunk = bytes(range(256)) * 4
    view = memoryview(chunk)[10:]
    assert keepable(view, 4096) is view
    assert keepable(chunk, 4096) is chunk
    assert keepable(memoryview(chunk)[:8], 512) == chunk[:8]  # the base is over the limit
    assert type(keepable(memoryview(chunk)[:8], 512)) is bytes
    mutable = bytearray(b"abc")
    kept = keepable(memoryview(mutable), 4096)
    mutable[0:1] = b"z"
    assert kept == b"abc"


def test_a_resumable_session_sends_a_data_payload_uncopied(pair: Pair) -> None:
    """The payload reaches the transport as the second part of the message,
    a view of the caller's ``bytes`` (no join, no copy)."""
    server = pair.server
    conn = server.dial("tcp", "echo:1", timeout=TIMEOUT)
    conn.settimeout(TIMEOUT)
    seen: List[object] = []
    real_send = server.transport.send

    def spy(data: bytes, tail: bytes = b"") -> None:
        seen.append(tail)
        real_send(data, tail)

    server.transport.send = spy  # type: ignore[method-assign]
    chunk = bytes(range(256)) * 4
    conn.sendall(chunk)
    assert conn.recv(len(chunk)) == chunk  # echoed
    (payload,) = [tail for tail in seen if len(tail)]  # type: ignore[arg-type]
    assert isinstance(payload, memoryview) and payload.obj is chunk
    conn.close()
