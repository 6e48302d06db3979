"""Session over the in-memory WebSocket pair: dialing, the connection table,
every message type, SYNC, heartbeats, close (TunnelConnection itself is
tested in test_connection.py)."""

from __future__ import annotations

import gc
import socket
import threading
import time
from typing import Any, Callable, List, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import (
    ConnectNotAllowedError,
    LimitExceededError,
    RemoteError,
    TunnelClosedError,
)
from remotedialer.heartbeat import Heartbeat
from remotedialer.protocol import (
    MessageType,
    decode_message,
    encode_sync_payload,
)
from remotedialer.session import Session
from remotedialer.testing import MemoryTransport, memory_pair

from testkit.support import (
    KiB,
    SMALL,
    TIMEOUT,
    AcceptingHandler,
    Raw,
    SessionPair,
    dial_pair,
    recv_exactly,
    wait_for,
)











# ---------------------------------------------------------------- dialing
def test_first_dialed_connection_id_is_2(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "127.0.0.1:8125")
    assert conn.conn_id == 2
    message = raw.receive()
    assert (message.type, message.conn_id) == (MessageType.CONNECT, 2)
    assert bytes(message.payload) == b"tcp/127.0.0.1:8125"
    assert raw.session.dial("tcp", "127.0.0.1:1").conn_id == 3


def test_dial_is_usable_at_once_and_data_flows(tunnel: Tuple[SessionPair, AcceptingHandler]) -> None:
    pair, handler = tunnel
    server_conn = pair.server.dial("tcp", "example:80", timeout=TIMEOUT)
    server_conn.sendall(b"hello")  # before the far side even saw the CONNECT
    client_conn = handler.next()
    assert (client_conn.proto, client_conn.address) == ("tcp", "example:80")
    client_conn.settimeout(TIMEOUT)
    assert recv_exactly(client_conn, 5) == b"hello"
    client_conn.sendall(b"world")
    assert recv_exactly(server_conn, 5) == b"world"
    assert pair.server.connection_ids() == [2]
    assert pair.client.connection_ids() == [2]


def test_dial_on_dead_session_fails_at_once(raw: Raw) -> None:
    raw.session.close("gone")
    assert raw.session.wait_closed(TIMEOUT)
    with pytest.raises(TunnelClosedError):
        raw.session.dial("tcp", "127.0.0.1:1")
    assert raw.session.close_reason == "gone"


def test_dial_rejects_slash_in_proto(raw: Raw) -> None:
    with pytest.raises(ValueError):
        raw.session.dial("tcp/x", "a:1")


def test_client_side_dial_ids_do_not_collide(tunnel: Tuple[SessionPair, AcceptingHandler]) -> None:
    pair, _ = tunnel
    server_conn = pair.server.dial("tcp", "a:1")
    client_conn = pair.client.dial("tcp", "b:2")
    assert server_conn.conn_id != client_conn.conn_id


def test_dial_connection_limit(raw_factory: Callable[..., Raw]) -> None:
    raw = raw_factory(limits=Limits(max_connections_per_session=2))
    raw.session.dial("tcp", "a:1")
    raw.session.dial("tcp", "a:2")
    with pytest.raises(LimitExceededError):
        raw.session.dial("tcp", "a:3")


# ------------------------------------------------------- message handling
def test_data_to_unknown_id_answered_with_connection_not_found(raw: Raw) -> None:
    raw.send(MessageType.DATA, 99, b"stray")
    message = raw.receive()
    assert (message.type, message.conn_id) == (MessageType.ERROR, 99)
    assert message.text == "connection not found foo/7/99"
    assert not raw.session.closed


def test_error_for_unknown_id_is_ignored(raw: Raw) -> None:
    raw.send(MessageType.ERROR, 42, b"whatever")
    raw.send(MessageType.PAUSE, 42)
    raw.send(MessageType.RESUME, 42)
    assert raw.nothing_pending()
    assert not raw.session.closed
    assert raw.session.dial("tcp", "a:1").conn_id == 2  # still serving


