"""Hostile input: a peer that sends garbage, floods, or ignores flow control.

Every case runs against a victim session while a well-behaved bystander
session moves data through an echo connection the whole time. After each
case the victim either ended its session with a clear reason or kept serving
(it still answers a probe), and the bystander never saw an error.

The victims: a server :class:`Session` over the in-memory transport, and (in
``TestRunningServer``) a real WSGI server under werkzeug, attacked by a raw
websocket-client WebSocket sending hand-made frames.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
import websocket

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import LimitExceededError, RemoteError
from remotedialer.heartbeat import Heartbeat
from remotedialer.piping import LocalDialer, Piper
from remotedialer.protocol import MessageType
from remotedialer.session import Session
from remotedialer.testing import memory_pair
from remotedialer.transports.base import TransportClosed
from testkit.hostile import PROBE_ID, RawPeer, memory_raw_peer
from testkit.support import (
    TIMEOUT,
    EchoServer,
    SessionPair,
    SilentListener,
    TunnelServer,
    recv_up_to,
    wait_for,
)

KiB = 1024
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# Small limits so that floods and giant messages stay cheap.
HOSTILE_LIMITS = Limits(
    pause_threshold=64 * KiB,
    resume_threshold=16 * KiB,
    hard_buffer_limit=256 * KiB,
    max_data_message=16 * KiB,
    max_message_size=128 * KiB,
    max_connections_per_session=32,
)



# ------------------------------------------------------------------- helpers
class Bystander:
    """A well-behaved session that keeps echoing data through a tunneled
    connection on a thread while the attacker does its worst."""

    CHUNK = b"0123456789abcdef" * 256  # 4 KiB

    def __init__(self, dial: Callable[[str], TunnelConnection], echo_address: str) -> None:
        self.conn = dial(echo_address)
        self.conn.settimeout(TIMEOUT)
        self.rounds = 0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.conn.sendall(self.CHUNK)
                got = recv_up_to(self.conn, len(self.CHUNK))
                if len(got) < len(self.CHUNK):
                    raise EOFError("bystander connection ended")
                if got != self.CHUNK:
                    raise AssertionError("bystander data corrupted")
                self.rounds += 1
        except BaseException as exc:  # recorded, asserted by the test
            self.error = exc

    def assert_healthy(self, more_rounds: int = 20) -> None:
        """No error so far, and data still flows (``more_rounds`` echoes from now)."""
        target = self.rounds + more_rounds
        wait_for(lambda: self.rounds >= target or self.error is not None)
        assert self.error is None, f"bystander failed: {self.error!r}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()
        self.conn.close()


# -------------------------------------------------------------------- victims
class MemoryVictim:
    """A server session over the in-memory transport, plus a bystander pair."""

    def __init__(self, echo: EchoServer, limits: Limits = HOSTILE_LIMITS) -> None:
        self.heartbeat = Heartbeat("hostile-heartbeat")
        self.listener_calls: List[Tuple[bool, str, int]] = []
        attacker_end, server_end = memory_pair()
        self.session = Session(
            server_end,
            is_client=False,
            client_key="attacker",
            session_key=4242,
            limits=limits,
            heartbeat=self.heartbeat,
            client_listener=lambda _s, added, key, skey: self.listener_calls.append((added, key, skey)),
        )
        self.thread = self.session.start()
        self.attacker = memory_raw_peer(attacker_end)
        self.piper = Piper("hostile-piper")
        self.local_dialer = LocalDialer(lambda proto, address: True, piper=self.piper)
        self.pair = SessionPair(limits=limits, connect_handler=self.local_dialer, heartbeat=self.heartbeat)
        self.bystander = Bystander(
            lambda address: self.pair.server.dial("tcp", address, timeout=TIMEOUT), echo.address
        )

    def dial_attacker(self, address: str = "127.0.0.1:1") -> TunnelConnection:
        """The server dials through the attacker's session."""
        return self.session.dial("tcp", address, timeout=TIMEOUT)

    def assert_survived(self) -> None:
        assert not self.pair.server.closed and not self.pair.client.closed
        self.bystander.assert_healthy()

    def close(self) -> None:
        self.bystander.stop()
        self.attacker.close()
        self.session.close("test over")
        self.thread.join(TIMEOUT)
        self.pair.close()
        self.local_dialer.shutdown()
        self.piper.stop()


