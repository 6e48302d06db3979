"""Every configurable limit of :class:`remotedialer.config.Limits` is enforced
with a clear error or a clean close: message size, connections per session,
sessions per client key, handshake timeout, and the hard receive-buffer cap."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Tuple

import pytest
import websocket

from remotedialer.client import Backoff, TunnelClient, connect_to_proxy
from remotedialer.config import DEFAULT_LIMITS, Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import (
    HandshakeError,
    LimitExceededError,
    TunnelClosedError,
)
from remotedialer.heartbeat import Heartbeat
from remotedialer.protocol import MessageType, encode_message
from remotedialer.session import Session
from remotedialer.testing import memory_pair

from testkit.support import (
    TIMEOUT,
    EchoServer,
    SilentListener,
    TunnelServer,
    allow_all,
    recv_exactly,
    wait_for,
)
from testkit.hostile import RawPeer, memory_raw_peer

KiB = 1024
MiB = 1024 * KiB


# ------------------------------------------------------------------ defaults
def test_defaults_are_sane_and_match_the_protocol() -> None:
    limits = DEFAULT_LIMITS
    assert limits.pause_threshold == 2 * MiB and limits.resume_threshold == 256 * KiB
    # Far above the pause threshold: TCP buffers keep delivering after PAUSE.
    assert limits.hard_buffer_limit >= 16 * limits.pause_threshold
    assert limits.handshake_timeout == 10.0 and limits.ping_interval == 5.0
    assert limits.read_deadline == 60.0 and limits.sync_interval == 60.0
    assert limits.max_data_message <= limits.max_message_size
    assert limits.max_connections_per_session >= 1000 and limits.max_sessions_per_key >= 1


@pytest.mark.parametrize(
    "changes",
    [
        {"resume_threshold": 0},
        {"resume_threshold": 4 * MiB},
        {"hard_buffer_limit": 1 * MiB},
        {"max_data_message": 0},
        {"max_message_size": 1 * KiB},
        {"max_connections_per_session": 0},
        {"max_sessions_per_key": 0},
        {"dial_workers": 0},
    ],
)
def test_inconsistent_limits_are_refused(changes: dict) -> None:
    with pytest.raises(ValueError):
        Limits().replace(**changes)


def test_replace_returns_a_new_object() -> None:
    changed = DEFAULT_LIMITS.replace(max_connections_per_session=7)
    assert changed.max_connections_per_session == 7
    assert DEFAULT_LIMITS.max_connections_per_session != 7
    with pytest.raises(AttributeError):  # frozen
        changed.max_connections_per_session = 8  # type: ignore[misc]


# ------------------------------------------------------------- message size
@contextlib.contextmanager
def session_with_raw_peer(limits: Limits) -> Iterator[Tuple[Session, RawPeer, TunnelConnection]]:
    """A server session with ``limits`` whose far end is a raw peer the test
    drives, and one connection it dialed (timeout TIMEOUT); all closed after."""
    far, near = memory_pair()
    session = Session(near, is_client=False, client_key="k", session_key=1, limits=limits,
                      heartbeat=Heartbeat("limits-heartbeat"))
    thread = session.start()
    peer = memory_raw_peer(far)
    try:
        conn = session.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
        conn.settimeout(TIMEOUT)
        yield session, peer, conn
    finally:
        session.close("test over")
        thread.join(TIMEOUT)
        peer.close()


def test_message_size_limit_is_inclusive_on_a_session() -> None:
    limits = Limits(max_data_message=16 * KiB, max_message_size=64 * KiB)
    with session_with_raw_peer(limits) as (session, peer, conn):
        header = len(encode_message(1001, conn.conn_id, MessageType.DATA, b""))
        peer.send(MessageType.DATA, conn.conn_id, b"a" * (limits.max_message_size - header))
        assert len(recv_exactly(conn, limits.max_message_size - header)) == limits.max_message_size - header
        peer.send(MessageType.DATA, conn.conn_id, b"b" * (limits.max_message_size - header + 1))
        assert session.wait_closed(TIMEOUT)
        assert "over the limit" in session.close_reason
        with pytest.raises(TunnelClosedError):
            conn.recv(1)


def test_server_ends_a_session_whose_client_sends_a_too_large_message(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    """The client's limits allow 256 KiB DATA messages, the server accepts 64 KiB:
    the client's session ends (and it reconnects); other clients stay."""
    harness = make_tunnel_server(
        limits=Limits(max_data_message=16 * KiB, max_message_size=64 * KiB),
        client_connect_authorizer=allow_all,
    )
    big_sender = harness.client(
        "big", allow_all, limits=Limits(max_data_message=256 * KiB, max_message_size=1 * MiB)
    )
    bystander = harness.client("small", allow_all)
    first = harness.server.sessions("big")[0]
    session = big_sender.session
    assert session is not None
    conn = session.dial("tcp", echo_server.address, TIMEOUT)  # a reverse dial, client -> server
    conn.sendall(b"x" * (200 * KiB))  # one 200 KiB DATA message
    assert first.wait_closed(TIMEOUT)
    assert "limit" in first.close_reason
    assert session.wait_closed(TIMEOUT)
    # The client reconnects on its own; the other client never noticed.
    wait_for(lambda: harness.server.has_session("big") and harness.server.sessions("big")[0] is not first)
    assert bystander.session is not None and not bystander.session.closed
    with harness.server.dial("small", "tcp", echo_server.address, timeout=TIMEOUT) as probe:
        probe.sendall(b"ping")
        assert recv_exactly(probe, 4) == b"ping"


