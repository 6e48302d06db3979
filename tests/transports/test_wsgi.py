"""The server-side WebSocket: the handshake helpers, and
:class:`ServerWebSocket` / :class:`SimpleWebSocketTransport` over real socket
pairs driven by a hand-written client."""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
from typing import Any, Dict, List, Tuple

import pytest
from urllib3.util.wait import wait_for_write

from remotedialer.errors import ProtocolError
from remotedialer.transports.base import TransportClosed, sendall_parts
from remotedialer.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_frame
from remotedialer.transports.wsgi import (
    NODELAY_SET,
    IDLE_RECEIVE_BYTES,
    RECEIVE_BYTES,
    ServerWebSocket,
    SimpleWebSocketTransport,
    accept_key,
    is_websocket_request,
    socket_from_environ,
)

from testkit.raw_websocket import client_frame, read_server_frame
from testkit.support import TIMEOUT, recv_until_eof, wait_for


# ----------------------------------------------------------------- helpers
@pytest.fixture
def pair() -> Any:
    """A connected ``(server_sock, client_sock)`` socket pair with timeouts."""
    server_sock, client_sock = socket.socketpair()
    client_sock.settimeout(TIMEOUT)
    yield server_sock, client_sock
    server_sock.close()
    client_sock.close()


# ---------------------------------------------------------------- handshake
def test_accept_key_rfc6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade_environ(**overrides: str) -> Dict[str, Any]:
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "keep-alive, Upgrade",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode(),
    }
    environ.update(overrides)
    return environ


def test_is_websocket_request() -> None:
    assert is_websocket_request(upgrade_environ()) is None
    assert is_websocket_request(upgrade_environ(HTTP_UPGRADE="WebSocket")) is None
    assert "GET" in str(is_websocket_request(upgrade_environ(REQUEST_METHOD="POST")))
    assert "upgrade" in str(is_websocket_request(upgrade_environ(HTTP_UPGRADE="h2c")))
    assert "Connection" in str(is_websocket_request(upgrade_environ(HTTP_CONNECTION="close")))
    assert "version" in str(is_websocket_request(upgrade_environ(HTTP_SEC_WEBSOCKET_VERSION="8")))
    assert "Key" in str(is_websocket_request(upgrade_environ(HTTP_SEC_WEBSOCKET_KEY="")))
    assert "Key" in str(is_websocket_request(upgrade_environ(HTTP_SEC_WEBSOCKET_KEY="c2hvcnQ=")))
    plain = {"REQUEST_METHOD": "GET"}
    assert is_websocket_request(plain) is not None


@pytest.mark.parametrize("name, value, valid", [
    ("HTTP_CONNECTION", "keep-alive, Upgrade", True),
    ("HTTP_CONNECTION", "UPGRADE", True),
    ("HTTP_CONNECTION", "upgrades", False),
    ("HTTP_CONNECTION", "no-upgrade", False),
    ("HTTP_UPGRADE", "h2c, websocket", True),
    ("HTTP_UPGRADE", "websockets", False),
    ("HTTP_SEC_WEBSOCKET_VERSION", "8, 13", True),
    ("HTTP_SEC_WEBSOCKET_VERSION", "130", False),
    ("HTTP_SEC_WEBSOCKET_VERSION", "1, 3", False),
    ("HTTP_SEC_WEBSOCKET_KEY", " dGhlIHNhbXBsZSBub25jZQ== ", True),
    ("HTTP_SEC_WEBSOCKET_KEY", "dGhlIHNhbXBsZSBub25jZQ", False),  # unpadded
    ("HTTP_SEC_WEBSOCKET_KEY", "dGhlIHNhbXBsZSBub25jZQ==dGhl", False),
])
def test_is_websocket_request_takes_tokens_not_substrings(name: str, value: str, valid: bool) -> None:
    """The header checks match whole comma-separated tokens (any case), a
    value holding only the token as well as a list."""
    assert (is_websocket_request(upgrade_environ(**{name: value})) is None) is valid


def test_socket_from_environ() -> None:
    marker = object()
    assert socket_from_environ({"werkzeug.socket": marker}) == (marker, "werkzeug")
    assert socket_from_environ({"gunicorn.socket": marker}) == (marker, "gunicorn")
    with pytest.raises(RuntimeError, match="does not expose"):
        socket_from_environ({})