@pytest.mark.parametrize("message_type", [0, 9, 99, 12345])
def test_unknown_types_are_ignored(raw: Raw, message_type: int) -> None:
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.receive_type(MessageType.CONNECT)
    raw.send(message_type, conn.conn_id, b"junk")
    raw.send(MessageType.DATA, conn.conn_id, b"after")
    assert conn.recv(100) == b"after"
    assert not raw.session.closed


def test_text_message_ends_the_session(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.far.send_text("hello")
    assert raw.session.wait_closed(TIMEOUT)
    assert "protocol error" in raw.session.close_reason
    with pytest.raises(TunnelClosedError, match="tunnel disconnect"):
        conn.recv(1)


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x02\x04\x02", b"\x02\x04\x04\xb0\xea\x01noslash"])
def test_undecodable_message_ends_the_session(raw: Raw, data: bytes) -> None:
    raw.far.send(data)
    assert raw.session.wait_closed(TIMEOUT)
    assert "protocol error" in raw.session.close_reason


def test_oversized_message_ends_the_session(raw_factory: Callable[..., Raw]) -> None:
    limits = Limits(max_message_size=64 * KiB, max_data_message=8 * KiB)
    raw = raw_factory(limits=limits)
    conn = raw.session.dial("tcp", "a:1")
    raw.send(MessageType.DATA, conn.conn_id, b"x" * (64 * KiB + 1))
    assert raw.session.wait_closed(TIMEOUT)
    assert "over the limit" in raw.session.close_reason


def test_connect_without_authorizer_refused_on_that_connection_only(raw: Raw) -> None:
    # The raw session has no connect handler: refuse, but stay up.
    raw.send(MessageType.CONNECT, 5, b"tcp/127.0.0.1:22")
    message = raw.receive()
    assert (message.type, message.conn_id, message.text) == (MessageType.ERROR, 5, "connect not allowed")
    raw.send(MessageType.DATA, 99, b"x")
    assert raw.receive().type == MessageType.ERROR  # still answering
    assert not raw.session.closed
    assert raw.session.connection_ids() == []


def test_connect_refused_by_handler_answers_error_and_session_lives(
    raw_factory: Callable[..., Raw],
) -> None:
    def refuse(conn: TunnelConnection) -> None:
        raise ConnectNotAllowedError("connect not allowed")

    raw = raw_factory(is_client=True, connect_handler=refuse)
    raw.send(MessageType.CONNECT, 2, b"tcp/10.0.0.1:22")
    message = raw.receive_type(MessageType.ERROR)
    assert (message.conn_id, message.text) == (2, "connect not allowed")
    assert raw.session.connection_ids() == []
    raw.send(MessageType.CONNECT, 3, b"tcp/10.0.0.1:22")
    assert raw.receive_type(MessageType.ERROR).conn_id == 3
    assert not raw.session.closed


def test_connect_handler_crash_answers_error(raw_factory: Callable[..., Raw]) -> None:
    def crash(conn: TunnelConnection) -> None:
        raise RuntimeError("kaboom")

    raw = raw_factory(is_client=True, connect_handler=crash)
    raw.send(MessageType.CONNECT, 2, b"tcp/x:1")
    message = raw.receive_type(MessageType.ERROR)
    assert message.conn_id == 2 and "kaboom" in message.text
    assert not raw.session.closed


def test_connect_over_connection_limit_refused(raw_factory: Callable[..., Raw]) -> None:
    handler = AcceptingHandler()
    raw = raw_factory(is_client=True, connect_handler=handler,
                      limits=Limits(max_connections_per_session=1))
    raw.send(MessageType.CONNECT, 2, b"tcp/x:1")
    handler.next()
    raw.send(MessageType.CONNECT, 3, b"tcp/x:2")
    message = raw.receive_type(MessageType.ERROR)
    assert (message.conn_id, message.text) == (3, "too many connections")
    assert raw.session.connection_ids() == [2]


def test_connect_reaches_handler_with_proto_and_address(raw_factory: Callable[..., Raw]) -> None:
    handler = AcceptingHandler()
    raw = raw_factory(is_client=True, connect_handler=handler)
    raw.send(MessageType.CONNECT, 4, b"foo::tcp/10.0.0.1:6443")
    conn = handler.next()
    assert (conn.conn_id, conn.proto, conn.address) == (4, "foo::tcp", "10.0.0.1:6443")
    assert conn.getpeername() == ("10.0.0.1", 6443)


def test_error_from_peer_ends_connection_with_its_text(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
    raw.receive_type(MessageType.CONNECT)
    raw.send(MessageType.ERROR, conn.conn_id, b"dial tcp 127.0.0.1:1: connect: connection refused")
    with pytest.raises(RemoteError) as info:
        conn.recv(10)
    assert info.value.remote_message == "dial tcp 127.0.0.1:1: connect: connection refused"
    assert isinstance(info.value, ConnectionResetError)
    with pytest.raises(RemoteError):
        conn.sendall(b"x")
    wait_for(lambda: raw.session.connection_ids() == [])
    conn.close()  # no ERROR is owed to a peer that ended the connection
    assert raw.nothing_pending()














def test_sync_closes_only_connections_present_at_previous_sync(raw: Raw) -> None:
    old = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)  # id 2
    kept = raw.session.dial("tcp", "a:2", timeout=TIMEOUT)  # id 3
    # First SYNC: the peer does not list 2 or 3 (its snapshot may predate our
    # CONNECTs), so nothing is closed yet.
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([]))
    raw.barrier()
    assert raw.session.connection_ids() == [2, 3]
    # The peer lists both: it knows them now.
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([2, 3]))
    raw.barrier()
    young = raw.session.dial("tcp", "a:3", timeout=TIMEOUT)  # id 4, after that sync
    # Next SYNC lists only 3: 2 was listed before and is gone; 4 is younger
    # than the previous sync and must survive.
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([3]))
    with pytest.raises(TunnelClosedError):
        old.recv(1)
    wait_for(lambda: raw.session.connection_ids() == [3, 4])
    assert not kept.ended and not young.ended
    # Closing by SYNC sends no ERROR: only the CONNECTs (and the barrier's
    # answer) went out.
    assert raw.receive().type == MessageType.CONNECT  # the young one
    assert raw.nothing_pending()
    # A SYNC without 4 does not close it while the peer never listed it (the
    # snapshot may still predate it); once listed, a SYNC without 4 closes it.
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([3]))
    raw.barrier()
    assert raw.session.connection_ids() == [3, 4]
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([3, 4]))
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([3]))
    wait_for(lambda: raw.session.connection_ids() == [3])


