"""A tunneled connection's receive side: the bytes received and not yet
read, the flow-control accounting behind PAUSE and RESUME, and the readiness
signal that lets ``select`` wait for it.

Flow control (docs/protocol.rst, "Flow control") keeps two separate flags:

* ``we_paused_peer``: we sent PAUSE because the buffer grew past the pause
  threshold; a read that drains it below the resume threshold sends RESUME.
* ``peer_paused_us``: the peer sent PAUSE; our writers block until RESUME.

A :class:`ReceiveBuffer` is not thread-safe on its own: ``cond``, its
condition, guards it *and* its owner's state that goes with it (the
:class:`~remotedialer.connection.TunnelConnection`'s end state), and every
method expects it held. Readers and writers wait on it.
"""

from __future__ import annotations

import collections
import enum
import socket
import threading
from typing import Deque

from .config import Limits
from .protocol import Bytes

__all__ = ["Fill", "ReceiveBuffer", "ReadinessSignal"]


class Fill(enum.Enum):
    """What :meth:`ReceiveBuffer.append` asks of its caller."""

    OK = "ok"
    """Nothing to do."""
    PAUSE = "pause"
    """The buffer just passed the pause threshold: send PAUSE."""
    OVERFLOW = "overflow"
    """The buffer passed the hard limit (the peer ignored PAUSE): cut the connection."""


class ReceiveBuffer:
    """Received DATA, in the chunks it arrived in, and the flow-control flags
    (see the module docstring). ``cond`` guards it all."""

    __slots__ = ("cond", "limits", "buffered", "we_paused_peer", "peer_paused_us", "_chunks", "_offset")

    def __init__(self, limits: Limits) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.limits = limits
        self.buffered = 0  #: bytes received and not yet read
        self.we_paused_peer = False
        self.peer_paused_us = False
        # chunks as they arrived, _offset bytes of the first one already read
        self._chunks: Deque[Bytes] = collections.deque()
        self._offset = 0

    def append(self, payload: Bytes) -> Fill:
        """Keep a DATA payload; say whether that calls for PAUSE or a cut."""
        if len(payload):
            self._chunks.append(payload)
            self.buffered += len(payload)
        if self.buffered > self.limits.hard_buffer_limit:
            return Fill.OVERFLOW
        if self.buffered > self.limits.pause_threshold and not self.we_paused_peer:
            self.we_paused_peer = True
            return Fill.PAUSE
        return Fill.OK

    def take(self, limit: int) -> bytes:
        """Remove and return up to ``limit`` buffered bytes (some are buffered)."""
        first = self._chunks[0]
        if self._offset == 0 and len(first) <= limit:
            # The common case: hand out a whole chunk without slicing.
            self._chunks.popleft()
            self.buffered -= len(first)
            return bytes(first)
        out = bytearray(min(limit, self.buffered))
        self.take_into(memoryview(out), len(out))
        return bytes(out)

    def take_into(self, view: memoryview, limit: int) -> int:
        """Move up to ``limit`` buffered bytes into ``view``; return how many."""
        written = 0
        while written < limit and self._chunks:
            chunk = self._chunks[0]
            count = min(limit - written, len(chunk) - self._offset)
            view[written : written + count] = chunk[self._offset : self._offset + count]
            written += count
            self._offset += count
            if self._offset == len(chunk):
                self._chunks.popleft()
                self._offset = 0
        self.buffered -= written
        return written

    def resume_due(self) -> bool:
        """After a read: whether it drained a paused buffer below the resume
        threshold (the peer is then no longer counted as paused)."""
        if self.we_paused_peer and self.buffered < self.limits.resume_threshold:
            self.we_paused_peer = False
            return True
        return False

    def clear(self) -> None:
        """Drop everything buffered (a shutdown or close of the read side)."""
        self._chunks.clear()
        self.buffered = self._offset = 0


class ReadinessSignal:
    """A socketpair whose read end is readable exactly while ``set``.

    Backs :meth:`TunnelConnection.fileno
    <remotedialer.connection.TunnelConnection.fileno>` so that ``select`` and
    friends can wait for a tunneled connection. Created lazily: most
    connections never need a descriptor.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._is_set = False

    def fileno(self) -> int:
        """The descriptor to poll: readable while set."""
        return self._reader.fileno()

    def update(self, readable: bool) -> None:
        """Set (``readable``) or clear the signal."""
        if readable and not self._is_set:
            self._writer.send(b"\0")
            self._is_set = True
        elif not readable and self._is_set:
            try:
                self._reader.recv(16)
            except BlockingIOError:  # pragma: no cover - the byte is always there
                pass
            self._is_set = False

    def close(self) -> None:
        """Close both ends."""
        self._reader.close()
        self._writer.close()