def test_accept_writes_101_response(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    environ = upgrade_environ(HTTP_SEC_WEBSOCKET_KEY="dGhlIHNhbXBsZSBub25jZQ==")
    environ["werkzeug.socket"] = server_sock
    ws = ServerWebSocket.accept(environ, 1 << 20)
    response = b""
    while not response.endswith(b"\r\n\r\n"):
        response += client_sock.recv(1)
    lines = response.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in lines
    assert "Upgrade: websocket" in lines and "Connection: Upgrade" in lines
    ws.close()


@pytest.mark.parametrize("front_end_set_it", [False, True])
def test_accept_sets_tcp_nodelay_unless_the_front_end_did(front_end_set_it: bool) -> None:
    """TCP_NODELAY is on for the tunnel, set once: the upgrade leaves it to
    a front end that says (``NODELAY_SET``) it set it already."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_sock = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT)
        server_sock, _ = listener.accept()
    with client_sock, server_sock:
        environ = upgrade_environ()
        environ["werkzeug.socket"] = server_sock
        if front_end_set_it:
            environ[NODELAY_SET] = True
        ws = ServerWebSocket.accept(environ, 1 << 20)
        nodelay = server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert bool(nodelay) is not front_end_set_it  # left alone: still off here
        ws.close()


# ---------------------------------------------------------- ServerWebSocket
def test_messages_both_ways_and_ping_keepalive(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 22)
    before = ws.last_keepalive
    big = os.urandom(3 << 20)
    sender = threading.Thread(target=client_sock.sendall, args=(
        client_frame(OP_PING, b"hb") + client_frame(OP_BINARY, b"small") + client_frame(OP_BINARY, big),
    ))
    sender.start()
    assert ws.receive() == b"small"  # the ping before it was answered on the way
    assert ws.last_keepalive > before
    assert read_server_frame(client_sock) == (OP_PONG, b"hb")
    assert ws.receive() == big
    sender.join(TIMEOUT)
    ws.send(b"x" * 70000)
    ws.send(b"")
    assert read_server_frame(client_sock) == (OP_BINARY, b"x" * 70000)
    assert read_server_frame(client_sock) == (OP_BINARY, b"")
    ws.close()


def test_send_many_writes_each_message_as_its_own_frame(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 22)
    messages = [b"first", b"", b"y" * 70000, memoryview(b"last")]
    ws.send_many(messages)
    for message in messages:
        assert read_server_frame(client_sock) == (OP_BINARY, bytes(message))
    ws.close()


def test_client_close_is_answered_then_nothing_more(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 20)
    client_sock.sendall(client_frame(OP_CLOSE, struct.pack("!H", 1001) + b"going"))
    with pytest.raises(TransportClosed, match="1001"):
        ws.receive()
    ws.close()
    with pytest.raises(TransportClosed):
        ws.send(b"late")
    rest = recv_until_eof(client_sock)
    assert rest == encode_frame(OP_CLOSE, struct.pack("!H", 1001))
    assert ws.close_code == 1001 and ws.close_reason == "going"


def test_text_message_is_a_protocol_error(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 20)
    client_sock.sendall(client_frame(OP_TEXT, b"hi"))
    with pytest.raises(ProtocolError, match="text"):
        ws.receive()
    opcode, payload = read_server_frame(client_sock)
    assert opcode == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == 1003
    ws.close()


def test_oversized_message_closes_with_1009(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1000)
    client_sock.sendall(client_frame(OP_BINARY, b"y" * 2000))
    with pytest.raises(ProtocolError, match="over the limit"):
        ws.receive()
    opcode, payload = read_server_frame(client_sock)
    assert opcode == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == 1009
    ws.close()


def test_close_from_another_thread_ends_blocked_receive(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 20)
    errors: List[BaseException] = []

    def reader() -> None:
        try:
            ws.receive()
        except BaseException as exc:  # noqa: B036 - recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    ws.close()
    ws.close()  # idempotent
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TransportClosed)
    assert read_server_frame(client_sock) == (OP_CLOSE, struct.pack("!H", 1000))
    assert recv_until_eof(client_sock) == b""


def test_eof_ends_receive(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 20)
    client_sock.shutdown(socket.SHUT_WR)
    with pytest.raises(TransportClosed, match="EOF"):
        ws.receive()
    ws.close()


def test_concurrent_sends_and_pongs_never_interleave(pair: Tuple[socket.socket, socket.socket]) -> None:
    """Writers on several threads plus pongs from the reader: every frame
    arrives whole (each write is complete and under one lock) and the reader
    never blocks on the socket to answer a ping."""
    server_sock, client_sock = pair
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    ws = ServerWebSocket(server_sock, 1 << 20)
    per_thread, threads_n = 40, 4
    payloads = {t: bytes([t]) * (10000 + t) for t in range(threads_n)}
    pings = 50

    def writer(t: int) -> None:
        for _ in range(per_thread):
            ws.send(payloads[t])

    def pinger() -> None:
        client_sock.sendall(b"".join(client_frame(OP_PING, b"%d" % i) for i in range(pings))
                            + client_frame(OP_BINARY, b"done"))

    def server_reader() -> None:
        assert ws.receive() == b"done"

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    threads += [threading.Thread(target=pinger), threading.Thread(target=server_reader)]
    for thread in threads:
        thread.start()
    counts = {t: 0 for t in range(threads_n)}
    pongs: List[int] = []
    while sum(counts.values()) < per_thread * threads_n:
        opcode, payload = read_server_frame(client_sock)
        if opcode == OP_PONG:
            pongs.append(int(payload))
            continue
        assert opcode == OP_BINARY
        t = payload[0]
        assert payload == payloads[t]
        counts[t] += 1
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    # pongs may be deferred or coalesced (only the latest ping needs one),
    # never reordered or duplicated
    assert pongs == sorted(set(pongs))
    # a pong still owed goes out after the next write at the latest
    client_sock.sendall(client_frame(OP_PING, b"last") + client_frame(OP_BINARY, b"sync"))
    assert ws.receive() == b"sync"
    flusher = threading.Thread(target=ws.send, args=(b"flush",))
    flusher.start()
    seen = set()
    while seen != {"last", "flush"}:
        opcode, payload = read_server_frame(client_sock)
        if opcode == OP_PONG and payload == b"last":
            seen.add("last")
        elif opcode == OP_BINARY:
            assert payload == b"flush"
            seen.add("flush")
    flusher.join(TIMEOUT)
    ws.close()


# ------------------------------------------------------- simple-websocket
def _simple_websocket_environ(sock: socket.socket) -> Dict[str, Any]:
    environ = upgrade_environ(HTTP_SEC_WEBSOCKET_KEY="dGhlIHNhbXBsZSBub25jZQ==", HTTP_HOST="localhost")
    environ["werkzeug.socket"] = sock
    return environ


def test_simple_websocket_transport(pair: Tuple[socket.socket, socket.socket]) -> None:
    server_sock, client_sock = pair
    ws = SimpleWebSocketTransport(_simple_websocket_environ(server_sock), 1 << 20)
    response = b""
    while not response.endswith(b"\r\n\r\n"):
        response += client_sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response
    before = ws.last_keepalive
    client_sock.sendall(client_frame(OP_PING, b"k") + client_frame(OP_BINARY, b"hello"))
    assert ws.receive() == b"hello"
    assert ws.last_keepalive > before
    assert read_server_frame(client_sock) == (OP_PONG, b"k")
    ws.send(b"z" * 100000)
    assert read_server_frame(client_sock) == (OP_BINARY, b"z" * 100000)
    client_sock.sendall(client_frame(OP_TEXT, b"no"))
    with pytest.raises(ProtocolError):
        ws.receive()
    ws.close()
    with pytest.raises(TransportClosed):
        ws.receive()
    assert ws.ws.thread is not None
    ws.ws.thread.join(TIMEOUT)
    assert not ws.ws.thread.is_alive()


def _simple_websocket(sock: socket.socket, client_sock: socket.socket,
                      **options: Any) -> SimpleWebSocketTransport:
    ws = SimpleWebSocketTransport(_simple_websocket_environ(sock), 1 << 20, **options)
    response = b""
    while not response.endswith(b"\r\n\r\n"):
        response += client_sock.recv(1)
    return ws


def test_simple_websocket_pings_and_ends_a_silent_client(pair: Tuple[socket.socket, socket.socket]) -> None:
    """Liveness through simple-websocket's public ``ping_interval``: a client
    that answers the pings stays, one that does not is closed (1008), and
    ``last_keepalive`` stops moving then."""
    server_sock, client_sock = pair
    ws = _simple_websocket(server_sock, client_sock, ping_interval=0.2)
    for _ in range(2):  # answered: still open
        opcode, payload = read_server_frame(client_sock)
        assert opcode == OP_PING
        client_sock.sendall(client_frame(OP_PONG, payload))
    assert ws.ws.connected
    assert read_server_frame(client_sock)[0] == OP_PING  # not answered
    opcode, payload = read_server_frame(client_sock)
    assert (opcode, payload[:2]) == (OP_CLOSE, struct.pack("!H", 1008))
    with pytest.raises(TransportClosed):
        ws.receive()
    stopped = ws.last_keepalive
    assert ws.last_keepalive == stopped
    ws.close()


def test_simple_websocket_close_is_bounded_when_the_client_does_not_read(
    pair: Tuple[socket.socket, socket.socket],
) -> None:
    server_sock, client_sock = pair
    ws = _simple_websocket(server_sock, client_sock)
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer_error: List[BaseException] = []

    def fill() -> None:  # blocks once the client's buffers are full
        try:
            while True:
                ws.send(b"x" * 65536)
        except TransportClosed as exc:
            writer_error.append(exc)

    writer = threading.Thread(target=fill, daemon=True)
    writer.start()
    wait_for(lambda: not wait_for_write(server_sock, timeout=0))
    closer = threading.Thread(target=ws.close)
    closer.start()
    closer.join(TIMEOUT)
    assert not closer.is_alive(), "close blocked on a client that does not read"
    writer.join(TIMEOUT)
    assert writer_error, "the blocked writer was not released"


def test_second_close_waits_until_the_close_frame_is_out(pair: Tuple[socket.socket, socket.socket]) -> None:
    """The WSGI handler's close must not return (and let the server close the
    socket) while another thread's close is still writing the close frame."""
    server_sock, client_sock = pair
    ws = ServerWebSocket(server_sock, 1 << 20)
    ws._send_lock.acquire()  # a writer is busy: the first close must wait for it
    first = threading.Thread(target=ws.close)
    first.start()
    wait_for(ws._close_lock.locked)
    second_done = threading.Event()
    second = threading.Thread(target=lambda: (ws.close(), second_done.set()))
    second.start()
    assert not second_done.wait(0.2), "the second close returned before the first finished"
    ws._send_lock.release()
    assert second_done.wait(TIMEOUT)
    first.join(TIMEOUT)
    assert recv_until_eof(client_sock) == encode_frame(OP_CLOSE, struct.pack("!H", 1000))