def test_bad_sync_payload_ends_the_session(raw: Raw) -> None:
    raw.send(MessageType.SYNC_CONNECTIONS, 0, b"\x01\x02\x03")
    assert raw.session.wait_closed(TIMEOUT)


def test_send_sync_lists_open_connections(raw: Raw) -> None:
    raw.session.dial("tcp", "a:1")
    raw.session.dial("tcp", "a:2")
    raw.session.send_sync()
    message = raw.receive_type(MessageType.SYNC_CONNECTIONS)
    assert bytes(message.payload) == encode_sync_payload([2, 3])


def test_add_and_remove_client_reach_listener(raw_factory: Callable[..., Raw]) -> None:
    seen: List[Tuple[Any, bool, str, int]] = []
    raw = raw_factory(client_listener=lambda *args: seen.append(args))
    raw.send(MessageType.ADD_CLIENT, 0, b"foo/5577006791947779410")
    raw.send(MessageType.REMOVE_CLIENT, 0, b"foo/5577006791947779410")
    raw.send(MessageType.ADD_CLIENT, 0, b"malformed")  # logged and ignored
    raw.send(MessageType.ADD_CLIENT, 0, b"a/b/12")
    wait_for(lambda: len(seen) == 3)
    assert seen == [
        (raw.session, True, "foo", 5577006791947779410),
        (raw.session, False, "foo", 5577006791947779410),
        (raw.session, True, "a/b", 12),
    ]
    assert not raw.session.closed