def test_client_ends_a_session_whose_server_sends_a_too_large_message(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    harness = make_tunnel_server(limits=Limits(max_data_message=256 * KiB, max_message_size=1 * MiB))
    client = harness.client(
        "foo", allow_all, limits=Limits(max_data_message=16 * KiB, max_message_size=64 * KiB)
    )
    session = client.session
    assert session is not None
    conn = harness.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    try:
        conn.sendall(b"y" * (200 * KiB))
    except ConnectionError:
        pass  # the client may close on the header, before the payload is all out
    assert session.wait_closed(TIMEOUT)
    assert "over the limit" in session.close_reason
    with pytest.raises((TunnelClosedError, ConnectionError)):
        while conn.recv(65536):
            pass
    client.wait_connected(TIMEOUT)  # reconnected


# --------------------------------------------------- connections per session
def test_max_connections_per_session_on_server_dials(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    harness = make_tunnel_server(limits=Limits(max_connections_per_session=5))
    harness.client("foo", allow_all)
    conns = [harness.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) for _ in range(5)]
    with pytest.raises(LimitExceededError, match="too many connections"):
        harness.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    # The refusal is local and immediate; the open connections all still work.
    for index, conn in enumerate(conns):
        conn.settimeout(TIMEOUT)
        conn.sendall(b"%d" % index)
        assert recv_exactly(conn, 1) == b"%d" % index
    conns.pop().close()
    wait_for(lambda: len(harness.server.sessions("foo")[0].connection_ids()) < 5)
    with harness.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as again:
        again.sendall(b"ok")
        assert recv_exactly(again, 2) == b"ok"
    for conn in conns:
        conn.close()


def test_max_connections_per_session_on_the_accepting_client(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    """A client with a lower limit than its server refuses the CONNECTs over
    its limit one by one (ERROR on that connection), keeping the session."""
    harness = make_tunnel_server()
    client = harness.client("foo", allow_all, limits=Limits(max_connections_per_session=3))
    conns = [harness.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) for _ in range(5)]
    outcomes: List[str] = []
    for conn in conns:
        conn.settimeout(TIMEOUT)
        try:
            conn.sendall(b"hi")
            outcomes.append("ok" if recv_exactly(conn, 2) == b"hi" else "bad")
        except ConnectionError as exc:
            outcomes.append(exc.strerror)
    assert outcomes[:3] == ["ok"] * 3
    assert outcomes[3:] == ["too many connections"] * 2
    assert client.session is not None and not client.session.closed
    for conn in conns:
        conn.close()


# ---------------------------------------------------------- sessions per key
def test_max_sessions_per_key(make_tunnel_server: Callable[..., TunnelServer]) -> None:
    harness = make_tunnel_server(limits=Limits(max_sessions_per_key=2))
    first = harness.client("foo")
    harness.client("foo")
    with pytest.raises(HandshakeError) as info:
        connect_to_proxy(harness.url, {"X-Tunnel-ID": "foo"})
    assert info.value.status == 429 and "too many sessions" in info.value.body
    harness.client("bar")  # other keys are not affected
    first.stop(TIMEOUT)
    wait_for(lambda: len(harness.server.sessions("foo")) == 1)
    harness.client("foo")  # a slot freed up


def test_client_over_the_session_limit_keeps_retrying_with_backoff(
    make_tunnel_server: Callable[..., TunnelServer],
) -> None:
    harness = make_tunnel_server(limits=Limits(max_sessions_per_key=1))
    holder = harness.client("foo")
    waiting = harness.client("foo", wait=False)
    wait_for(lambda: isinstance(waiting.last_error, HandshakeError))
    assert isinstance(waiting.last_error, HandshakeError) and waiting.last_error.status == 429
    holder.stop(TIMEOUT)
    waiting.wait_connected(TIMEOUT)
    wait_for(lambda: len(harness.server.sessions("foo")) == 1)


# --------------------------------------------------------- handshake timeout
@pytest.mark.parametrize(
    "prefix",
    [b"", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"],
    ids=["no-answer", "half-an-answer"],
)
def test_handshake_timeout(prefix: bytes) -> None:
    """A server that accepts TCP but never finishes the upgrade: the
    connect fails after handshake_timeout with a timeout error."""
    silent = SilentListener(prefix)
    outcome: List[BaseException] = []

    def attempt() -> None:
        try:
            connect_to_proxy(
                f"ws://127.0.0.1:{silent.port}/connect",
                {"X-Tunnel-ID": "foo"},
                limits=Limits(handshake_timeout=0.3),
            )
        except BaseException as exc:
            outcome.append(exc)

    try:
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "handshake did not time out"
        assert len(outcome) == 1
        error = outcome[0]
        assert isinstance(error, (TimeoutError, websocket.WebSocketTimeoutException)), repr(error)
        assert silent.accepted, "never even connected"
    finally:
        silent.close()


def test_tunnel_client_survives_handshake_timeouts_and_stops() -> None:
    silent = SilentListener()
    client = TunnelClient(
        f"ws://127.0.0.1:{silent.port}/connect",
        {"X-Tunnel-ID": "foo"},
        limits=Limits(handshake_timeout=0.2),
        backoff=Backoff(initial=0.01, maximum=0.05),
    )
    try:
        client.start()
        wait_for(lambda: len(silent.accepted) >= 2)  # it timed out and tried again
        assert client.last_error is not None
        assert isinstance(client.last_error, (TimeoutError, websocket.WebSocketTimeoutException))
    finally:
        client.stop(TIMEOUT)
        silent.close()
    assert client._thread is not None and not client._thread.is_alive()


# --------------------------------------------------------- hard buffer limit
SMALL_BUFFERS = Limits(
    pause_threshold=64 * KiB,
    resume_threshold=16 * KiB,
    hard_buffer_limit=256 * KiB,
    max_data_message=16 * KiB,
)


def test_hard_buffer_limit_is_exact() -> None:
    """Exactly hard_buffer_limit buffered bytes are kept; one more byte cuts
    the connection (ERROR to the peer, LimitExceededError to our reader)."""
    with session_with_raw_peer(SMALL_BUFFERS) as (session, peer, conn):
        chunk = b"h" * SMALL_BUFFERS.max_data_message
        for _ in range(SMALL_BUFFERS.hard_buffer_limit // len(chunk)):
            peer.send(MessageType.DATA, conn.conn_id, chunk)
        peer.expect(MessageType.PAUSE, conn.conn_id)
        peer.probe()  # everything before it was handled
        assert conn.buffered == SMALL_BUFFERS.hard_buffer_limit and not conn.ended
        peer.send(MessageType.DATA, conn.conn_id, b"!")
        cut = peer.expect(MessageType.ERROR, conn.conn_id)
        assert cut.text == "receive buffer limit exceeded"
        with pytest.raises(LimitExceededError):
            while conn.recv(64 * KiB):  # what was buffered may still be read
                pass
        assert conn.conn_id not in session.connection_ids() and not session.closed


@pytest.mark.parametrize(
    "limits",
    [
        DEFAULT_LIMITS,
        # Many PAUSE/RESUME rounds on both sides at once: this once stalled
        # under CPU load (both readers blocked writing PAUSE/RESUME while both
        # writers waited for the other side to read). Readers now only queue
        # control messages (session.py), so it runs by default.
        DEFAULT_LIMITS.replace(pause_threshold=64 * KiB, resume_threshold=16 * KiB),
    ],
    ids=["defaults", "small-pause-threshold"],
)
def test_well_behaved_peer_never_hits_the_hard_limit(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer, limits: Limits
) -> None:
    """A slow reader at the far end of a real echo tunnel: whatever TCP holds
    in flight when PAUSE goes out still arrives, and the default hard limit
    leaves room for it (at the former 8 MiB this was cut most runs)."""
    harness = make_tunnel_server(limits=limits)
    harness.client("foo", allow_all, limits=limits)
    conn: TunnelConnection = harness.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    conn.settimeout(TIMEOUT)
    total = 32 * MiB
    payload = bytes(range(256)) * (total // 256)
    sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
    sender.start()
    received = bytearray()
    peak = 0
    while len(received) < total:
        peak = max(peak, conn.buffered)
        received += conn.recv(4096)  # small reads: the echo outpaces us
    sender.join(TIMEOUT)
    assert bytes(received) == payload
    assert peak <= limits.hard_buffer_limit and not conn.ended
    print(f"peak receive buffer {peak} bytes (pause at {limits.pause_threshold})")
    conn.close()
