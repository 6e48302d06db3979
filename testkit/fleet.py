"""A fleet of lightweight agents: many tunnels from one process, one thread.

``python -m testkit.fleet --port PORT --count N`` opens ``N`` WebSockets
to ``ws://127.0.0.1:PORT/connect`` (client keys ``agent-0`` ... ``agent-N-1``,
in the ``X-Tunnel-ID`` header), at most ``--pending`` handshakes at a time,
and keeps them up from one selector loop as real clients do: a masked ping
every ``--ping`` seconds (the first one at a random point of the interval),
pongs counted. The first ``--answering`` agents answer the server's
CONNECTs: each connection gets a canned ``200 ok`` HTTP response to every
request it carries, so a GET through the server's ``/client/agent-K/...``
forwarder proves that agent-K is routed to. The other agents refuse CONNECTs
with an ERROR, like a client without a connect authorizer. With
``--reconnect``, an agent whose tunnel dropped opens it again after a random
delay of up to one second (a server restart then makes a reconnect storm).

It prints one JSON object per line: ``{"event": "opened", ...}`` once every
agent was open (with the seconds it took), then ``{"event": "status", ...}``
every ``--report`` seconds and at SIGTERM/SIGINT (``open``, ``opened``,
``dropped``, ``failed`` handshakes, ``pings``, ``pongs``, ``reconnects``, the
longest any agent waited for a pong, requests answered).

No threads, no ``select.select``: ``selectors`` (epoll here) carries every
socket, whatever its descriptor number.
"""

from __future__ import annotations

import argparse
import base64
import collections
import heapq
import json
import os
import random
import selectors
import signal
import socket
import sys
import time
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from remotedialer.server.process import raise_open_files_limit
from remotedialer.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    WebSocketProtocolError,
    encode_masked_frame,
)
from remotedialer.protocol import MessageType, decode_message, encode_message

__all__ = ["Agent", "Fleet", "handshake_request", "main"]

#: The largest message an agent accepts from the server.
MAX_MESSAGE = 1 << 20

EmitFn = Callable[[Dict[str, object]], None]
"""Where the fleet's JSON records go."""

CANNED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
"""What an answering agent sends back for every HTTP request it is given."""


