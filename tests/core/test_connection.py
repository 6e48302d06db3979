"""TunnelConnection, the socket facade, over a session on the in-memory
WebSocket pair: reads and EOF, closing and aborting, timeouts and
non-blocking mode, flow control as the far end sees it, address shapes."""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, List, Tuple

import pytest

from remotedialer.errors import LimitExceededError, RemoteError
from remotedialer.protocol import MessageType
from testkit.support import SMALL, TIMEOUT, KiB, Raw, recv_exactly, wait_for
from testkit.support import AcceptingHandler, SessionPair, dial_pair  # a real session pair


def test_error_eof_from_peer_is_clean_eof_after_buffered_data(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.send(MessageType.DATA, conn.conn_id, b"last words")
    raw.send(MessageType.ERROR, conn.conn_id, b"EOF")
    assert recv_exactly(conn, 10) == b"last words"
    assert conn.recv(10) == b""
    assert conn.recv(10) == b""
    with pytest.raises(BrokenPipeError):
        conn.send(b"x")


def test_close_sends_error_eof_once(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1")
    raw.receive_type(MessageType.CONNECT)
    conn.close()
    conn.close()
    message = raw.receive()
    assert (message.type, message.conn_id, message.is_eof) == (MessageType.ERROR, 2, True)
    assert raw.nothing_pending()
    assert raw.session.connection_ids() == []
    with pytest.raises(OSError):
        conn.recv(1)


def test_close_from_either_side(tunnel: Tuple[SessionPair, AcceptingHandler]) -> None:
    pair, handler = tunnel
    server_conn, client_conn = dial_pair(pair, handler)
    server_conn.sendall(b"bye")
    server_conn.close()
    assert recv_exactly(client_conn, 3) == b"bye"
    assert client_conn.recv(1) == b""
    wait_for(lambda: pair.client.connection_ids() == [] and pair.server.connection_ids() == [])

    server_conn, client_conn = dial_pair(pair, handler)
    client_conn.close()
    assert server_conn.recv(1) == b""
    with pytest.raises(BrokenPipeError):
        server_conn.sendall(b"x")


def test_abort_gives_the_peer_a_remote_error(tunnel: Tuple[SessionPair, AcceptingHandler]) -> None:
    pair, handler = tunnel
    server_conn, client_conn = dial_pair(pair, handler)
    client_conn.abort(ConnectionResetError("dial tcp x:1: i/o timeout"))
    with pytest.raises(RemoteError, match="i/o timeout"):
        server_conn.recv(1)


def test_pause_and_resume_from_peer_block_and_release_writers(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.receive_type(MessageType.CONNECT)
    raw.send(MessageType.PAUSE, conn.conn_id)
    wait_for(lambda: conn.peer_paused_us)
    done = threading.Event()

    def write() -> None:
        conn.sendall(b"held back")
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert not done.wait(0.2)  # blocked while paused
    assert raw.nothing_pending()
    raw.send(MessageType.RESUME, conn.conn_id)
    assert done.wait(TIMEOUT)
    message = raw.receive_type(MessageType.DATA)
    assert bytes(message.payload) == b"held back"
    writer.join(TIMEOUT)


def test_paused_writer_released_when_connection_ends(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.send(MessageType.PAUSE, conn.conn_id)
    wait_for(lambda: conn.peer_paused_us)
    errors: List[BaseException] = []

    def write() -> None:
        try:
            conn.sendall(b"x")
        except OSError as exc:
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    raw.send(MessageType.ERROR, conn.conn_id, b"gone")
    writer.join(TIMEOUT)
    assert not writer.is_alive()
    assert isinstance(errors[0], RemoteError)


def test_slow_reader_pauses_then_resumes_the_writer(
    session_pair_factory: Callable[..., SessionPair],
) -> None:
    handler = AcceptingHandler()
    # How much is in flight when a PAUSE lands depends on thread scheduling
    # (and on a loaded machine it can be a lot): a generous hard limit here,
    # the cut itself is tested below.
    limits = SMALL.replace(hard_buffer_limit=16 * 1024 * KiB)
    pair = session_pair_factory(limits=limits, connect_handler=handler, capacity=32 * KiB)
    server_conn, client_conn = dial_pair(pair, handler)
    total = 4096 * KiB
    payload = bytes(range(256)) * (total // 256)
    written = threading.Event()

    def write() -> None:
        client_conn.sendall(payload)
        written.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    # Nobody reads: the server's buffer crosses the threshold and it PAUSEs us.
    wait_for(lambda: client_conn.peer_paused_us and server_conn.we_paused_peer)
    high_water = server_conn.buffered
    assert not written.wait(0.2)  # the writer is held
    # Data in flight when a PAUSE lands still arrives, but the buffer never
    # holds everything that was written.
    bound = total // 2
    assert server_conn.buffered <= bound
    assert high_water <= bound
    received = bytearray()
    while len(received) < total:
        received += server_conn.recv(64 * KiB)
        assert server_conn.buffered <= bound  # memory stays bounded throughout
    assert written.wait(TIMEOUT)
    assert bytes(received) == payload
    assert not server_conn.we_paused_peer
    wait_for(lambda: not client_conn.peer_paused_us)
    writer.join(TIMEOUT)


def test_pause_and_resume_are_sent_once_each(raw_factory: Callable[..., Raw]) -> None:
    raw = raw_factory(limits=SMALL)
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.receive_type(MessageType.CONNECT)
    chunk = b"d" * SMALL.max_data_message
    sent = 0
    while sent <= SMALL.pause_threshold + 4 * len(chunk):
        raw.send(MessageType.DATA, conn.conn_id, chunk)
        sent += len(chunk)
    pause = raw.receive()
    assert (pause.type, pause.conn_id) == (MessageType.PAUSE, conn.conn_id)
    assert raw.nothing_pending()  # once, not per message
    assert conn.we_paused_peer and not conn.peer_paused_us  # two different flags
    received = 0
    while conn.buffered >= SMALL.resume_threshold:
        received += len(conn.recv(4 * KiB))
        if conn.buffered >= SMALL.resume_threshold:
            assert raw.nothing_pending() if received % (64 * KiB) == 0 else True
    resume = raw.receive()
    assert (resume.type, resume.conn_id) == (MessageType.RESUME, conn.conn_id)
    received += len(recv_exactly(conn, sent - received))
    assert received == sent
    assert raw.nothing_pending()


def test_peer_ignoring_pause_is_cut_while_others_flow(raw_factory: Callable[..., Raw]) -> None:
    raw = raw_factory(limits=SMALL)
    greedy = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    polite = raw.session.dial("tcp", "a:2", timeout=TIMEOUT)
    chunk = b"g" * SMALL.max_data_message
    for _ in range(SMALL.hard_buffer_limit // len(chunk) + 2):
        raw.send(MessageType.DATA, greedy.conn_id, chunk)  # ignores our PAUSE
    raw.send(MessageType.DATA, polite.conn_id, b"still flowing")
    assert recv_exactly(polite, 13) == b"still flowing"
    assert raw.receive_type(MessageType.PAUSE).conn_id == greedy.conn_id
    cut = raw.receive_type(MessageType.ERROR)
    assert cut.conn_id == greedy.conn_id and "limit" in cut.text
    with pytest.raises(LimitExceededError):
        while True:
            greedy.recv(64 * KiB)
    assert greedy.buffered == 0
    assert raw.session.connection_ids() == [polite.conn_id]
    # Late data for the cut connection is answered as for any unknown id.
    raw.send(MessageType.DATA, greedy.conn_id, chunk)
    assert raw.receive_type(MessageType.ERROR).text.startswith("connection not found")
    polite.sendall(b"reply")
    assert bytes(raw.receive_type(MessageType.DATA).payload) == b"reply"
    assert not raw.session.closed


def test_large_writes_are_split(raw_factory: Callable[..., Raw]) -> None:
    raw = raw_factory(limits=SMALL)
    conn = raw.session.dial("tcp", "a:1", timeout=TIMEOUT)
    raw.receive_type(MessageType.CONNECT)
    conn.sendall(b"z" * (SMALL.max_data_message * 3 + 5))
    sizes = [len(raw.receive_type(MessageType.DATA).payload) for _ in range(4)]
    assert sizes == [SMALL.max_data_message] * 3 + [5]
    assert conn.send(b"q" * (SMALL.max_data_message + 1)) == SMALL.max_data_message


def test_recv_timeout(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1", timeout=0.05)
    assert conn.gettimeout() == 0.05
    with pytest.raises(socket.timeout):
        conn.recv(1)
    with pytest.raises(TimeoutError):
        conn.recv_into(bytearray(4))
    raw.send(MessageType.DATA, conn.conn_id, b"ok")
    conn.settimeout(TIMEOUT)
    assert conn.recv(2) == b"ok"  # still usable after a timeout


def test_send_timeout_while_paused(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1")
    raw.send(MessageType.PAUSE, conn.conn_id)
    wait_for(lambda: conn.peer_paused_us)
    conn.settimeout(0.05)
    with pytest.raises(socket.timeout):
        conn.send(b"x")
    with pytest.raises(TimeoutError):
        conn.sendall(b"x")


def test_non_blocking_mode(raw: Raw) -> None:
    conn = raw.session.dial("tcp", "a:1")
    conn.setblocking(False)
    assert conn.gettimeout() == 0.0 and not conn.getblocking()
    with pytest.raises(BlockingIOError):
        conn.recv(1)
    raw.send(MessageType.PAUSE, conn.conn_id)
    wait_for(lambda: conn.peer_paused_us)
    with pytest.raises(BlockingIOError):
        conn.send(b"x")
    raw.send(MessageType.DATA, conn.conn_id, b"now")
    wait_for(lambda: conn.buffered == 3)
    assert conn.recv(10) == b"now"
    conn.setblocking(True)
    assert conn.gettimeout() is None and conn.getblocking()


@pytest.mark.parametrize(
    "proto,address,peer,own",
    [
        ("tcp", "127.0.0.1:8125", ("127.0.0.1", 8125), ("0.0.0.0", 0)),
        ("tcp", "example.com:80", ("example.com", 80), ("0.0.0.0", 0)),
        ("tcp", "[::1]:443", ("::1", 443, 0, 0), ("::", 0, 0, 0)),
        ("tcp6", "[fe80::1]:22", ("fe80::1", 22, 0, 0), ("::", 0, 0, 0)),
        ("unix", "/var/run/docker.sock", "/var/run/docker.sock", ""),
    ],
)
def test_address_shapes_follow_socket(raw: Raw, proto: str, address: str, peer: Any, own: Any) -> None:
    conn = raw.session.dial(proto, address)
    assert conn.getpeername() == peer
    assert conn.getsockname() == own
    expected_family = {4: socket.AF_INET6, 2: socket.AF_INET}.get(len(peer), socket.AF_UNIX) \
        if isinstance(peer, tuple) else socket.AF_UNIX
    assert conn.family == expected_family


def test_concurrent_writers_on_many_connections(tunnel: Tuple[SessionPair, AcceptingHandler]) -> None:
    pair, handler = tunnel
    pairs = [dial_pair(pair, handler) for _ in range(8)]
    size = 512 * KiB

    def data_for(index: int) -> bytes:
        return bytes([index]) * 1000 + bytes(range(256)) * (size // 256)

    writers = [
        threading.Thread(target=server_conn.sendall, args=(data_for(i),), daemon=True)
        for i, (server_conn, _) in enumerate(pairs)
    ]
    for writer in writers:
        writer.start()
    for i, (_, client_conn) in enumerate(pairs):
        expected = data_for(i)
        assert recv_exactly(client_conn, len(expected)) == expected
    for writer in writers:
        writer.join(TIMEOUT)
        assert not writer.is_alive()


def test_local_close_releases_blocked_reader_and_writer(raw: Raw) -> None:
    reading = raw.session.dial("tcp", "a:1", timeout=None)
    writing = raw.session.dial("tcp", "a:2", timeout=None)
    raw.send(MessageType.PAUSE, writing.conn_id)
    wait_for(lambda: writing.peer_paused_us)
    errors: List[BaseException] = []

    def call(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except OSError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=call, args=(lambda: reading.recv(1),), daemon=True),
        threading.Thread(target=call, args=(lambda: writing.sendall(b"x"),), daemon=True),
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(t.is_alive() for t in threads))
    reading.close()
    writing.close()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert len(errors) == 2
