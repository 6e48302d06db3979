"""An upgraded exchange (``101 Switching Protocols``): a two-way byte pipe
between the client's socket and the target's, run on the request thread.

:func:`relay` copies both ways with non-blocking sockets and one selector
(plain or TLS sockets alike), each direction reading only once what it read
before was written, so a side that does not read holds the other one back
(TCP backpressure, and through a tunnel the tunnel's PAUSE). It ends when
either side ends: what the other side is still owed is delivered, then it
returns (as Go's reverse proxy does with upgrades). ``idle_timeout`` bounds
the time with no byte moving either way.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from typing import Any, List, Optional

__all__ = ["relay", "RelayError", "shut_down", "IDLE_TIMEOUT"]

CHUNK = 256 * 1024

#: What :func:`relay` returns when nothing moved for ``idle_timeout`` seconds.
IDLE_TIMEOUT = "idle timeout"

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class _End:
    """One socket of the pipe: the bytes owed to it, whether it ended, and
    what the last blocked read and write wait for (0: not blocked)."""

    __slots__ = ("sock", "name", "pending", "ended", "read_waits", "write_waits")

    def __init__(self, sock: Any, name: str, pending: bytes) -> None:
        self.sock = sock
        self.name = name
        self.pending: Optional[memoryview] = memoryview(pending) if pending else None
        self.ended = False
        self.read_waits = 0
        self.write_waits = 0

    def readable_buffered(self) -> bool:
        """Whether TLS holds decrypted bytes a read would return at once."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0


class RelayError(Exception):
    """A side of the pipe failed; ``side`` is ``"client"`` or ``"target"``."""

    def __init__(self, side: str, error: BaseException) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


def _recv(end: _End) -> Optional[bytes]:
    """A read from ``end``: bytes, ``b""`` at its end, None when it would block."""
    try:
        data: bytes = end.sock.recv(CHUNK)
    except ssl.SSLWantWriteError:
        end.read_waits = _WRITE
        return None
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
        end.read_waits = _READ
        return None
    end.read_waits = 0
    return data


def _send(end: _End) -> int:
    """Write what ``end`` is owed; bytes written (0 when it would block)."""
    assert end.pending is not None
    try:
        sent: int = end.sock.send(end.pending)
    except ssl.SSLWantReadError:
        end.write_waits = _READ
        return 0
    except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
        end.write_waits = _WRITE
        return 0
    end.write_waits = 0
    rest = end.pending[sent:]
    end.pending = rest if len(rest) else None
    return sent


def relay(
    client: Any,
    target: Any,
    *,
    to_client: bytes = b"",
    to_target: bytes = b"",
    idle_timeout: Optional[float] = None,
) -> str:
    """Copy between ``client`` and ``target`` (sockets, plain or TLS) until
    either ends, first delivering ``to_client`` and ``to_target``. Returns how
    it ended: ``"client closed"``, ``"target closed"`` (the other side got
    everything it was owed) or ``"idle timeout"``. Raises :class:`RelayError`
    when a side failed. Leaves both sockets non-blocking and open."""
    ends = (_End(client, "client", to_client), _End(target, "target", to_target))
    for end in ends:
        end.sock.setblocking(False)
    selector = selectors.DefaultSelector()
    registered = {end.sock: 0 for end in ends}
    last_move = time.monotonic()
    ended: Optional[str] = None
    try:
        while True:
            moved = False
            for source, sink in ((ends[0], ends[1]), (ends[1], ends[0])):
                try:
                    if sink.pending is not None and _send(sink):
                        moved = True
                except (OSError, ValueError) as exc:
                    raise RelayError(sink.name, exc) from exc
                if ended is not None or sink.pending is not None:
                    continue
                try:
                    data = _recv(source)
                except (OSError, ValueError) as exc:
                    raise RelayError(source.name, exc) from exc
                if data == b"":
                    source.ended = True
                    ended = f"{source.name} closed"
                elif data:
                    sink.pending = memoryview(data)
                    moved = True
            if ended is not None and ends[0].pending is None and ends[1].pending is None:
                return ended
            now = time.monotonic()
            if moved:
                last_move = now
                continue
            if ended is None and any(
                source.readable_buffered() and sink.pending is None
                for source, sink in ((ends[0], ends[1]), (ends[1], ends[0]))
            ):
                continue
            wanted: List[int] = []
            for end, other in ((ends[0], ends[1]), (ends[1], ends[0])):
                events = 0
                if end.pending is not None:
                    events |= end.write_waits or _WRITE
                if ended is None and other.pending is None:
                    events |= end.read_waits or _READ
                wanted.append(events)
            for end, events in zip(ends, wanted):
                if registered[end.sock] != events:
                    if registered[end.sock] == 0:
                        selector.register(end.sock, events)
                    elif events == 0:
                        selector.unregister(end.sock)
                    else:
                        selector.modify(end.sock, events)
                    registered[end.sock] = events
            wait: Optional[float] = None
            if idle_timeout is not None:
                wait = idle_timeout - (now - last_move)
                if wait <= 0:
                    return IDLE_TIMEOUT
            selector.select(wait)
    finally:
        selector.close()


def shut_down(sock: Any) -> None:
    """End a socket's connection both ways; never raises."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
