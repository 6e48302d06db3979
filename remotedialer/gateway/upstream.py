"""The example gateway's HTTP/1.1 client through a tunnel, and its pool.

:class:`UpstreamConnection` speaks HTTP/1.1 directly over a
:class:`~remotedialer.connection.TunnelConnection` (or an ``SSLSocket`` over
one, for ``https`` targets): a small strict client applying the rules of
:mod:`remotedialer.gateway.http1`, no :mod:`http.client`, whose
``email``-based header parsing was the largest item in the server's profile.

Tunneled connections are kept alive and reused, as the Go example does with
its cached ``http.Client``: a :class:`ConnectionPool` keeps a bounded number of
idle HTTP connections per (client, scheme, address, host). A connection goes
back to the pool only after its response was read to the end without error
and the target did not ask to close it; before reuse it is checked (a
tunneled connection the far side closed, or one with unexpected bytes
waiting, is dropped).
"""

from __future__ import annotations

import collections
import errno
import ssl
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from urllib3.util.wait import wait_for_read

from .http1 import (
    MAX_CHUNK_LINE,
    MAX_RESPONSE_HEAD,
    BadResponse,
    ChunkedDecoder,
    ChunkedError,
    ResponseHead,
    encode_request_head,
    find_head_end,
    parse_response_head,
    response_framing,
)

__all__ = [
    "UpstreamConnection",
    "UpstreamResponse",
    "ConnectionPool",
    "PoolKey",
    "BadResponse",
    "poll_readable",
    "CHUNK",
    "DEFAULT_MAX_IDLE_PER_KEY",
    "DEFAULT_IDLE_TIMEOUT",
]

#: Bytes read or sent at once.
CHUNK = 256 * 1024
#: Idle keep-alive connections kept per (client, scheme, address, host).
DEFAULT_MAX_IDLE_PER_KEY = 64
#: Seconds an idle pooled connection is kept (Go's ``IdleConnTimeout``).
DEFAULT_IDLE_TIMEOUT = 90.0

# ------------------------------------------------------- the upstream HTTP/1.1 client
#
# http.client parses every response head with the email package, which was
# the largest item in the server's profile. The forwarder only needs the
# status, the header list and the body framing, so it speaks HTTP/1.1 itself:
# one send for a bodyless request, the head read into a bytearray and split
# once, the body framed by Content-Length, chunked coding or the connection
# closing (RFC 9112 §6.3). Anything malformed is refused with BadResponse.
#
# Measured against libraries before keeping it (docs/benchmarks.rst, "Libraries
# against the hand-written code"): per request/response cycle without I/O this
# client takes 24 us of CPU, h11 110 us and httpcore (over TunnelBackend)
# 195 us; end to end the server's CPU per 1 KiB GET grew by 45 % with h11 and
# 2.5x with httpcore, so the request rate would drop far more than the 5 % a
# switch was allowed to cost.

