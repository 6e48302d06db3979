"""Race-free SYNC_CONNECTIONS: a connection the client did not know of when it
took its snapshot is never closed by that snapshot.

The client's heartbeat takes the snapshot (``connection_ids()``) and only then
waits for the write lock, and the server's reader may be behind: a SYNC can
reach the server long after it was taken, and several can be in flight at
once. The deterministic tests drive a server :class:`Session` message by
message through :func:`memory_pair` and hold snapshots back on purpose; the
load tests dial continuously through real loopback WebSockets while syncs fly
every few milliseconds.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Iterator, List, Tuple

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import RemoteError, TunnelClosedError
from remotedialer.heartbeat import Heartbeat
from remotedialer.observer import Observer
from remotedialer.protocol import MessageType, decode_message, encode_message, encode_sync_payload
from remotedialer.session import Session
from remotedialer.testing import memory_pair

from testkit.support import TIMEOUT, EchoServer, TunnelServer, recv_up_to, wait_for

SYNC_CLOSE_TEXT = "closed by connection sync"

Dial = Callable[[], TunnelConnection]

_ids = itertools.count(1)


# ------------------------------------------------------------ deterministic
class DrivenServer:
    """A server session whose client end is a bare :class:`MemoryTransport`
    that the test drives: it decides when the client "takes" a snapshot and
    when that snapshot arrives."""

    def __init__(self) -> None:
        self.client_end, server_end = memory_pair()
        self.heartbeat = Heartbeat("test-heartbeat")
        self.session = Session(server_end, is_client=False, client_key="foo", session_key=7,
                               heartbeat=self.heartbeat)
        self.thread = self.session.start()
        self.received_syncs = 0

    def dial(self) -> TunnelConnection:
        conn = self.session.dial("tcp", "127.0.0.1:1", TIMEOUT)
        message = decode_message(self.client_end.receive(TIMEOUT))  # the CONNECT, read off the wire
        assert (message.type, message.conn_id) == (MessageType.CONNECT, conn.conn_id)
        return conn

    def send_sync(self, snapshot: List[int]) -> None:
        """Deliver a SYNC whose payload is ``snapshot`` and wait until the
        server's reader has handled it (a DATA for an unknown id behind it is
        answered with ERROR, so its answer proves the SYNC was handled)."""
        self.client_end.send(encode_message(next(_ids), 0, MessageType.SYNC_CONNECTIONS,
                                            encode_sync_payload(sorted(snapshot))))
        probe = 9_000_000 + next(_ids)
        self.client_end.send(encode_message(next(_ids), probe, MessageType.DATA, b"x"))
        while True:
            message = decode_message(self.client_end.receive(TIMEOUT))
            if message.type == MessageType.ERROR and message.conn_id == probe:
                return

    def close(self) -> None:
        self.session.close("test over")
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture
def driven() -> Iterator[DrivenServer]:
    server = DrivenServer()
    yield server
    server.close()


def assert_open(conn: TunnelConnection) -> None:
    assert not conn.ended, f"{conn} was closed: {conn.error}"
    assert conn in conn.session.connections()


def assert_closed_by_sync(conn: TunnelConnection) -> None:
    assert conn.ended
    assert conn not in conn.session.connections()
    conn.settimeout(TIMEOUT)
    with pytest.raises(TunnelClosedError, match=SYNC_CLOSE_TEXT):
        conn.recv(1)


def test_snapshot_taken_before_the_connect_does_not_close_it(driven: DrivenServer) -> None:
    snapshot: List[int] = []  # taken while the client knew of nothing
    conn = driven.dial()
    driven.send_sync(snapshot)
    assert_open(conn)


def test_two_snapshots_in_flight_do_not_close_a_connection_made_after_both(driven: DrivenServer) -> None:
    # The client took two snapshots (a slow tunnel or a busy server reader):
    # both arrive after the dial, the first one "sees" the connection on the
    # server, the second must still not close it.
    first: List[int] = []
    second: List[int] = []
    conn = driven.dial()
    driven.send_sync(first)
    assert_open(conn)
    driven.send_sync(second)
    assert_open(conn)


def test_many_snapshots_in_flight(driven: DrivenServer) -> None:
    old = driven.dial()
    driven.send_sync([old.conn_id])
    held_back = [[old.conn_id] for _ in range(10)]  # ten syncs taken before the next dial
    fresh = driven.dial()
    for snapshot in held_back:
        driven.send_sync(snapshot)
        assert_open(old)
        assert_open(fresh)


def test_listed_then_missing_is_closed(driven: DrivenServer) -> None:
    conn = driven.dial()
    other = driven.dial()
    driven.send_sync([conn.conn_id, other.conn_id])  # the client knows both
    driven.send_sync([other.conn_id])  # and then forgot one (its ERROR was lost)
    assert_closed_by_sync(conn)
    assert_open(other)


def test_never_listed_connection_is_closed_once_older_than_the_read_deadline(driven: DrivenServer) -> None:
    # A CONNECT the client refused, its ERROR lost: the client never lists it.
    conn = driven.dial()
    driven.send_sync([])
    driven.send_sync([])
    assert_open(conn)  # it may simply not have reached the client yet
    conn.created_at -= driven.session.limits.read_deadline + 1  # a snapshot that old cannot predate it
    driven.send_sync([])
    assert_closed_by_sync(conn)


def test_client_dialed_connections_are_synced_too(driven: DrivenServer) -> None:
    # The client dials the server (CONNECT from the client end): it lists
    # its own connection in its snapshots, and dropping it closes it.
    accepted: List[TunnelConnection] = []
    driven.session.connect_handler = accepted.append
    conn_id = (1 << 32) + 1
    driven.client_end.send(encode_message(next(_ids), conn_id, MessageType.CONNECT, b"tcp/127.0.0.1:1"))
    wait_for(lambda: accepted)
    driven.send_sync([conn_id])
    driven.send_sync([conn_id])
    assert_open(accepted[0])
    driven.send_sync([])
    assert_closed_by_sync(accepted[0])


def test_sync_of_unknown_ids_changes_nothing(driven: DrivenServer) -> None:
    conn = driven.dial()
    driven.send_sync([conn.conn_id, 12345, 1 << 40])
    driven.send_sync([conn.conn_id, 999])
    assert_open(conn)
    assert driven.session.connection_ids() == [conn.conn_id]


def test_ids_of_closed_connections_are_forgotten(driven: DrivenServer) -> None:
    conns = [driven.dial() for _ in range(3)]
    driven.send_sync([c.conn_id for c in conns])
    for conn in conns:
        conn.close()
    driven.send_sync([])
    assert driven.session._sync_listed == frozenset()


# ----------------------------------------------------------------- load
class SyncCounter(Observer):
    """Counts SYNC_CONNECTIONS messages received and connections removed."""

    def __init__(self) -> None:
        self.syncs = 0

    def message_received(self, session: Session, message_type: int, payload_size: int) -> None:
        if message_type == MessageType.SYNC_CONNECTIONS:
            self.syncs += 1


class Churn:
    """Threads that dial continuously through ``dial``, exchange a message
    and close; every failure is recorded with its text."""

    def __init__(self, dial: Dial, threads: int, hold: float = 0.0) -> None:
        self.dial = dial
        self.hold = hold
        self.stop = threading.Event()
        self.round_trips = 0
        self.failures: List[str] = []
        self.sync_closed: List[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            message = f"{index}:{n}".encode() * 8
            try:
                conn = self.dial()
                with conn:
                    conn.sendall(message)
                    got = recv_up_to(conn, len(message))
                    if self.hold:
                        # stay open across several syncs, idle then busy again
                        self.stop.wait(self.hold)
                        conn.sendall(message)
                        again = recv_up_to(conn, len(message))
                        got = got if again == message else b"mismatch after hold"
            except (TunnelClosedError, RemoteError, OSError) as exc:
                with self._lock:
                    (self.sync_closed if SYNC_CLOSE_TEXT in str(exc) else self.failures).append(repr(exc))
                continue
            with self._lock:
                if got == message:
                    self.round_trips += 1
                else:
                    self.failures.append(f"echo mismatch: {got[:40]!r}")

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a churn thread hung"


#: No resumption: at a 0.05 s ping interval its two-missed-pongs rule would
#: suspend the tunnel on every hiccup of a loaded machine (dials fail meanwhile).
FAST_SYNC = Limits(sync_interval=0.005, ping_interval=0.05, resume_window=0)


def test_in_memory_dials_under_continuous_syncs(echo_server: EchoServer) -> None:
    from remotedialer.piping import LocalDialer

    observer = SyncCounter()
    heartbeat = Heartbeat("test-heartbeat")
    client_end, server_end = memory_pair()
    dialer = LocalDialer(lambda proto, address: True, limits=FAST_SYNC)
    client = Session(client_end, is_client=True, connect_handler=dialer, limits=FAST_SYNC,
                     heartbeat=heartbeat)
    server = Session(server_end, is_client=False, client_key="foo", limits=FAST_SYNC,
                     observer=observer, heartbeat=heartbeat)
    threads = [client.start(), server.start()]
    churn = Churn(lambda: server.dial("tcp", echo_server.address, TIMEOUT), threads=8, hold=0.02)
    try:
        wait_for(lambda: observer.syncs >= 200 and churn.round_trips >= 400, timeout=30)
    finally:
        churn.finish()
        client.close()
        server.close()
        dialer.shutdown()
        for thread in threads:
            thread.join(TIMEOUT)
    print(f"\nin memory: {churn.round_trips} round trips, {observer.syncs} syncs, "
          f"{len(churn.sync_closed)} closed by sync")
    assert churn.sync_closed == []
    assert churn.failures == []


@pytest.fixture
def fast_sync_tunnel(echo_server: EchoServer) -> Iterator[Tuple[TunnelServer, TunnelClient, SyncCounter]]:
    observer = SyncCounter()
    server = TunnelServer(limits=FAST_SYNC, observer=observer)
    client = TunnelClient(server.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
                          limits=FAST_SYNC, backoff=Backoff(initial=0.05, maximum=0.2))
    client.start()
    client.wait_connected(TIMEOUT)
    wait_for(lambda: server.server.has_session("foo"))
    yield server, client, observer
    client.stop(TIMEOUT)
    server.close()


def test_real_websocket_dials_under_continuous_syncs(
    fast_sync_tunnel: Tuple[TunnelServer, TunnelClient, SyncCounter], echo_server: EchoServer
) -> None:
    server, client, observer = fast_sync_tunnel
    dial = server.server.dialer("foo")
    churn = Churn(lambda: dial("tcp", echo_server.address, TIMEOUT), threads=16, hold=0.01)
    try:
        wait_for(lambda: observer.syncs >= 300 and churn.round_trips >= 1000, timeout=60)
    finally:
        churn.finish()
    print(f"\nreal websocket: {churn.round_trips} round trips, {observer.syncs} syncs, "
          f"{len(churn.sync_closed)} closed by sync")
    assert churn.sync_closed == []
    assert churn.failures == []
    session = client.session
    assert session is not None and not session.closed  # the tunnel itself never dropped


def test_sync_still_reaps_connections_the_client_lost(
    fast_sync_tunnel: Tuple[TunnelServer, TunnelClient, SyncCounter], echo_server: EchoServer
) -> None:
    # The safety net still works: drop a connection on the client side
    # without telling the server (as a lost ERROR would), and the next syncs
    # close it on the server.
    server, client, observer = fast_sync_tunnel
    conn = server.server.dial("foo", "tcp", echo_server.address, TIMEOUT)
    conn.sendall(b"hello")
    conn.settimeout(TIMEOUT)
    assert conn.recv(5) == b"hello"
    session = client.session
    assert session is not None
    wait_for(lambda: conn.conn_id in session.connection_ids())
    syncs = observer.syncs
    wait_for(lambda: observer.syncs >= syncs + 2)  # listed in a sync the server received
    with session._lock:  # forget it silently, as if its ERROR never got out
        lost = session._connections.pop(conn.conn_id)
    lost._wire_closed = True
    lost.close()
    with pytest.raises(TunnelClosedError, match=SYNC_CLOSE_TEXT):
        conn.recv(1)