class _RecordingSocket:
    """A socket proxy that records the size of every ``recv``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sizes: List[int] = []

    def recv(self, size: int) -> bytes:
        self.sizes.append(size)
        return self._sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_idle_reads_ask_for_small_buffers(pair: Tuple[socket.socket, socket.socket]) -> None:
    """A blocked reader holds the buffer it asked for: after small reads (an
    idle tunnel's pings) it asks for a small one, after a large read for
    ``receive_bytes`` again (bulk transfers)."""
    server_sock, client_sock = pair
    recording = _RecordingSocket(server_sock)
    ws = ServerWebSocket(recording, 1 << 22)  # type: ignore[arg-type]
    client_sock.sendall(client_frame(OP_PING) + client_frame(OP_BINARY, b"a"))
    assert ws.receive() == b"a"
    assert read_server_frame(client_sock) == (OP_PONG, b"")
    big = os.urandom(200_000)
    sender = threading.Thread(target=client_sock.sendall, args=(client_frame(OP_BINARY, big),))
    sender.start()
    assert ws.receive() == big
    sender.join(TIMEOUT)
    assert recording.sizes[0] == IDLE_RECEIVE_BYTES  # nothing read yet
    client_sock.sendall(client_frame(OP_BINARY, b"b"))
    assert ws.receive() == b"b"
    client_sock.sendall(client_frame(OP_BINARY, b"c"))
    assert ws.receive() == b"c"
    assert recording.sizes[-1] == IDLE_RECEIVE_BYTES  # after the small read of b"b"
    assert max(recording.sizes) == RECEIVE_BYTES  # the large message
    ws.close()


class _NoSendmsg:
    """A socket without ``sendmsg`` (as on Windows): ``sendall`` only."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: Any) -> None:
        self.sock.sendall(data)


@pytest.mark.parametrize("wrap", [False, True], ids=["sendmsg", "sendall"])
def test_sendall_parts_writes_both_parts_whole_through_partial_writes(wrap: bool) -> None:
    """A 4 MiB tail through a socket pair with small buffers: ``sendmsg``
    takes part of it at a time and the rest is finished in order."""
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    head, tail = b"header", memoryview(os.urandom(4 << 20))
    received: List[bytes] = []
    thread = threading.Thread(target=lambda: received.append(recv_until_eof(reader)))
    thread.start()
    try:
        sendall_parts(_NoSendmsg(writer) if wrap else writer, head, tail)
        writer.shutdown(socket.SHUT_WR)
        thread.join(TIMEOUT)
        assert received == [head + bytes(tail)]
    finally:
        writer.close()
        reader.close()


def test_a_large_message_in_two_parts_reaches_the_client_as_one_frame() -> None:
    server, client = socket.socketpair()
    try:
        ws = ServerWebSocket(server, 1 << 22)
        header, payload = b"\x01\x02\x03", memoryview(os.urandom(2 << 20))
        frames: List[Tuple[int, bytes]] = []
        thread = threading.Thread(target=lambda: frames.append(read_server_frame(client)))
        thread.start()
        ws.send(header, payload)
        thread.join(TIMEOUT)
        assert frames == [(OP_BINARY, header + bytes(payload))]
    finally:
        server.close()
        client.close()