def handshake_request(host: str, port: int, client_key: str) -> bytes:
    """The WebSocket upgrade request of an agent (``GET /connect``)."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    return (
        f"GET /connect HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"X-Tunnel-ID: {client_key}\r\n\r\n"
    ).encode("ascii")


class Agent:
    """One agent's tunnel: its socket, what it still has to send, its
    connections (answering agents only)."""

    __slots__ = ("index", "key", "answering", "sock", "inbox", "reader", "outbox", "open",
                 "ping_sent_at", "requests", "writing")

    def __init__(self, index: int, answering: bool) -> None:
        self.index = index
        self.key = f"agent-{index}"
        self.answering = answering
        self.sock: Optional[socket.socket] = None
        self.inbox = bytearray()  # the handshake answer, until it is whole
        self.reader = FrameReader(MAX_MESSAGE, from_client=False)
        self.outbox = bytearray()
        self.open = False  # the 101 arrived
        self.ping_sent_at = 0.0  # of the oldest ping not answered yet, 0 if none
        self.requests: Dict[int, bytearray] = {}  # conn id -> request bytes not answered yet
        self.writing = False  # registered for EVENT_WRITE


class Fleet:
    """Every agent of the process and the loop that runs them (see the module doc)."""

    def __init__(self, host: str, port: int, count: int, *, ping_interval: float = 5.0,
                 answering: int = 3, pending: int = 100, reconnect: bool = False,
                 report_interval: float = 5.0, prefix_start: int = 0) -> None:
        self.host, self.port = host, port
        self.agents = [Agent(prefix_start + i, i < answering) for i in range(count)]
        self.ping_interval = ping_interval
        self.pending = pending
        self.reconnect = reconnect
        self.report_interval = report_interval
        self.selector = selectors.DefaultSelector()
        self.stats = collections.Counter({
            "open": 0, "opened": 0, "dropped": 0, "failed": 0, "pings": 0, "pongs": 0,
            "reconnects": 0, "answered": 0,
        })
        self.max_pong_wait = 0.0
        self._to_open: Deque[Agent] = collections.deque(self.agents)
        self._handshaking = 0
        self._timers: List[Tuple[float, int, str, Agent]] = []  # (due, seq, what, agent)
        self._seq = 0
        self._message_id = 0
        self._stopping = False

    # -- timers
    def _at(self, due: float, what: str, agent: Agent) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (due, self._seq, what, agent))

    # -- opening
    def _start_opening(self) -> None:
        while self._to_open and self._handshaking < self.pending:
            agent = self._to_open.popleft()
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((self.host, self.port))
            if err not in (0, 115, 36, 10035):  # EINPROGRESS (Linux, macOS), WSAEWOULDBLOCK
                sock.close()
                self._failed(agent)
                continue
            agent.sock, agent.open = sock, False
            agent.inbox.clear()
            agent.reader = FrameReader(MAX_MESSAGE, from_client=False)
            agent.outbox[:] = handshake_request(self.host, self.port, agent.key)
            agent.writing = True
            self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, agent)
            self._handshaking += 1

    def _failed(self, agent: Agent) -> None:
        self.stats["failed"] += 1
        if self.reconnect and not self._stopping:
            self._at(time.monotonic() + random.uniform(0.1, 1.0), "open", agent)

    def _handshake_read(self, agent: Agent) -> None:
        end = agent.inbox.find(b"\r\n\r\n")
        if end < 0:
            return
        status = bytes(agent.inbox[:12])
        del agent.inbox[:end + 4]
        self._handshaking -= 1
        if not status.startswith(b"HTTP/1.1 101"):
            self._close(agent)
            self._failed(agent)
            return
        agent.open = True
        self.stats["open"] += 1
        self.stats["opened"] += 1
        self._at(time.monotonic() + random.uniform(0.0, self.ping_interval), "ping", agent)

    # -- writes
    def _send(self, agent: Agent, data: bytes) -> None:
        agent.outbox += data
        self._flush(agent)

    def _flush(self, agent: Agent) -> None:
        sock = agent.sock
        if sock is None:
            return
        try:
            sent = sock.send(agent.outbox) if agent.outbox else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(agent)
            return
        del agent.outbox[:sent]
        want_write = bool(agent.outbox)
        if want_write != agent.writing:
            agent.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(sock, events, agent)

    def _ping(self, agent: Agent, now: float) -> None:
        if not agent.open:
            return
        if not agent.ping_sent_at:
            agent.ping_sent_at = now
        self.stats["pings"] += 1
        self._send(agent, bytes(encode_masked_frame(OP_PING, b"")))
        self._at(now + self.ping_interval, "ping", agent)

    def _send_message(self, agent: Agent, conn_id: int, message_type: int, payload: bytes) -> None:
        self._message_id += 1
        message = encode_message(self._message_id, conn_id, message_type, payload)
        self._send(agent, bytes(encode_masked_frame(OP_BINARY, message)))

    # -- reads
    def _read(self, agent: Agent) -> None:
        sock = agent.sock
        assert sock is not None
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(agent)
            return
        if not agent.open:
            agent.inbox += data
            self._handshake_read(agent)
            if not agent.open:
                return
            data = bytes(agent.inbox)  # what followed the 101
            agent.inbox.clear()
        agent.reader.feed(data)
        while True:
            try:
                event = agent.reader.next_event()
            except WebSocketProtocolError:
                self._drop(agent)
                return
            if event is None:
                return
            opcode, payload = event
            if opcode == OP_PONG:
                self.stats["pongs"] += 1
                if agent.ping_sent_at:
                    self.max_pong_wait = max(self.max_pong_wait, time.monotonic() - agent.ping_sent_at)
                    agent.ping_sent_at = 0.0
            elif opcode == OP_CLOSE:
                self._drop(agent)
                return
            elif opcode == OP_BINARY:
                self._on_message(agent, payload)

    def _on_message(self, agent: Agent, payload: bytes) -> None:
        message = decode_message(payload)
        if message.type == MessageType.CONNECT:
            if agent.answering:
                agent.requests[message.conn_id] = bytearray()
            else:
                self._send_message(agent, message.conn_id, MessageType.ERROR, b"connect not allowed")
        elif message.type == MessageType.DATA:
            request = agent.requests.get(message.conn_id)
            if request is None:
                return
            request += message.payload
            while b"\r\n\r\n" in request:
                del request[:request.index(b"\r\n\r\n") + 4]
                self.stats["answered"] += 1
                self._send_message(agent, message.conn_id, MessageType.DATA, CANNED_RESPONSE)
        elif message.type == MessageType.ERROR:
            agent.requests.pop(message.conn_id, None)

    # -- ends
    def _close(self, agent: Agent) -> None:
        sock, agent.sock = agent.sock, None
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()
        agent.open = False
        agent.writing = False
        agent.outbox.clear()
        agent.requests.clear()
        agent.ping_sent_at = 0.0

    def _drop(self, agent: Agent) -> None:
        """The agent's socket failed or closed: a dropped tunnel, or a failed
        handshake (refused connection) if it was not open yet."""
        if not agent.open:
            self._handshaking -= 1
            self._close(agent)
            self._failed(agent)
            return
        self.stats["open"] -= 1
        self.stats["dropped"] += 1
        self._close(agent)
        if self.reconnect and not self._stopping:
            self._at(time.monotonic() + random.uniform(0.0, 1.0), "open", agent)

    # -- the loop
    def status(self) -> Dict[str, object]:
        """The counters as a JSON-ready dict."""
        return {**self.stats, "max_pong_wait": round(self.max_pong_wait, 3),
                "count": len(self.agents), "t": round(time.monotonic(), 3)}

    def stop(self) -> None:
        """Make :meth:`run` return (from a signal handler)."""
        self._stopping = True

    def run(self, emit: EmitFn) -> None:
        """Open every agent, then keep them up until :meth:`stop`."""
        started = time.monotonic()
        all_open_reported = False
        next_report = started + self.report_interval
        while not self._stopping:
            self._start_opening()
            now = time.monotonic()
            if not all_open_reported and self.stats["open"] == len(self.agents):
                all_open_reported = True
                emit({"event": "opened", "seconds": round(now - started, 3), **self.status()})
            timeout = min(next_report, self._timers[0][0] if self._timers else next_report) - now
            for key, mask in self.selector.select(min(max(timeout, 0.0), 0.5)):
                agent: Agent = key.data
                if key.fileobj is not agent.sock:
                    continue  # closed by an earlier event of this round
                if mask & selectors.EVENT_WRITE:
                    self._flush(agent)
                if mask & selectors.EVENT_READ and agent.sock is not None:
                    self._read(agent)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _due, _seq, what, agent = heapq.heappop(self._timers)
                if what == "ping":
                    self._ping(agent, now)
                elif agent.sock is None:  # "open": reconnect
                    self.stats["reconnects"] += 1
                    self._to_open.append(agent)
            if now >= next_report:
                next_report = now + self.report_interval
                emit({"event": "status", **self.status()})
        emit({"event": "status", "final": True, **self.status()})
        for agent in self.agents:
            self._close(agent)
        self.selector.close()


def _print_json(record: Dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0, help="index of the first agent (agent-FIRST)")
    parser.add_argument("--ping", type=float, default=5.0, help="seconds between pings (default 5)")
    parser.add_argument("--answering", type=int, default=3, help="agents that answer CONNECTs")
    parser.add_argument("--pending", type=int, default=100, help="handshakes in flight at most")
    parser.add_argument("--report", type=float, default=5.0, help="seconds between status lines")
    parser.add_argument("--reconnect", action="store_true", help="reopen dropped tunnels")
    args = parser.parse_args(argv)
    raise_open_files_limit()  # a socket per agent
    fleet = Fleet(args.host, args.port, args.count, ping_interval=args.ping, answering=args.answering,
                  pending=args.pending, reconnect=args.reconnect, report_interval=args.report,
                  prefix_start=args.first)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: fleet.stop())
    fleet.run(_print_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
