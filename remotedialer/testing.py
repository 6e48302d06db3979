"""Test doubles users may want too: an in-memory WebSocket pair.

:func:`memory_pair` gives two connected :class:`MemoryTransport` ends; put a
:class:`~remotedialer.session.Session` on each to run the protocol in one
process with no sockets::

    client_end, server_end = memory_pair()
    server = Session(server_end, is_client=False)
    client = Session(client_end, is_client=True, connect_handler=handler)
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Optional, Tuple, Union

from .errors import ProtocolError, TransportClosed, TransportEnded
from .protocol import Bytes

__all__ = ["MemoryTransport", "memory_pair"]

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
        self._ended = False  # the peer closed on purpose (close, not abort or cut)
        self.sent_messages = 0
        self.pings_received = 0

    def send(self, data: Bytes, tail: Bytes = b"") -> None:
        self._check_open()
        assert self.peer is not None
        self.sent_messages += 1
        self.peer._deliver(b"".join((data, tail)))
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
                    raise (TransportEnded if self._ended else TransportClosed)("websocket closed")
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
        """Close on purpose: the peer's :meth:`receive` raises
        :class:`~remotedialer.errors.TransportEnded` once it has read what
        was sent before."""
        if self.peer is not None and not self._closed:
            self.peer._ended = True
        self.abort()

    def abort(self) -> None:
        """Close without telling the peer why: its :meth:`receive` raises
        :class:`~remotedialer.errors.TransportClosed` once it has read what
        was sent before."""
        for end in (self, self.peer):
            if end is not None:
                with end._cond:
                    end._closed = True
                    end._cond.notify_all()

    def cut(self) -> None:
        """Lose the connection as a network would: both ends closed, and
        whatever was in flight either way gone."""
        for end in (self, self.peer):
            if end is not None:
                with end._cond:
                    end._closed = True
                    end._inbox.clear()
                    end._queued = 0
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