class UpstreamConnection:
    """One HTTP/1.1 client connection over a connected socket-like object (a
    tunneled connection, or an ``SSLSocket`` for ``https``), one request at a
    time. ``sock`` is None once closed. Reads block on ``sock`` with its
    timeout and raise what it raises (``socket.timeout`` included), or
    :class:`BadResponse`."""

    def __init__(self, sock: Any, host: str) -> None:
        self.sock: Any = sock
        self.host = host
        self._buffer = bytearray()  # received, not yet consumed

    @property
    def idle_clean(self) -> bool:
        """Whether no unread bytes are left over (a kept-alive connection must
        have none between responses)."""
        return not self._buffer

    def detach(self) -> Tuple[Any, bytes]:
        """Hand over the socket and the bytes received past the last response
        head (an upgraded connection's first bytes); the connection is then
        closed, the socket left open."""
        sock, self.sock = self._socket(), None
        buffered = bytes(self._buffer)
        self._buffer.clear()
        return sock, buffered

    def close(self) -> None:
        """Close the socket; never raises."""
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:  # pragma: no cover - closing never fails on our sockets
                pass

    def request(self, method: str, path: str, headers: Dict[str, str], body: Any, chunked: bool) -> None:
        """Send a request: ``body`` is None, a file-like object (sent as read,
        framed by the ``Content-Length`` in ``headers``) or, with ``chunked``,
        an iterable of bytes sent with chunked coding. Blocks on the socket
        (the peer may pause us); raises ``ValueError`` for a method, path or
        header value that cannot be sent, ``OSError`` from the socket."""
        head = encode_request_head(method, path, headers, body is not None, chunked)
        sock = self._socket()
        if body is None:
            sock.sendall(head)
        elif chunked:
            sock.sendall(head)
            for data in body:
                if data:
                    sock.sendall(b"%x\r\n%b\r\n" % (len(data), data))
            sock.sendall(b"0\r\n\r\n")
        else:
            data = body.read(CHUNK)
            sock.sendall(head + data if data else head)
            while data:
                data = body.read(CHUNK)
                if data:
                    sock.sendall(data)

    def getresponse(self, method: str) -> "UpstreamResponse":
        """Read the response head (interim 1xx answers skipped). Raises
        ``ConnectionResetError`` when the target closed the connection before
        answering, :class:`BadResponse` for a malformed head."""
        while True:
            head = parse_response_head(self._read_head())
            if not 100 <= head.status < 200 or head.status == 101:
                return UpstreamResponse(self, head, method)

    def _socket(self) -> Any:
        if self.sock is None:
            raise BrokenPipeError(32, "upstream connection closed")
        return self.sock

    def _fill(self) -> bool:
        """Receive more into the buffer; False at EOF."""
        data = self._socket().recv(CHUNK)
        if not data:
            return False
        self._buffer += data
        return True

    def _read_head(self) -> bytes:
        buffer = self._buffer
        searched = 0
        while True:
            found = find_head_end(buffer, searched)
            if found is not None:
                head = bytes(buffer[: found[0]])
                del buffer[: found[1]]
                return head
            if len(buffer) > MAX_RESPONSE_HEAD:
                raise BadResponse(f"response head over {MAX_RESPONSE_HEAD} bytes")
            searched = len(buffer)
            if not self._fill():
                if buffer:
                    raise BadResponse("the target closed the connection in the middle of the response head")
                raise ConnectionResetError(
                    errno.ECONNRESET, "the target closed the connection without a response"
                )

    def _read_line(self) -> bytes:
        """One LF-ended line of a chunked body, with its ending."""
        buffer = self._buffer
        searched = 0
        while True:
            end = buffer.find(b"\n", searched)
            if end >= 0:
                line = bytes(buffer[: end + 1])
                del buffer[: end + 1]
                return line
            if len(buffer) > MAX_CHUNK_LINE:
                raise BadResponse("chunk line too long")
            searched = len(buffer)
            if not self._fill():
                raise BadResponse("the target closed the connection in the middle of a chunked body")

    def _read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: buffered ones first, else one ``recv``
        (``b""`` at EOF)."""
        buffer = self._buffer
        if buffer:
            data = bytes(buffer[:limit])
            del buffer[:limit]
            return data
        return bytes(self._socket().recv(limit))


class UpstreamResponse:
    """A response from the target: the head's fields, and :meth:`read1` for
    the body as it arrives. ``will_close`` says the connection cannot carry
    another request; ``complete`` that the body was read to its end."""

    def __init__(self, connection: UpstreamConnection, head: ResponseHead, method: str) -> None:
        self.connection = connection
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        framing = response_framing(head, method)
        self.will_close = framing.will_close
        self._length = framing.length  # bytes of body left; None: until EOF, or chunked
        self._chunked: Optional[ChunkedDecoder] = ChunkedDecoder(strict=False) if framing.chunked else None
        self.complete = framing.length == 0

    def body_ready(self) -> bool:
        """Whether :meth:`read1` would return without waiting: the body ended,
        or a Content-Length or close-delimited body has bytes buffered."""
        return self.complete or (self._chunked is None and not self.connection.idle_clean)

    def read1(self, limit: int) -> bytes:
        """The next piece of the body, at most ``limit`` bytes, as soon as any
        arrived; ``b""`` once it ended. Blocks on the socket with its
        timeout; raises ``OSError`` (``BadResponse`` when the target closed
        the connection too early or broke the chunked coding)."""
        if self.complete:
            return b""
        connection = self.connection
        chunked = self._chunked
        if chunked is not None:
            try:
                while chunked.chunk_left == 0 and not chunked.done:
                    chunked.feed_line(connection._read_line())
            except ChunkedError as exc:
                raise BadResponse(str(exc)) from None
            if chunked.done:
                self.complete = True
                return b""
            data = connection._read_some(min(limit, chunked.chunk_left))
            if not data:
                raise BadResponse("the target closed the connection in the middle of a chunked body")
            chunked.consumed(len(data))
            return data
        length = self._length
        if length is None:
            data = connection._read_some(limit)
            if not data:
                self.complete = True
            return data
        data = connection._read_some(min(limit, length))
        if not data:
            raise BadResponse(f"the target closed the connection with {length} body bytes missing")
        self._length = length = length - len(data)
        if length == 0:
            self.complete = True
        return data


PoolKey = Tuple[str, str, str, str]
"""``(client_key, scheme, address, host)`` of a pooled connection."""


def poll_readable(sock: Any, timeout: float) -> bool:
    """Whether ``sock`` (anything with ``fileno()``) becomes readable within
    ``timeout`` seconds (EOF and errors count as readable); blocks at most
    that long. urllib3's wait: ``poll`` where there is one, so any descriptor
    number works (``select`` fails past 1023), ``select`` on Windows."""
    return wait_for_read(sock, timeout=max(0.0, timeout))


def _reusable(connection: UpstreamConnection) -> bool:
    """Whether an idle connection may carry another request: still open, and
    nothing to read (an idle HTTP connection that is readable was closed by
    the far side, or got bytes no request asked for)."""
    sock: Any = connection.sock
    if sock is None or not connection.idle_clean:
        return False
    readable_now = getattr(sock, "readable_now", None)
    if readable_now is not None:  # a TunnelConnection: no descriptor needed
        return not sock.closed and not readable_now()
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        return not poll_readable(sock, 0.0)
    except (OSError, ValueError):
        return False


class ConnectionPool:
    """Idle keep-alive HTTP connections over tunneled connections.

    At most ``max_idle_per_key`` idle connections per key, each kept at most
    ``idle_timeout`` seconds. :meth:`get` hands out the most recently used
    live one. ``_lock`` guards ``_idle``; connections are closed after it is
    released. Never blocks except on that lock.
    """

    def __init__(self, max_idle_per_key: int = DEFAULT_MAX_IDLE_PER_KEY,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle: Dict[PoolKey, Deque[Tuple[float, UpstreamConnection]]] = {}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._idle.values())

    def get(self, key: PoolKey) -> Optional[UpstreamConnection]:
        """An idle live connection for ``key``, or None. Stale ones met on the
        way are closed."""
        stale: List[UpstreamConnection] = []
        found: Optional[UpstreamConnection] = None
        oldest = time.monotonic() - self.idle_timeout
        with self._lock:
            entries = self._idle.get(key)
            while entries:
                since, connection = entries.pop()
                if since >= oldest and _reusable(connection):
                    found = connection
                    break
                stale.append(connection)
            if entries is not None and not entries:
                del self._idle[key]
        _close_all(stale)
        return found

    def put(self, key: PoolKey, connection: UpstreamConnection) -> None:
        """Keep ``connection`` for reuse (closing the oldest one past the bound)."""
        if self.max_idle_per_key <= 0:
            connection.close()
            return
        dropped: List[UpstreamConnection] = []
        with self._lock:
            entries = self._idle.setdefault(key, collections.deque())
            entries.append((time.monotonic(), connection))
            while len(entries) > self.max_idle_per_key:
                dropped.append(entries.popleft()[1])
        _close_all(dropped)

    def evict(self, client_key: str) -> int:
        """Close every idle connection of ``client_key``; return how many."""
        with self._lock:
            keys = [key for key in self._idle if key[0] == client_key]
            dropped = [connection for key in keys for _, connection in self._idle.pop(key)]
        _close_all(dropped)
        return len(dropped)

    def clear(self) -> None:
        """Close every idle connection."""
        with self._lock:
            dropped = [connection for entries in self._idle.values() for _, connection in entries]
            self._idle.clear()
        _close_all(dropped)


def _close_all(connections: List[UpstreamConnection]) -> None:
    for connection in connections:
        try:
            connection.close()
        except OSError:  # pragma: no cover - closing never fails on our sockets
            pass


