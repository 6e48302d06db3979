"""Idle server WebSockets parked on the shared poller (issue 24): pings are
answered without the reader thread, anything else is handed back to it with
every byte already read, and the read deadline still ends a dead peer. Real
sockets over loopback; a real :class:`~remotedialer.session.Session` where a
session is involved."""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import TransportClosed
from remotedialer.frames import OP_BINARY, OP_PING, OP_PONG, FrameReader, encode_masked_frame
from remotedialer.heartbeat import Heartbeat
from remotedialer.poller import Poller
from remotedialer.protocol import MessageType, encode_message
from remotedialer.session import Session
from remotedialer.transports.wsgi import ServerWebSocket
from testkit.support import TIMEOUT, wait_for

MAX_MESSAGE = 1 << 20


def loopback_pair() -> Tuple[socket.socket, socket.socket]:
    """``(server_sock, client_sock)``: a TCP connection over 127.0.0.1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client_sock = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server_sock, _ = listener.accept()
    client_sock.settimeout(TIMEOUT)
    return server_sock, client_sock


class Peer:
    """The client end, writing masked frames and reading the server's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = FrameReader(MAX_MESSAGE, from_client=False)

    def send(self, opcode: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_masked_frame(opcode, payload))

    def read(self) -> Tuple[int, bytes]:
        while True:
            event = self.frames.next_event()
            if event is not None:
                return event
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed")
            self.frames.feed(data)

    def ping_pong(self, count: int) -> None:
        """Send ``count`` pings, then read their ``count`` pongs."""
        for index in range(count):
            self.send(OP_PING, b"%d" % index)
        for index in range(count):
            assert self.read() == (OP_PONG, b"%d" % index)


@pytest.fixture
def poller() -> Poller:
    return Poller("test-poller")


@pytest.fixture
def connected() -> Iterator[Tuple[ServerWebSocket, Peer]]:
    server_sock, client_sock = loopback_pair()
    ws = ServerWebSocket(server_sock, MAX_MESSAGE, "test")
    yield ws, Peer(client_sock)
    ws.close()
    server_sock.close()
    client_sock.close()


def park(peer: Peer, poller: Poller) -> None:
    """A ping answered by the reader: an idle reader parks after it."""
    peer.ping_pong(1)
    wait_for(lambda: len(poller) == 1)


def start_receiving(ws: ServerWebSocket) -> "queue.Queue[Any]":
    """Call ``ws.receive()`` on a thread; its result (or exception) lands in the queue."""
    results: "queue.Queue[Any]" = queue.Queue()

    def run() -> None:
        try:
            results.put(ws.receive())
        except Exception as exc:
            results.put(exc)

    threading.Thread(target=run, daemon=True).start()
    return results


@pytest.mark.parametrize("parked", [True, False])
def test_a_parked_reader_does_not_wake_for_pings(
    connected: Tuple[ServerWebSocket, Peer], poller: Poller, parked: bool
) -> None:
    ws, peer = connected
    if parked:
        assert ws.park_when(lambda: True, poller)
    results = start_receiving(ws)
    peer.ping_pong(1)  # the reader answers the first ping itself, then parks
    wait_for(lambda: len(poller) == (1 if parked else 0))
    peer.ping_pong(20)
    # the reader thread read none of the pings itself when parked, each when not
    assert ws.reader_frames == (1 if parked else 21)
    assert len(poller) == (1 if parked else 0)
    peer.send(OP_BINARY, b"hello")
    assert results.get(timeout=TIMEOUT) == b"hello"
    assert ws.reader_frames == (2 if parked else 22)
    assert poller.resumed == (1 if parked else 0)


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_a_frame_split_across_the_hand_over_arrives_whole(
    connected: Tuple[ServerWebSocket, Peer], poller: Poller, cut: int
) -> None:
    """A ping and the first ``cut`` bytes of a message reach the poller
    together; the pong proves it read them; the rest reaches the reader."""
    ws, peer = connected
    ws.park_when(lambda: True, poller)
    results = start_receiving(ws)
    park(peer, poller)
    message = encode_masked_frame(OP_BINARY, b"x" * 300 + b"end")
    peer.sock.sendall(encode_masked_frame(OP_PING, b"p") + message[:cut])
    assert peer.read() == (OP_PONG, b"p")
    assert results.empty()
    peer.sock.sendall(message[cut:])
    assert results.get(timeout=TIMEOUT) == b"x" * 300 + b"end"


def test_frames_behind_the_handed_one_stay_in_order(
    connected: Tuple[ServerWebSocket, Peer], poller: Poller
) -> None:
    ws, peer = connected
    ws.park_when(lambda: True, poller)
    results = start_receiving(ws)
    park(peer, poller)
    peer.sock.sendall(b"".join(encode_masked_frame(OP_BINARY, b"%d" % i) for i in range(5)))
    received = [results.get(timeout=TIMEOUT)]
    received += [ws.receive() for _ in range(4)]  # already read: no park, no wait
    assert received == [b"0", b"1", b"2", b"3", b"4"]


