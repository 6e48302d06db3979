"""Idle server WebSockets parked on the shared poller (issue 24): the reader
thread leaves when its transport parks, pings are answered without one,
anything else (or a dial) starts a new reader with every byte already read,
and the read deadline still ends a dead peer. Real sockets over loopback; a
real :class:`~remotedialer.session.Session` where a session is involved."""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import ReaderReleased, TransportClosed
from remotedialer.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameReader, encode_masked_frame
from remotedialer.heartbeat import Heartbeat
from remotedialer.poller import Poller
from remotedialer.protocol import MessageType, decode_message, encode_message
from remotedialer.session import RELEASED, Session
from remotedialer.transports.wsgi import ServerWebSocket
from testkit.support import TIMEOUT, recv_exactly, wait_for

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
    ws.close_taken_socket()
    server_sock.close()
    client_sock.close()


def park(peer: Peer, poller: Poller) -> None:
    """A ping answered by the reader: an idle reader parks after it."""
    peer.ping_pong(1)
    wait_for(lambda: len(poller) == 1)


class Receiver:
    """Calls ``ws.receive()`` on a thread; its result (or exception) lands in
    ``results``. A released reader's thread ends; :meth:`again` (the
    transport's ``serve_again``) starts the next one."""

    def __init__(self, ws: ServerWebSocket) -> None:
        self.ws = ws
        self.results: "queue.Queue[Any]" = queue.Queue()
        self.threads: List[threading.Thread] = []
        self.released = 0

    def again(self) -> None:
        thread = threading.Thread(target=self._run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self) -> None:
        try:
            self.results.put(self.ws.receive())
        except ReaderReleased:
            self.released += 1
        except Exception as exc:
            self.results.put(exc)

    def park_when_idle(self, poller: Poller) -> None:
        assert self.ws.park_when(lambda: True, poller, self.again)


def start_receiving(ws: ServerWebSocket, poller: Optional[Poller] = None) -> "queue.Queue[Any]":
    """A :class:`Receiver` for ``ws`` (parking on ``poller`` if given) started; its results."""
    receiver = Receiver(ws)
    if poller is not None:
        receiver.park_when_idle(poller)
    receiver.again()
    return receiver.results