@pytest.fixture
def victim(echo_server: EchoServer) -> Iterator[MemoryVictim]:
    made = MemoryVictim(echo_server)
    yield made
    made.close()


# ---------------------------------------------------------------------- cases
# Each case takes (attacker, victim) and returns True if the victim's session
# must have ended, False if it must still be serving.
Case = Callable[[RawPeer, Any], bool]


def case_text_frame(attacker: RawPeer, victim: Any) -> bool:
    attacker.send_text("hello, I am text")
    return True


def case_empty_message(attacker: RawPeer, victim: Any) -> bool:
    attacker.send_raw(b"")
    return True


def case_truncated_varint(attacker: RawPeer, victim: Any) -> bool:
    attacker.send_raw(b"\x02\x80")
    return True


def case_varint_overflow(attacker: RawPeer, victim: Any) -> bool:
    attacker.send_raw(b"\xff" * 10 + b"\x01\x02\x02")
    return True


def case_data_without_deadline(attacker: RawPeer, victim: Any) -> bool:
    attacker.send_raw(b"\x02\x04\x02")
    return True


def case_connect_without_slash(attacker: RawPeer, victim: Any) -> bool:
    attacker.send(MessageType.CONNECT, 77, b"tcp127.0.0.1:80")
    return True


def case_sync_bad_length(attacker: RawPeer, victim: Any) -> bool:
    attacker.send(MessageType.SYNC_CONNECTIONS, 0, b"\x01\x02\x03")
    return True


def case_giant_message(attacker: RawPeer, victim: Any) -> bool:
    try:
        attacker.send(MessageType.DATA, PROBE_ID, b"G" * (victim.session.limits.max_message_size + 1))
    except (OSError, websocket.WebSocketException):
        pass  # the victim may hang up before it took the whole message
    return True


def case_oversized_connect(attacker: RawPeer, victim: Any) -> bool:
    # A server refuses dials from its client; the huge address costs nothing.
    attacker.send(MessageType.CONNECT, 91, b"tcp/" + b"a" * 100_000)
    refusal = attacker.expect(MessageType.ERROR, 91)
    assert len(refusal.payload) <= 100
    assert 91 not in victim.session.connection_ids()
    return False


def case_oversized_error(attacker: RawPeer, victim: Any) -> bool:
    conn = victim.dial_attacker()
    attacker.expect(MessageType.CONNECT, conn.conn_id)
    attacker.send(MessageType.ERROR, conn.conn_id, b"e" * 100_000)
    with pytest.raises(RemoteError) as info:
        conn.recv(10)
    assert info.value.remote_message == "e" * 100  # cut at the protocol's read limit
    conn.close()
    return False


def case_oversized_add_client(attacker: RawPeer, victim: Any) -> bool:
    attacker.send(MessageType.ADD_CLIENT, 0, b"k" * 100_000 + b"/1")
    attacker.send(MessageType.REMOVE_CLIENT, 0, b"k" * 100_000 + b"/1")
    attacker.send(MessageType.ADD_CLIENT, 0, b"no-session-key")
    return False


def case_data_for_unknown_ids(attacker: RawPeer, victim: Any) -> bool:
    ids = [0, 1, -1, 12345, INT64_MAX, INT64_MIN]
    for conn_id in ids:
        attacker.send(MessageType.DATA, conn_id, b"who?")
    for conn_id in ids:
        answer = attacker.expect(MessageType.ERROR, conn_id)
        session = victim.session
        expected = f"connection not found {session.client_key}/{session.session_key}/{conn_id}"
        assert answer.text == expected.encode()[:100].decode(), answer
    return False


def case_connect_flood(attacker: RawPeer, victim: Any) -> bool:
    count = 2000
    for conn_id in range(10_000, 10_000 + count):
        attacker.send(MessageType.CONNECT, conn_id, b"tcp/127.0.0.1:1")
    for conn_id in range(10_000, 10_000 + count):
        attacker.expect(MessageType.ERROR, conn_id)
    assert victim.session.connection_ids() == []
    return False


def case_stray_control_messages(attacker: RawPeer, victim: Any) -> bool:
    for conn_id in (5, -5, INT64_MAX):
        attacker.send(MessageType.PAUSE, conn_id)
        attacker.send(MessageType.RESUME, conn_id)
        attacker.send(MessageType.ERROR, conn_id, b"EOF")
    for message_type in (0, 9, 99, -1, INT64_MAX):
        attacker.send(message_type, 1, b"whatever")
    return False