@pytest.mark.parametrize("ending", ["peer EOF", "our close"])
def test_an_end_reaches_a_parked_reader(
    connected: Tuple[ServerWebSocket, Peer], poller: Poller, ending: str
) -> None:
    """The peer's EOF, or close() from another thread (the read deadline's
    way), wakes the parked reader with TransportClosed."""
    ws, peer = connected
    ws.park_when(lambda: True, poller)
    results = start_receiving(ws)
    park(peer, poller)
    if ending == "peer EOF":
        peer.sock.shutdown(socket.SHUT_WR)
    else:
        ws.close()
    error = results.get(timeout=TIMEOUT)
    assert isinstance(error, TransportClosed)
    assert str(error).endswith("websocket EOF" if ending == "peer EOF" else "websocket closed")
    assert len(poller) == 0


# ------------------------------------------------------ with a real session
class ServedSession:
    """A server :class:`Session` over a :class:`ServerWebSocket` parked when
    it has no connection open, as the server sets it up."""

    def __init__(
        self, poller: Poller, limits: Limits = Limits(), heartbeat: Optional[Heartbeat] = None
    ) -> None:
        server_sock, client_sock = loopback_pair()
        self.socks = (server_sock, client_sock)
        self.ws = ServerWebSocket(server_sock, MAX_MESSAGE, "test")
        self.peer = Peer(client_sock)
        self.connects: "queue.Queue[TunnelConnection]" = queue.Queue()
        self.heartbeat = heartbeat or Heartbeat("test-heartbeat")
        self.session = Session(self.ws, is_client=False, client_key="agent",
                               connect_handler=self.connects.put, limits=limits, heartbeat=self.heartbeat)
        self.ws.park_when(lambda: self.session.connection_count() == 0, poller)
        self.thread = self.session.start()

    def close(self) -> None:
        self.session.close("test over")
        self.thread.join(TIMEOUT)
        for sock in self.socks:
            sock.close()


def test_a_connect_on_a_parked_session_is_served(poller: Poller) -> None:
    served = ServedSession(poller)
    try:
        served.peer.ping_pong(3)
        wait_for(lambda: len(poller) == 1)
        message = encode_message(1, 7, MessageType.CONNECT, b"tcp/127.0.0.1:9")
        served.peer.send(OP_BINARY, message)
        conn = served.connects.get(timeout=TIMEOUT)
        assert (conn.conn_id, conn.proto, conn.address) == (7, "tcp", "127.0.0.1:9")
        # with a connection open the reader reads for itself: pings wake it
        before = served.ws.reader_frames
        served.peer.ping_pong(2)
        assert served.ws.reader_frames == before + 2
        assert len(poller) == 0
    finally:
        served.close()


def test_a_dead_peer_of_a_parked_session_is_cut_by_the_read_deadline(poller: Poller) -> None:
    served = ServedSession(poller, Limits(read_deadline=0.3, ping_interval=0.1))
    try:
        served.peer.ping_pong(1)
        wait_for(lambda: len(poller) == 1)
        assert served.session.wait_closed(TIMEOUT)  # no more pings: the deadline ends it
        assert "no keepalive" in served.session.close_reason
        served.thread.join(TIMEOUT)
        assert not served.thread.is_alive()
        assert len(poller) == 0
    finally:
        served.close()


def test_many_parked_sessions_share_one_poller() -> None:
    """100 sessions on one poller; pings trickling in 5 ms apart are served
    a batch per wake-up (a wide batch window, for a loaded machine; with
    none, each ping wakes the poller)."""
    poller = Poller("test-poller", batch_window=0.05)
    heartbeat = Heartbeat("test-heartbeat")
    sessions: List[ServedSession] = []
    try:
        for _ in range(100):
            sessions.append(ServedSession(poller, heartbeat=heartbeat))
        for _round in range(3):
            for served in sessions:
                served.peer.send(OP_PING, b"r")
            for served in sessions:
                assert served.peer.read() == (OP_PONG, b"r")
        wait_for(lambda: len(poller) == 100)
        assert sum(served.ws.reader_frames for served in sessions) == 100  # the first ping each
        before = poller.wakeups
        for served in sessions[:40]:
            served.peer.send(OP_PING, b"batch")
            time.sleep(0.005)  # the pings' spacing (the scenario, not a wait for anything)
        for served in sessions[:40]:
            assert served.peer.read() == (OP_PONG, b"batch")
        assert poller.wakeups - before < 15  # 40 pings over 0.2 s: many per wake-up
        sessions[42].peer.send(OP_BINARY, encode_message(1, 9, MessageType.CONNECT, b"tcp/127.0.0.1:9"))
        assert sessions[42].connects.get(timeout=TIMEOUT).conn_id == 9
        assert len(poller) == 99
    finally:
        for served in sessions:
            served.close()