@pytest.mark.parametrize("parked", [True, False])
def test_a_parked_reader_does_not_wake_for_pings(
    connected: Tuple[ServerWebSocket, Peer], poller: Poller, parked: bool
) -> None:
    ws, peer = connected
    receiver = Receiver(ws)
    if parked:
        receiver.park_when_idle(poller)
    receiver.again()
    peer.ping_pong(1)  # the reader answers the first ping itself, then parks
    wait_for(lambda: len(poller) == (1 if parked else 0))
    if parked:  # and its thread is gone
        receiver.threads[0].join(TIMEOUT)
        assert not receiver.threads[0].is_alive() and receiver.released == 1
    peer.ping_pong(20)
    # no reader read any of the pings when parked; the one reader read each when not
    assert ws.reader_frames == (1 if parked else 21)
    assert len(poller) == (1 if parked else 0)
    assert len(receiver.threads) == 1
    peer.send(OP_BINARY, b"hello")
    assert receiver.results.get(timeout=TIMEOUT) == b"hello"
    assert ws.reader_frames == (2 if parked else 22)
    assert poller.resumed == (1 if parked else 0)
    assert len(receiver.threads) == (2 if parked else 1)  # a new reader took the message


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_a_frame_split_across_the_hand_over_arrives_whole(
    connected: Tuple[ServerWebSocket, Peer], poller: Poller, cut: int
) -> None:
    """A ping and the first ``cut`` bytes of a message reach the poller
    together; the pong proves it read them; the rest reaches the reader."""
    ws, peer = connected
    results = start_receiving(ws, poller)
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
    results = start_receiving(ws, poller)
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
    results = start_receiving(ws, poller)
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
        self.ws.park_when(lambda: self.session.connection_count() == 0, poller, self.serve_again)
        self.threads: List[threading.Thread] = []
        self.ended: "queue.Queue[str]" = queue.Queue()  # why the session ended
        self.serve_again()

    def serve_again(self) -> None:
        """Serve on a new thread (the first reader, and each after a park),
        as the server does."""
        thread = threading.Thread(target=self._serve, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        reason = self.session.serve(self.ws)
        if reason is not RELEASED:
            self.ws.close()
            self.ws.close_taken_socket()
            self.ended.put(reason)

    def live_threads(self) -> List[threading.Thread]:
        return [thread for thread in self.threads if thread.is_alive()]

    def parked(self, poller: Poller) -> None:
        """Wait until the session is parked and no reader thread is left."""
        wait_for(lambda: len(poller) == 1 and not self.live_threads())

    def close(self) -> None:
        self.session.close("test over")
        for thread in self.threads:
            thread.join(TIMEOUT)
        for sock in self.socks:
            sock.close()


def test_a_connect_on_a_parked_session_is_served(poller: Poller) -> None:
    served = ServedSession(poller)
    try:
        served.peer.ping_pong(3)
        served.parked(poller)
        message = encode_message(1, 7, MessageType.CONNECT, b"tcp/127.0.0.1:9")
        served.peer.send(OP_BINARY, message)
        conn = served.connects.get(timeout=TIMEOUT)
        assert (conn.conn_id, conn.proto, conn.address) == (7, "tcp", "127.0.0.1:9")
        # with a connection open the reader reads for itself: pings wake it
        before = served.ws.reader_frames
        served.peer.ping_pong(2)
        assert served.ws.reader_frames == before + 2
        assert len(poller) == 0
        assert len(served.threads) == 2 and len(served.live_threads()) == 1
    finally:
        served.close()


def test_a_dead_peer_of_a_parked_session_is_cut_by_the_read_deadline(poller: Poller) -> None:
    served = ServedSession(poller, Limits(read_deadline=0.3, ping_interval=0.1))
    try:
        served.peer.ping_pong(1)
        served.parked(poller)
        assert served.session.wait_closed(TIMEOUT)  # no more pings: the deadline ends it
        assert "no keepalive" in served.ended.get(timeout=TIMEOUT)
        for thread in served.threads:
            thread.join(TIMEOUT)  # the last reader puts its reason, then returns
        assert not served.live_threads()
        assert len(poller) == 0
        assert served.ws.sock.fileno() == -1  # the socket taken from the "server" is closed
        assert served.peer.sock.recv(100)  # the close frame came
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


def test_a_dial_through_a_parked_session_starts_its_reader_at_once(poller: Poller) -> None:
    """The server's CONNECT takes the socket off the poller before it goes
    out: a reader waits for the answer instead of the poller's next look."""
    served = ServedSession(poller)
    try:
        served.peer.ping_pong(1)
        served.parked(poller)
        conn = served.session.dial("tcp", "127.0.0.1:9", timeout=TIMEOUT)
        assert len(poller) == 0 and poller.resumed == 1  # handed back by the dial itself
        assert len(served.threads) == 2
        opcode, payload = served.peer.read()
        connect = decode_message(payload)
        assert (opcode, connect.type, connect.conn_id) == (OP_BINARY, MessageType.CONNECT, conn.conn_id)
        served.peer.send(OP_BINARY, encode_message(2, conn.conn_id, MessageType.DATA, b"answer"))
        assert conn.recv(100) == b"answer"
        assert served.ws.reader_frames == 2  # the first ping, the answer: read by readers
        conn.close()
        opcode, payload = served.peer.read()
        assert (opcode, decode_message(payload).type) == (OP_BINARY, MessageType.ERROR)  # its EOF
        # closed and idle again: the next ping parks it, and its reader leaves
        wait_for(lambda: served.session.connection_count() == 0)
        served.peer.ping_pong(1)
        served.parked(poller)
    finally:
        served.close()


class ParkHook(Poller):
    """A poller that runs ``hook`` on the releasing reader's thread right
    after that reader parked, before it leaves: the window of a release."""

    hook: Optional[Any] = None

    def park(self, parked: Any) -> None:
        super().park(parked)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()


def test_a_connect_arriving_while_the_reader_is_released_is_served_in_order() -> None:
    """A CONNECT and two DATA messages arrive while the releasing reader is
    still on its way out: the next reader serves them, in order, while the
    old one is held there; the old one then leaves without touching them."""
    poller = ParkHook("test-poller")
    served = ServedSession(poller)
    try:
        released = threading.Event()

        def send_while_releasing() -> None:
            served.peer.sock.sendall(b"".join(
                encode_masked_frame(OP_BINARY, message) for message in (
                    encode_message(1, 7, MessageType.CONNECT, b"tcp/127.0.0.1:9"),
                    encode_message(2, 7, MessageType.DATA, b"first "),
                    encode_message(3, 7, MessageType.DATA, b"second"),
                )
            ))
            conn = served.connects.get(timeout=TIMEOUT)  # served by the next reader meanwhile
            assert recv_exactly(conn, 12) == b"first second"
            assert served.threads[0].is_alive()  # this thread: still inside the release
            released.set()

        poller.hook = send_while_releasing
        served.peer.ping_pong(1)
        assert released.wait(TIMEOUT)
        served.threads[0].join(TIMEOUT)
        assert not served.threads[0].is_alive()
        assert len(served.live_threads()) == 1  # the reader of the open connection
        assert served.session.connection_count() == 1 and not served.session.closed
        before = served.ws.reader_frames
        served.peer.ping_pong(2)  # a connection is open: the reader reads the pings
        assert served.ws.reader_frames == before + 2 and len(poller) == 0
    finally:
        served.close()


def test_closing_a_parked_session_ends_it_on_a_reader(poller: Poller) -> None:
    """close() from another thread (Server.disconnect, a shutdown) while
    parked: the poller hands the socket back, a reader ends the session and
    closes the socket taken from the server; no thread is left."""
    served = ServedSession(poller)
    try:
        served.peer.ping_pong(1)
        served.parked(poller)
        served.session.close("disconnected")
        assert served.ended.get(timeout=TIMEOUT) == "disconnected"
        assert len(served.threads) == 2
        for thread in served.threads:
            thread.join(TIMEOUT)
        assert not served.live_threads() and len(poller) == 0
        assert served.ws.sock.fileno() == -1
        served.peer.sock.settimeout(TIMEOUT)
        assert served.peer.read()[0] == OP_CLOSE
        with pytest.raises(EOFError):
            served.peer.read()
    finally:
        served.close()