def test_send_client_added_and_removed(raw: Raw) -> None:
    raw.session.send_client_added("foo", 12)
    raw.session.send_client_removed("foo", 12)
    added, removed = raw.receive(), raw.receive()
    assert (added.type, added.conn_id, added.text) == (MessageType.ADD_CLIENT, 0, "foo/12")
    assert (removed.type, removed.text) == (MessageType.REMOVE_CLIENT, "foo/12")


# ------------------------------------------------------------ session end
def test_session_end_fails_every_connection_at_once(
    tunnel: Tuple[SessionPair, AcceptingHandler],
) -> None:
    pair, handler = tunnel
    conns = [dial_pair(pair, handler)[0] for _ in range(4)]
    for conn in conns:
        conn.settimeout(None)  # blocked forever unless the session end frees them
    conns[3].sendall(b"unread")
    paused = conns[2]
    paused.set_peer_paused(True)
    errors: List[BaseException] = []
    started = threading.Barrier(4, timeout=TIMEOUT)

    def block_reading(conn: TunnelConnection) -> None:
        started.wait()
        try:
            conn.recv(10)
        except OSError as exc:
            errors.append(exc)

    def block_writing() -> None:
        started.wait()
        try:
            paused.sendall(b"x")
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=block_reading, args=(c,), daemon=True) for c in conns[:2]]
    threads.append(threading.Thread(target=block_writing, daemon=True))
    for thread in threads:
        thread.start()
    started.wait()
    wait_for(lambda: all(t.is_alive() for t in threads))
    pair.client_end.close()  # the WebSocket drops
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert len(errors) == 3
    for exc in errors:
        assert isinstance(exc, TunnelClosedError) and "tunnel disconnect" in str(exc)
    assert pair.server.wait_closed(TIMEOUT) and pair.client.wait_closed(TIMEOUT)
    assert pair.server.connection_ids() == []
    with pytest.raises(TunnelClosedError):
        conns[0].sendall(b"x")


def test_close_callbacks_run_once(raw: Raw) -> None:
    calls: List[Session] = []
    raw.session.add_close_callback(calls.append)
    raw.session.close("bye")
    raw.session.close("again")
    assert calls == [raw.session]
    raw.session.add_close_callback(calls.append)  # after the end: at once
    assert calls == [raw.session, raw.session]
    assert raw.session.close_reason == "bye"
    assert "closed: bye" in repr(raw.session)


# ---------------------------------------------------------- backpressure








# ---------------------------------------------------------------- timeouts






