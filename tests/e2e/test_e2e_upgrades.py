"""Upgrades through ``/client/``: a WebSocket client (websocket-client) talks
to a WebSocket echo server (wsproto) behind the agent, through the example
server's forwarder, under every server it is documented under (its own,
gunicorn gthread, our gunicorn worker). The request's ``Upgrade`` and
``Connection`` reach the target; its ``101`` turns the exchange into a
two-way byte pipe (64 MiB each way, byte-exact; a close from either end; the
idle timeout); a ``101`` without a matching upgrade is a 502 and a log line."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from typing import Iterator, List, Optional, Union

import pytest
import websocket

from remotedialer.client import TunnelClient
from testkit.front import FRONT_ENDS, ExampleServer, GunicornFront, start_agent, start_front
from testkit.support import TIMEOUT, LoopbackListener, wait_for
from testkit.websocket_echo import CLOSE_PLEASE, WebSocketEchoServer

MiB = 1024 * 1024
AGENT = "ws-agent"


class Stack:
    """A front end, an agent connected to it, and the WebSocket echo server."""

    def __init__(self, front: Union[ExampleServer, GunicornFront]) -> None:
        self.front = front
        self.echo = WebSocketEchoServer()
        self.agent: TunnelClient = start_agent(front.port, AGENT)

    def url(self, query: str = "") -> str:
        return (f"ws://127.0.0.1:{self.front.port}/client/{AGENT}/http/{self.echo.address}/echo"
                + (f"?{query}" if query else ""))

    def connect(self, query: str = "") -> websocket.WebSocket:
        """A WebSocket through the tunnel (retried while the front end does
        not know the agent yet)."""
        opened: List[websocket.WebSocket] = []

        def attempt() -> bool:
            try:
                opened.append(websocket.create_connection(self.url(query), timeout=TIMEOUT,
                                                          suppress_origin=True))
            except websocket.WebSocketBadStatusException:
                return False
            return True

        wait_for(attempt)
        return opened[0]

    def close(self) -> None:
        self.agent.stop(TIMEOUT)
        self.echo.close()
        self.front.stop()
        log = self.front.log_text()
        assert not re.search(r"^ERROR\b|\[ERROR\]|Traceback", log, re.MULTILINE), log


@pytest.fixture(params=FRONT_ENDS)
def stack(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[Stack]:
    built = Stack(start_front(request.param, caplog))
    yield built
    built.close()


def _message(index: int, size: int) -> bytes:
    seed = hashlib.sha256(b"%d" % index).digest()
    return (seed * (size // len(seed) + 1))[:size]


def test_64_mib_each_way_then_the_client_closes(stack: Stack) -> None:
    ws = stack.connect()
    assert stack.echo.targets == ["/echo"]  # the handshake reached the target as sent
    count, size = 64, MiB
    sent = hashlib.sha256()
    for i in range(count):
        sent.update(_message(i, size))
    errors: List[BaseException] = []

    def send_all() -> None:
        try:
            for i in range(count):
                ws.send_binary(_message(i, size))
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    received = hashlib.sha256()
    got = 0
    while got < count * size:
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY
        received.update(data)
        got += len(data)
    sender.join(TIMEOUT)
    assert not errors and got == count * size
    assert received.hexdigest() == sent.hexdigest()
    ws.close(timeout=TIMEOUT)  # the close handshake crosses the pipe both ways
    assert stack.echo.wait_closes(1, TIMEOUT) == ["client"]


def test_the_target_closes(stack: Stack) -> None:
    ws = stack.connect()
    ws.send("hello")
    assert ws.recv() == "hello"
    ws.send(CLOSE_PLEASE)
    frame = ws.recv_data_frame(control_frame=True)[1]
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 1000
    assert stack.echo.wait_closes(1, TIMEOUT) == ["server"]
    ws.sock.settimeout(TIMEOUT)
    assert ws.sock.recv(1) == b""  # the target closed its end: the front end closes ours
    ws.shutdown()


def test_the_client_goes_away_without_a_close_frame(stack: Stack) -> None:
    ws = stack.connect()
    ws.send("still there?")
    assert ws.recv() == "still there?"
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.shutdown()
    assert stack.echo.wait_closes(1, TIMEOUT) == ["eof"]


def test_the_idle_timeout_ends_a_silent_exchange(stack: Stack) -> None:
    ws = stack.connect("timeout=1")
    ws.send("a")
    assert ws.recv() == "a"
    quiet_since = time.monotonic()
    ws.sock.settimeout(TIMEOUT)
    assert ws.sock.recv(1) == b""
    assert time.monotonic() - quiet_since >= 0.9
    assert stack.echo.wait_closes(1, TIMEOUT) == ["eof"]
    wait_for(lambda: "UPGRADE ABORTED" in stack.front.log_text())
    ws.shutdown()


class SwitchingTarget(LoopbackListener):
    """Answers any request with ``101`` to ``Upgrade: h2c``."""

    def handle(self, sock: socket.socket) -> None:
        self.serve_on_thread(self._answer, sock)

    @staticmethod
    def _answer(sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(65536)
            if not piece:
                return
            head += piece
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")


@pytest.mark.parametrize("upgrade", [None, "websocket"])
def test_a_101_without_a_matching_upgrade_is_a_502(stack: Stack, upgrade: Optional[str]) -> None:
    target = SwitchingTarget()
    extra = f"Upgrade: {upgrade}\r\nConnection: Upgrade\r\n" if upgrade else ""
    request = (f"GET /client/{AGENT}/http/{target.address}/ HTTP/1.1\r\nHost: x\r\n{extra}\r\n").encode()
    try:
        stack.connect().close()  # the front end knows the agent
        with socket.create_connection(("127.0.0.1", stack.front.port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                piece = sock.recv(65536)
                assert piece, head
                head += piece
        assert head.startswith(b"HTTP/1.1 502 "), head
        wait_for(lambda: "101 Switching Protocols refused" in stack.front.log_text())
    finally:
        target.close()


def test_bytes_sent_with_the_request_head_reach_the_target(caplog: pytest.LogCaptureFixture) -> None:
    """A client that does not wait for the 101 (one write: the handshake and
    a first frame): the example server's front end had read the frame with
    the head, and it is passed on first. (gunicorn keeps such bytes out of
    the application's reach; RFC 6455 clients wait for the 101.)"""
    stack = Stack(start_front("example", caplog))
    try:
        stack.connect().close()  # the front end knows the agent
        handshake = (f"GET /client/{AGENT}/http/{stack.echo.address}/echo HTTP/1.1\r\nHost: x\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()
        early = b"\x81\x85\x00\x00\x00\x00early"  # a masked text frame, mask key 0
        with socket.create_connection(("127.0.0.1", stack.front.port), timeout=TIMEOUT) as sock:
            sock.sendall(handshake + early)
            answer = b""
            while b"early" not in answer:
                piece = sock.recv(65536)
                assert piece, answer
                answer += piece
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert answer.endswith(b"\r\n\r\n\x81\x05early")
    finally:
        stack.close()
