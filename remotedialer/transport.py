"""The small interface a :class:`~remotedialer.session.Session` needs from a WebSocket.

A transport sends and receives whole binary messages, pings, and closes:
``client.WebSocketClientTransport`` adapts websocket-client,
``wsgi_transport.ServerWebSocket`` is the server's own, and
``wsgi_transport.SimpleWebSocketTransport`` adapts simple-websocket; tests use
the in-memory :func:`memory_pair`.

Contract:

* ``send`` is only ever called by one thread at a time (the session serializes).
* ``receive`` is only ever called by the session's reader thread.
* ``close`` may be called from any thread, any number of times, and makes a
  blocked ``receive`` or ``send`` in another thread return or raise promptly.
* ``last_keepalive`` is the ``time.monotonic()`` of the last sign of life the
  protocol counts (a pong on the client side, a ping on the server side).
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Deque, Optional, Protocol, Tuple, Union

from .errors import ProtocolError, TunnelClosedError

if TYPE_CHECKING:
    from .frames import FrameReader, WebSocketEvent

__all__ = ["Transport", "TransportClosed", "MemoryTransport", "memory_pair"]


class TransportClosed(TunnelClosedError):
    """The WebSocket under a session closed or failed."""


class ReceiveSize:
    """How many bytes the next ``recv`` of a WebSocket asks for: ``large``
    while data flows, ``small`` after a read that brought less than ``small``
    (an idle tunnel's ping). A blocked ``recv(n)`` holds an ``n``-byte buffer,
    so thousands of idle readers ask small. One reader thread uses it."""

    __slots__ = ("large", "small", "next")

    def __init__(self, large: int, small: Optional[int] = None) -> None:
        self.large = large
        self.small = large if small is None else min(small, large)
        self.next = self.small

    def update(self, received: int) -> None:
        """Size the next read after one that brought ``received`` bytes."""
        self.next = self.large if received >= self.small else self.small


def next_event_from_socket(
    reader: "FrameReader", sock: Optional[socket.socket], size: ReceiveSize, closing: Callable[[], bool]
) -> "WebSocketEvent":
    """The next event of ``reader``, fed from ``sock`` (as many bytes at a
    time as ``size`` says) until one is whole; blocks on ``recv``. Raises
    :class:`TransportClosed` at EOF, on a socket error or once ``closing()``
    (our own close: then as a plain "websocket closed"), and
    :class:`~remotedialer.frames.WebSocketProtocolError` for a bad frame."""
    while True:
        event = reader.next_event()
        if event is not None:
            return event
        if closing():
            raise TransportClosed("websocket closed")
        try:
            if sock is None:
                raise OSError("no socket")
            data = sock.recv(size.next)
        except OSError as exc:
            if closing():
                raise TransportClosed("websocket closed") from exc
            raise TransportClosed(f"websocket read failed: {exc}") from exc
        if not data:
            raise TransportClosed("websocket closed" if closing() else "websocket EOF")
        size.update(len(data))
        reader.feed(data)


class Transport(Protocol):
    """What a session needs from a WebSocket (see the module docstring)."""

    last_keepalive: float

    def send(self, data: bytes) -> None:
        """Send one binary message; raise :class:`TransportClosed` if closed."""

    def receive(self) -> bytes:
        """Block for the next binary message.

        Raises :class:`TransportClosed` when the WebSocket is closed and
        :class:`~remotedialer.errors.ProtocolError` for a text message.
        """

    def ping(self) -> None:
        """Send a WebSocket ping."""

    def close(self) -> None:
        """Close the WebSocket; idempotent and callable from any thread."""

    def describe(self) -> str:
        """A short human-readable description of the far end, for logs."""


_Item = Union[bytes, str, Tuple[str, None]]
_PING = ("ping", None)


class MemoryTransport:
    """One end of an in-memory WebSocket pair, for tests.

    Like a socket, the pair holds at most ``capacity`` bytes in flight: a
    sender blocks while the receiving end has that much queued. A ``ping``
    arrives at the other end as a keepalive and is answered by a pong that
    refreshes this end's ``last_keepalive``.
    """

    def __init__(self, name: str = "memory", capacity: int = 1 << 20) -> None:
        self.name = name
        self.capacity = capacity
        self._queued = 0
        self.peer: Optional["MemoryTransport"] = None
        self.last_keepalive = time.monotonic()
        self._inbox: Deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.sent_messages = 0
        self.pings_received = 0

    def send(self, data: bytes) -> None:
        self._check_open()
        assert self.peer is not None
        self.sent_messages += 1
        self.peer._deliver(bytes(data))
        # A real socket write is a system call that lets other threads run;
        # do the same so the far side's reader is not starved of the GIL.
        time.sleep(0)

    def send_text(self, text: str) -> None:
        """Send a text message (a protocol error for the receiver)."""
        self._check_open()
        assert self.peer is not None
        self.peer._deliver(text)

    def receive(self, timeout: Optional[float] = None) -> bytes:
        """Block for the next binary message; ``timeout`` (tests only) bounds
        the wait and raises ``TimeoutError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                while self._inbox:
                    item = self._inbox.popleft()
                    if isinstance(item, bytes):
                        self._queued -= len(item)
                        self._cond.notify_all()
                        return item
                    if isinstance(item, str):
                        raise ProtocolError("text message received")
                    # a ping: counts as keepalive here, pong refreshes the pinger
                    self.pings_received += 1
                    self.last_keepalive = time.monotonic()
                    if self.peer is not None:
                        self.peer.last_keepalive = time.monotonic()
                if self._closed:
                    raise TransportClosed("websocket closed")
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("no message within the timeout")
                    self._cond.wait(remaining)

    def ping(self) -> None:
        self._check_open()
        assert self.peer is not None
        self.peer._deliver(_PING)

    def close(self) -> None:
        for end in (self, self.peer):
            if end is not None:
                with end._cond:
                    end._closed = True
                    end._cond.notify_all()

    def describe(self) -> str:
        return self.name

    def _deliver(self, item: _Item) -> None:
        with self._cond:
            if isinstance(item, bytes):
                while self._queued >= self.capacity and not self._closed:
                    self._cond.wait()
                self._queued += len(item)
            if self._closed:
                return
            self._inbox.append(item)
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("websocket closed")


def memory_pair() -> Tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-memory transports (``client_end``, ``server_end``)."""
    client_end, server_end = MemoryTransport("memory-client"), MemoryTransport("memory-server")
    client_end.peer, server_end.peer = server_end, client_end
    return client_end, server_end