def test_write_lock_timeout_is_a_timeout(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1")
    conn.settimeout(0.05)
    with raw.session._write_lock:  # a stuck WebSocket write elsewhere
        conn.sendall(b"x")  # queued behind it
        with pytest.raises(socket.timeout):  # a message's worth is queued: wait
            conn.sendall(b"y" * raw.session.limits.max_data_message)
    assert not raw.session.closed


class BatchingTransport(MemoryTransport):
    """A memory transport that also offers ``send_many`` and counts its calls."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.batches: List[int] = []

    def send_many(self, messages: List[bytes]) -> None:
        self.batches.append(len(messages))
        for message in messages:
            self.send(message)


@pytest.mark.parametrize("batching", [False, True], ids=["send", "send_many"])
def test_writers_behind_a_busy_socket_queue_and_the_holder_sends_in_order(batching: bool) -> None:
    """A writer that finds the WebSocket busy queues its message and returns
    at once; the thread writing sends it before letting go of the socket,
    in the order written, and a connection's ERROR after its data. What
    queued goes in one ``send_many`` where the transport has one."""
    if batching:
        far, near = MemoryTransport("memory-client"), BatchingTransport("memory-server")
        far.peer, near.peer = near, far
    else:
        far, near = memory_pair()
    session = Session(near, is_client=False, limits=Limits(), heartbeat=Heartbeat("queue-test"))
    thread = session.start()
    try:
        first, second = session.dial("tcp", "a:1"), session.dial("tcp", "b:2")
        first.sendall(b"one")
        far.capacity = 1  # what the far end holds unread blocks the next write
        stuck = threading.Thread(target=first.sendall, args=(b"two",), daemon=True)
        stuck.start()  # blocks in the transport with the socket taken
        wait_for(session._write_lock.locked)
        second.settimeout(TIMEOUT / 4)
        payload = bytearray(b"three")
        second.sendall(payload)  # before the change: waited, and timed out
        payload[:] = b"xxxxx"  # the caller's buffer is its own again: a copy was queued
        second.sendall(b"four")
        seen: List[Tuple[int, int, bytes]] = []

        def read_far() -> None:
            while len(seen) < 7:
                message = decode_message(far.receive(timeout=TIMEOUT))
                seen.append((message.type, message.conn_id, bytes(message.payload)))

        reader = threading.Thread(target=read_far, daemon=True)
        reader.start()
        second.close()  # its ERROR goes after its queued data
        for each in (reader, stuck):
            each.join(TIMEOUT)
            assert not each.is_alive()
        assert seen == [
            (MessageType.CONNECT, first.conn_id, b"tcp/a:1"),
            (MessageType.CONNECT, second.conn_id, b"tcp/b:2"),
            (MessageType.DATA, first.conn_id, b"one"),
            (MessageType.DATA, first.conn_id, b"two"),
            (MessageType.DATA, second.conn_id, b"three"),
            (MessageType.DATA, second.conn_id, b"four"),
            (MessageType.ERROR, second.conn_id, b"EOF"),
        ]
        assert session._queued_bytes == 0
        assert not session.closed
        if isinstance(near, BatchingTransport):
            assert max(near.batches) >= 2  # "three" and "four" at least went together
    finally:
        session.close("test over")
        thread.join(TIMEOUT)


# --------------------------------------------------------------- heartbeat
def test_client_pings(raw_factory: Callable[..., Raw]) -> None:
    raw = raw_factory(is_client=True, limits=Limits(ping_interval=0.02, read_deadline=5.0))
    deadline = time.monotonic() + TIMEOUT
    while raw.far.pings_received < 3:
        assert time.monotonic() < deadline, "no pings"
        try:
            raw.far.receive(timeout=0.02)
        except TimeoutError:
            pass
    assert not raw.session.closed


def test_client_without_pong_is_closed_after_read_deadline(raw_factory: Callable[..., Raw]) -> None:
    # The far end never reads, so no ping is ever answered.
    raw = raw_factory(is_client=True, limits=Limits(ping_interval=0.02, read_deadline=0.2))
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    assert raw.session.wait_closed(TIMEOUT)
    assert "no keepalive" in raw.session.close_reason
    with pytest.raises(TunnelClosedError, match="tunnel disconnect"):
        conn.recv(1)


def test_server_without_pings_is_closed_after_read_deadline(raw_factory: Callable[..., Raw]) -> None:
    raw = raw_factory(is_client=False, limits=Limits(read_deadline=0.2))
    # Data does not count as keepalive, as in Go.
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    for _ in range(3):
        raw.send(MessageType.DATA, conn.conn_id, b"x")
    assert raw.session.wait_closed(TIMEOUT)
    assert "no keepalive" in raw.session.close_reason


def test_pinging_pair_stays_up(session_pair_factory: Callable[..., SessionPair]) -> None:
    # Pings for two read deadlines; the deadline is wide enough that a loaded
    # machine's scheduling stalls do not pass for a dead peer.
    limits = Limits(ping_interval=0.05, read_deadline=1.0, sync_interval=0.05)
    pair = session_pair_factory(limits=limits)
    wait_for(lambda: pair.server_end.pings_received >= 40)
    assert not pair.client.closed and not pair.server.closed


def test_client_sends_sync_periodically(raw_factory: Callable[..., Raw]) -> None:
    handler = AcceptingHandler()
    raw = raw_factory(is_client=True, connect_handler=handler,
                      limits=Limits(sync_interval=0.05, ping_interval=0.02))
    raw.send(MessageType.CONNECT, 2, b"tcp/x:1")
    handler.next()
    message = raw.receive_type(MessageType.SYNC_CONNECTIONS)
    if bytes(message.payload) == b"":  # a sync from before the CONNECT arrived
        message = raw.receive_type(MessageType.SYNC_CONNECTIONS)
    assert bytes(message.payload) == encode_sync_payload([2])


# ---------------------------------------------------------------- hygiene
def test_many_connections_leave_no_threads_or_entries(
    tunnel: Tuple[SessionPair, AcceptingHandler],
) -> None:
    pair, handler = tunnel
    before = threading.active_count()
    for _ in range(50):
        server_conn, client_conn = dial_pair(pair, handler)
        server_conn.sendall(b"ping")
        assert recv_exactly(client_conn, 4) == b"ping"
        client_conn.close()
        assert server_conn.recv(1) == b""
        server_conn.close()
    wait_for(lambda: pair.server.connection_ids() == [] and pair.client.connection_ids() == [])
    gc.collect()
    assert threading.active_count() <= before






# ------------------------------------------------------------- concurrency




def test_dial_times_out_on_a_stuck_websocket(raw: Raw) -> None:
    with raw.session._write_lock:
        with pytest.raises(socket.timeout):
            raw.session.dial("tcp", "a:1", timeout=0.05)
    assert raw.session.connection_ids() == []
    assert not raw.session.closed


class CountingObserver:
    def __init__(self) -> None:
        self.added: List[int] = []
        self.removed: List[int] = []
        self.paused = self.resumed = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None

    def connection_added(self, session: Session, conn: TunnelConnection) -> None:
        with self.lock:
            self.added.append(conn.conn_id)

    def connection_removed(self, session: Session, conn: TunnelConnection) -> None:
        with self.lock:
            self.removed.append(conn.conn_id)


def test_observer_sees_every_connection_added_and_removed_once(
    raw_factory: Callable[..., Raw],
) -> None:
    observer = CountingObserver()
    handler = AcceptingHandler()
    raw = raw_factory(limits=SMALL, observer=observer, is_client=True, connect_handler=handler)
    closed_locally = raw.session.dial("tcp", "a:1")
    remote_error = raw.session.dial("tcp", "a:2")
    remote_eof = raw.session.dial("tcp", "a:3")
    synced = raw.session.dial("tcp", "a:4")
    overflowed = raw.session.dial("tcp", "a:5")
    left_open = raw.session.dial("tcp", "a:6")
    raw.send(MessageType.CONNECT, 2, b"tcp/x:1")  # the peer dials us
    handler.next().close()
    closed_locally.close()
    closed_locally.close()
    raw.send(MessageType.ERROR, remote_error.conn_id, b"boom")
    raw.send(MessageType.ERROR, remote_error.conn_id, b"boom again")
    raw.send(MessageType.ERROR, remote_eof.conn_id, b"EOF")
    remote_eof.close()
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload([synced.conn_id]))
    raw.barrier()
    ids = [c.conn_id for c in (remote_eof, overflowed, left_open)]
    raw.send(MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload(ids))
    chunk = b"o" * SMALL.max_data_message
    for _ in range(SMALL.hard_buffer_limit // len(chunk) + 2):
        raw.send(MessageType.DATA, overflowed.conn_id, chunk)
    raw.barrier()
    assert synced.ended and overflowed.ended and not left_open.ended
    raw.session.close("done")
    assert left_open.ended
    with observer.lock:
        assert sorted(observer.added) == sorted(observer.removed)
        assert len(observer.added) == 7


# --------------------------------------------------- the recorded Go session
def _trace_messages() -> List[Any]:
    import json

    from testkit.support import go_vectors

    with open(go_vectors("go-session-trace.json"), encoding="utf-8") as f:
        events = json.load(f)["events"]
    return [e for e in events if e["kind"] == "message"]


def test_replay_go_clients_answers_into_our_server(raw: Raw) -> None:
    """Our server dials conns 2, 3 and 4 as the Go server did; the Go
    client's recorded answers for them (ERRORs for the refused conn 3,
    PAUSE/RESUME are the server's) and its SYNC [2, 4] are fed back verbatim."""
    messages = _trace_messages()
    conns = {i: raw.session.dial("tcp", f"127.0.0.1:{port}", timeout=TIMEOUT)
             for i, port in ((2, 8125), (3, 1), (4, 8125))}
    assert sorted(conns) == [c.conn_id for c in conns.values()]
    connects = [e for e in messages if e["dir"] == "s2c" and e["type_name"] == "CONNECT"]
    for expected in connects:  # our CONNECT payloads are Go's, byte for byte
        sent = raw.receive_type(MessageType.CONNECT)
        assert sent.conn_id == expected["conn_id"]
        assert bytes(sent.payload).hex() == expected["payload_hex"]
    # The first DATA the Go client sent on conn 2 (payload given by its head).
    first_data = next(e for e in messages if e["dir"] == "c2s" and e["type_name"] == "DATA")
    head = bytes.fromhex(first_data["payload_head_hex"])
    raw.far.send(bytes.fromhex(first_data["header_hex"]) + head)
    assert recv_exactly(conns[2], len(head)) == head  # "HTTP/1.1 200 OK\r"
    client_errors = [e for e in messages if e["dir"] == "c2s" and e["type_name"] == "ERROR"]
    for event in client_errors:
        raw.far.send(bytes.fromhex(event["header_hex"] + event["payload_hex"]))
    with pytest.raises(RemoteError) as info:
        conns[3].recv(1)
    assert info.value.remote_message == "dial tcp 127.0.0.1:1: connect: connection refused"
    sync = next(e for e in messages if e["type_name"] == "SYNC_CONNECTIONS")
    for _ in range(2):  # twice: a connection is only closed from its second sync on
        raw.far.send(bytes.fromhex(sync["header_hex"] + sync["payload_hex"]))
    raw.barrier()
    assert raw.session.connection_ids() == [2, 4]
    assert not conns[2].ended and not conns[4].ended and not raw.session.closed


def test_stuck_session_does_not_hold_up_the_shared_heartbeat() -> None:
    """One heartbeat thread serves every session: a session whose WebSocket
    write is stuck must not delay the pings and syncs of the others."""
    heartbeat = Heartbeat("shared-heartbeat")
    limits = Limits(ping_interval=0.02, sync_interval=0.02, read_deadline=30.0,
                    control_write_timeout=30.0)
    stuck_far, stuck_near = memory_pair()
    healthy_far, healthy_near = memory_pair()
    stuck = Session(stuck_near, is_client=True, limits=limits, heartbeat=heartbeat)
    healthy = Session(healthy_near, is_client=True, limits=limits, heartbeat=heartbeat)
    stuck._write_lock.acquire()  # a write that never finishes
    threads = [stuck.start(), healthy.start()]
    try:
        syncs = 0
        deadline = time.monotonic() + TIMEOUT
        while syncs < 5:
            assert time.monotonic() < deadline, "the healthy session's syncs stalled"
            try:
                message = decode_message(healthy_far.receive(timeout=0.05))
            except TimeoutError:
                continue
            syncs += message.type == MessageType.SYNC_CONNECTIONS
    finally:
        stuck._write_lock.release()
        stuck.close("test over")
        healthy.close("test over")
        for thread in threads:
            thread.join(TIMEOUT)
    del stuck_far