def case_duplicate_connect_of_live_id(attacker: RawPeer, victim: Any) -> bool:
    conn = victim.dial_attacker()
    attacker.expect(MessageType.CONNECT, conn.conn_id)
    attacker.send(MessageType.CONNECT, conn.conn_id, b"tcp/127.0.0.1:2")
    attacker.expect(MessageType.ERROR, conn.conn_id)
    # the existing connection is untouched
    attacker.send(MessageType.DATA, conn.conn_id, b"still mine")
    conn.settimeout(TIMEOUT)
    assert conn.recv(100) == b"still mine"
    conn.close()
    return False


def case_ignores_pause(attacker: RawPeer, victim: Any) -> bool:
    limits = victim.session.limits
    greedy = victim.dial_attacker("127.0.0.1:10")
    polite = victim.dial_attacker("127.0.0.1:11")
    for conn in (greedy, polite):
        conn.settimeout(TIMEOUT)
        attacker.expect(MessageType.CONNECT, conn.conn_id)
    chunk = b"g" * limits.max_data_message
    for _ in range(limits.hard_buffer_limit // len(chunk) + 4):
        attacker.send(MessageType.DATA, greedy.conn_id, chunk)  # never stops for PAUSE
    attacker.send(MessageType.DATA, polite.conn_id, b"still flowing")
    assert polite.recv(100) == b"still flowing"
    attacker.expect(MessageType.PAUSE, greedy.conn_id)
    cut = attacker.expect(MessageType.ERROR, greedy.conn_id)
    assert "limit" in cut.text, cut
    with pytest.raises(LimitExceededError):
        while True:
            greedy.recv(64 * KiB)
    assert greedy.conn_id not in victim.session.connection_ids()
    polite.sendall(b"reply")
    assert bytes(attacker.expect(MessageType.DATA, polite.conn_id).payload) == b"reply"
    polite.close()
    return False


CASES: List[Case] = [
    case_text_frame,
    case_empty_message,
    case_truncated_varint,
    case_varint_overflow,
    case_data_without_deadline,
    case_connect_without_slash,
    case_sync_bad_length,
    case_giant_message,
    case_oversized_connect,
    case_oversized_error,
    case_oversized_add_client,
    case_data_for_unknown_ids,
    case_connect_flood,
    case_stray_control_messages,
    case_duplicate_connect_of_live_id,
    case_ignores_pause,
]


def _case_id(case: Case) -> str:
    return case.__name__[len("case_"):]


def run_case(case: Case, attacker: RawPeer, victim: Any) -> None:
    victim.bystander.assert_healthy(5)
    must_end = case(attacker, victim)
    if must_end:
        assert victim.session.wait_closed(TIMEOUT), "hostile input did not end the session"
        assert victim.session.close_reason, "session ended without a reason"
        attacker.wait_closed()
    else:
        attacker.probe()
        assert not victim.session.closed, victim.session.close_reason
    victim.assert_survived()


# ---------------------------------------------------------- in-memory victim
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hostile_input_to_session(case: Case, victim: MemoryVictim) -> None:
    run_case(case, victim.attacker, victim)


def test_reasons_name_the_offence(echo_server: EchoServer) -> None:
    """The close reason says what was wrong, for the logs."""
    expected = {
        case_text_frame: "text",
        case_varint_overflow: "overflow",
        case_connect_without_slash: "connect address",
        case_sync_bad_length: "format",
        case_giant_message: "over the limit",
    }
    for case, words in expected.items():
        victim = MemoryVictim(echo_server)
        try:
            assert case(victim.attacker, victim)
            assert victim.session.wait_closed(TIMEOUT)
            assert words in victim.session.close_reason, (case.__name__, victim.session.close_reason)
        finally:
            victim.close()


def test_oversized_add_client_reaches_listener_cut(victim: MemoryVictim) -> None:
    victim.attacker.send(MessageType.ADD_CLIENT, 0, b"k" * 1000 + b"/1")
    victim.attacker.send(MessageType.ADD_CLIENT, 0, b"key/" + b"9" * 1000)
    victim.attacker.send(MessageType.ADD_CLIENT, 0, b"key/12")
    victim.attacker.probe()
    # Cut at 100 bytes, neither oversized one parses; the well-formed one does.
    assert victim.listener_calls == [(True, "key", 12)]


def test_connect_flood_on_accepting_side_respects_connection_limit(echo_server: EchoServer) -> None:
    """A hostile *server* flooding a client with CONNECTs: at most
    max_connections_per_session are accepted, the rest refused one by one."""
    accepted: List[TunnelConnection] = []
    limit = HOSTILE_LIMITS.max_connections_per_session
    server_end, client_end = memory_pair()
    session = Session(
        client_end,
        is_client=True,
        connect_handler=accepted.append,
        limits=HOSTILE_LIMITS,
        heartbeat=Heartbeat("hostile-heartbeat"),
    )
    thread = session.start()
    attacker = memory_raw_peer(server_end)
    try:
        for conn_id in range(2, 2 + 3 * limit):
            attacker.send(MessageType.CONNECT, conn_id, b"tcp/127.0.0.1:1")
        refused = [attacker.expect(MessageType.ERROR, conn_id) for conn_id in range(2 + limit, 2 + 3 * limit)]
        assert all(m.text == "too many connections" for m in refused)
        assert len(accepted) == limit and len(session.connection_ids()) == limit
        attacker.probe()
        # Closing accepted ones frees slots for new CONNECTs.
        for conn in accepted[:5]:
            conn.close()
        for conn_id in range(5):
            attacker.send(MessageType.CONNECT, 100_000 + conn_id, b"tcp/127.0.0.1:1")
        attacker.probe()
        assert len(accepted) == limit + 5
        assert not session.closed
    finally:
        session.close("test over")
        thread.join(TIMEOUT)
        attacker.close()


def test_oversized_connect_address_is_cut_before_the_authorizer() -> None:
    """A hostile server's 100 KB CONNECT reaches the client's authorizer as
    at most 266 bytes of ``proto/address``."""
    seen: List[Tuple[str, str]] = []

    def authorizer(proto: str, address: str) -> bool:
        seen.append((proto, address))
        return False

    server_end, client_end = memory_pair()
    dialer = LocalDialer(authorizer)
    session = Session(client_end, is_client=True, connect_handler=dialer, limits=HOSTILE_LIMITS,
                      heartbeat=Heartbeat("hostile-heartbeat"))
    thread = session.start()
    attacker = memory_raw_peer(server_end)
    try:
        attacker.send(MessageType.CONNECT, 2, b"tcp/" + b"a" * 100_000)
        refusal = attacker.expect(MessageType.ERROR, 2)
        assert refusal.text == "connect not allowed"
        assert seen == [("tcp", "a" * (266 - 4))]
        attacker.probe()
    finally:
        session.close("test over")
        thread.join(TIMEOUT)
        attacker.close()
        dialer.shutdown()


def test_transport_closed_mid_flood_leaves_no_connections(victim: MemoryVictim) -> None:
    """The attacker vanishes in the middle of sending: the victim's session
    ends, its connections fail with "tunnel disconnect", nothing blocks."""
    conns = [victim.dial_attacker(f"127.0.0.1:{port}") for port in range(20, 30)]
    for conn in conns:
        victim.attacker.send(MessageType.DATA, conn.conn_id, b"x" * 1000)
    victim.attacker.close()
    assert victim.session.wait_closed(TIMEOUT)
    for conn in conns:
        conn.settimeout(TIMEOUT)
        with pytest.raises(ConnectionError):
            while True:
                if not conn.recv(4096):
                    raise AssertionError("clean EOF instead of tunnel disconnect")
    assert victim.session.connection_ids() == []
    victim.assert_survived()


def test_raw_peer_sees_transport_closed_error() -> None:
    """Self-check of the harness: a closed transport ends the reader."""
    a, b = memory_pair()
    peer = memory_raw_peer(a)
    b.close()
    peer.wait_closed()
    with pytest.raises(TransportClosed):
        a.send(b"x")


# ------------------------------------------------------------ running server
def websocket_raw_peer(url: str, key: str, start: bool = True) -> Tuple[RawPeer, websocket.WebSocket]:
    """A raw websocket-client WebSocket, authorized as client ``key``, that
    sends whatever frames the test makes."""
    ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
    ws.connect(url, header=[f"X-Tunnel-ID: {key}"], timeout=TIMEOUT)
    ws.settimeout(None)

    def receive() -> bytes:
        while True:
            opcode, frame = ws.recv_data_frame(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_BINARY:
                return bytes(frame.data)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise TransportClosed("closed by the server")
            if opcode == websocket.ABNF.OPCODE_TEXT:
                raise AssertionError("the server sent a text message")

    def close() -> None:
        ws.abort()
        ws.shutdown()

    peer = RawPeer(
        lambda data: ws.send(data, websocket.ABNF.OPCODE_BINARY),
        lambda text: ws.send(text, websocket.ABNF.OPCODE_TEXT),
        receive,
        close,
        start=start,
    )
    return peer, ws


class ServerVictim:
    """A :class:`Server` under werkzeug's threaded server on a free loopback
    port, a well-behaved :class:`TunnelClient` moving data through it, and raw
    attackers connecting as client keys of their own."""

    def __init__(
        self,
        echo: EchoServer,
        limits: Limits = HOSTILE_LIMITS,
        client_limits: Limits = Limits(),
        **server_options: Any,
    ) -> None:
        self.tunnel = TunnelServer(limits=limits, **server_options)
        self.server = self.tunnel.server
        self.url = self.tunnel.url
        self.good = self.tunnel.client(
            "good", lambda proto, address: address == echo.address, limits=client_limits
        )
        self.good_session = self.server.sessions("good")[0]
        self.bystander = Bystander(
            lambda address: self.server.dial("good", "tcp", address, timeout=TIMEOUT), echo.address
        )
        self.attackers: List[Tuple[RawPeer, websocket.WebSocket]] = []
        self.key = ""
        self.session: Any = None
        self.attacker = self.new_attacker()

    def new_attacker(self, start: bool = True) -> RawPeer:
        """Connect a fresh raw attacker; it becomes the current one."""
        self.key = f"attacker-{len(self.attackers)}"
        peer, ws = websocket_raw_peer(self.url, self.key, start)
        self.attackers.append((peer, ws))
        wait_for(lambda: self.server.has_session(self.key))
        self.session = self.server.sessions(self.key)[0]
        self.attacker = peer
        return peer

    def dial_attacker(self, address: str = "127.0.0.1:1") -> TunnelConnection:
        return self.server.dial(self.key, "tcp", address, timeout=TIMEOUT)

    def assert_survived(self) -> None:
        """The bystander still flows, its session is the same one, and the
        server still takes new tunnels."""
        assert self.tunnel.thread.is_alive()
        assert not self.good_session.closed, self.good_session.close_reason
        assert self.server.sessions("good") == [self.good_session]
        self.bystander.assert_healthy()
        fresh, _ws = websocket_raw_peer(self.url, "newcomer")
        try:
            fresh.probe()
        finally:
            fresh.close()

    def close(self) -> None:
        self.bystander.stop()
        for peer, _ws in self.attackers:
            peer.close()
        self.tunnel.close()


@pytest.fixture
def server_victim(echo_server: EchoServer) -> Iterator[ServerVictim]:
    made = ServerVictim(echo_server)
    yield made
    made.close()


class TestRunningServer:
    """The same hostile input over real WebSockets to a running server."""

    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_hostile_input(self, case: Case, server_victim: ServerVictim) -> None:
        run_case(case, server_victim.attacker, server_victim)
        if victim_ended := server_victim.session.closed:
            wait_for(lambda: not server_victim.server.has_session(server_victim.key))
        assert victim_ended or server_victim.server.has_session(server_victim.key)

    def test_every_case_in_a_row_against_one_server(self, server_victim: ServerVictim) -> None:
        """One server, one bystander, a new attacker for each case: the server
        is as good after all of them as before."""
        threads_before = threading.active_count()
        for case in CASES:
            attacker = server_victim.new_attacker()
            run_case(case, attacker, server_victim)
            attacker.close()
        for peer, _ws in server_victim.attackers:
            peer.close()
        wait_for(lambda: server_victim.server.list_clients() == ["good"])
        # Every attacker's handler thread ended (a little slack for the bystander's own).
        wait_for(lambda: threading.active_count() <= threads_before + 2)

    @pytest.mark.parametrize(
        "frame, why",
        [
            (b"\x82\x05hello", "unmasked client frame"),
            (b"\x83\x80" + b"\0\0\0\0", "reserved opcode"),
            (b"\xc2\x80" + b"\0\0\0\0", "RSV1 without an extension"),
            (b"\x89\xfe\x00\x7e" + b"\0\0\0\0" + b"p" * 126, "control frame over 125 bytes"),
            (b"\x09\x80" + b"\0\0\0\0", "fragmented ping"),
            (b"\x80\x80" + b"\0\0\0\0", "continuation without a message"),
            (b"\x82\xff" + b"\x80" + b"\0" * 7 + b"\0\0\0\0", "64-bit length with the high bit set"),
            (b"GET / HTTP/1.1\r\n\r\n", "HTTP where a frame belongs"),
        ],
    )
    def test_malformed_websocket_frames(self, frame: bytes, why: str, server_victim: ServerVictim) -> None:
        _peer, ws = server_victim.attackers[-1]
        ws.sock.sendall(frame)
        assert server_victim.session.wait_closed(TIMEOUT), why
        reason = server_victim.session.close_reason
        assert "websocket" in reason or "protocol" in reason, reason
        server_victim.attacker.wait_closed()
        server_victim.assert_survived()

    def test_fragmented_message_over_the_limit(self, server_victim: ServerVictim) -> None:
        """Many small fragments adding up past max_message_size end the session."""
        _peer, ws = server_victim.attackers[-1]
        limit = server_victim.session.limits.max_message_size
        fragment = b"f" * 4096
        try:
            ws.send_frame(websocket.ABNF(0, 0, 0, 0, websocket.ABNF.OPCODE_BINARY, 1, fragment))
            for _ in range(limit // len(fragment) + 2):
                ws.send_frame(websocket.ABNF(0, 0, 0, 0, websocket.ABNF.OPCODE_CONT, 1, fragment))
        except (OSError, websocket.WebSocketException):
            pass  # hung up on us mid-way, as it should
        assert server_victim.session.wait_closed(TIMEOUT)
        assert "limit" in server_victim.session.close_reason
        server_victim.assert_survived()

    def test_peer_that_stops_reading_is_cut_at_the_read_deadline(self, echo_server: EchoServer) -> None:
        """An attacker that never reads fills the socket; the session's writes
        stall, and the heartbeat ends it after read_deadline without a ping
        being answered. Blocked writers are released; the bystander flows."""
        victim = ServerVictim(
            echo_server,
            HOSTILE_LIMITS.replace(read_deadline=1.0),
            client_limits=Limits(ping_interval=0.1),  # the good client keeps its session alive
        )
        try:
            attacker = victim.new_attacker(start=False)  # never reads...
            _peer, ws = victim.attackers[-1]
            stop_pinging = threading.Event()

            def pinger() -> None:  # ...but keeps pinging, as a live client would
                while not stop_pinging.wait(0.1):
                    try:
                        ws.ping()
                    except Exception:
                        return

            threading.Thread(target=pinger, daemon=True).start()
            conn = victim.dial_attacker()
            conn.settimeout(None)
            errors: List[BaseException] = []

            def flood() -> None:
                try:
                    while True:
                        conn.sendall(b"x" * 65536)
                except BaseException as exc:
                    errors.append(exc)

            writer = threading.Thread(target=flood, daemon=True)
            writer.start()
            assert victim.session.wait_closed(TIMEOUT), "stalled session never ended"
            assert "keepalive" in victim.session.close_reason
            writer.join(TIMEOUT)
            assert not writer.is_alive(), "a writer stayed blocked on a dead session"
            assert errors and isinstance(errors[0], (ConnectionError, OSError))
            stop_pinging.set()
            attacker.close()
            assert not victim.good_session.closed, victim.good_session.close_reason
            victim.bystander.assert_healthy()
        finally:
            victim.close()


def test_connect_flood_at_a_server_that_allows_reverse_dials(echo_server: EchoServer) -> None:
    """A client flooding a server that does allow reverse dials: the server
    holds at most max_connections_per_session of them and refuses the rest
    one by one; its other sessions keep flowing."""
    silent = SilentListener()  # accepts and holds every dialed connection
    target = f"127.0.0.1:{silent.port}"
    victim = ServerVictim(echo_server, client_connect_authorizer=lambda proto, address: address == target)
    try:
        limit = victim.session.limits.max_connections_per_session
        count = 4 * limit
        for conn_id in range(1 << 33, (1 << 33) + count):
            victim.attacker.send(MessageType.CONNECT, conn_id, f"tcp/{target}".encode())
        refused = [victim.attacker.expect(MessageType.ERROR, conn_id).text
                   for conn_id in range((1 << 33) + limit, (1 << 33) + count)]
        assert refused == ["too many connections"] * (count - limit)
        wait_for(lambda: len(silent.accepted) == limit)
        assert len(victim.session.connection_ids()) == limit
        run_case(case_data_for_unknown_ids, victim.attacker, victim)
    finally:
        victim.close()
        silent.close()
