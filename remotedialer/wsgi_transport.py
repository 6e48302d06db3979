"""The server end of a tunnel's WebSocket, taken over from a WSGI server.

The connect endpoint runs inside a WSGI server (werkzeug's threaded server,
gunicorn's ``gthread`` worker). Once the request is authorized, the handler
thread takes the raw socket out of the WSGI environ, answers the upgrade
itself and then *is* the session's reader: :class:`ServerWebSocket` reads and
decodes frames on whichever thread calls :meth:`~ServerWebSocket.receive`. No
extra thread per tunnel is started (simple-websocket would start one), received
messages are never queued behind the reader's back, so TCP backpressure reaches
the client, and every write — data, pongs, close frames — goes through one
lock and is written completely (``sendall``).

Pieces, from the bottom:

* :class:`FrameReader`: a sans-IO decoder of client-to-server frames (RFC 6455
  §5) that assembles messages and enforces the maximum message size;
* :func:`encode_frame`: server-to-client frames (never masked);
* :func:`is_websocket_request`, :func:`accept_key`, :func:`socket_from_environ`:
  the handshake;
* :class:`ServerWebSocket`: the :class:`~remotedialer.transport.Transport`;
* :func:`finish_taken_over_response`: ends the WSGI call so that the server
  writes nothing more into the socket.

:class:`SimpleWebSocketTransport` adapts simple-websocket instead, for those
who prefer it; it costs one more thread per tunnel.

No extensions (permessage-deflate) and no subprotocols are negotiated, as with
the Go server.
"""

from __future__ import annotations

import base64
import codecs
import collections
import errno
import hashlib
import logging
import select
import socket
import struct
import threading
import time
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple, Union

from . import masking
from .errors import ProtocolError
from .transport import TransportClosed

__all__ = [
    "FrameReader",
    "WebSocketEvent",
    "encode_frame",
    "accept_key",
    "is_websocket_request",
    "socket_from_environ",
    "ServerWebSocket",
    "SimpleWebSocketTransport",
    "finish_taken_over_response",
    "UnsupportedServerError",
    "WebSocketProtocolError",
    "OP_CONTINUATION",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
]

log = logging.getLogger(__name__)

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""The magic GUID of RFC 6455 §1.3."""

OP_CONTINUATION = 0x0
"""Opcode of a continuation frame (RFC 6455 §5.2)."""
OP_TEXT = 0x1
"""Opcode of a text frame: a protocol error for remotedialer."""
OP_BINARY = 0x2
"""Opcode of a binary frame: every protocol message travels in these."""
OP_CLOSE = 0x8
"""Opcode of a close frame."""
OP_PING = 0x9
"""Opcode of a ping frame (clients ping every 5 s)."""
OP_PONG = 0xA
"""Opcode of a pong frame."""
_DATA_OPCODES = (OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TOO_BIG = 1009
#: Close codes a peer may send (RFC 6455 §7.4: the defined ones that are not
#: local-only, and the ranges for libraries and applications).
_VALID_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1014), *range(3000, 5000)))

#: Bytes asked of ``recv`` at a time (64 KiB measured twice as fast as 4 KiB).
RECEIVE_BYTES = 64 * 1024
#: Payloads up to this size are joined with their header into one write.
_JOIN_LIMIT = 64 * 1024
#: How long :meth:`ServerWebSocket.close` waits to write its close frame.
_CLOSE_WRITE_TIMEOUT = 1.0
# Pongs owed but not written yet, at most this many (the oldest are dropped: a
# pong for the latest ping is enough, RFC 6455 5.5.3).
_MAX_PENDING_PONGS = 64

Bytes = Union[bytes, bytearray, memoryview]

def unmask(payload: Bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3)."""
    return masking.mask(payload, mask)  # numpy, wsaccel or pure Python: see masking.py


def encode_frame(opcode: int, payload: Bytes = b"", fin: bool = True) -> bytes:
    """The header of an unmasked (server-to-client) frame followed by ``payload``."""
    return encode_frame_header(opcode, len(payload), fin) + bytes(payload)


def encode_frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """The header of an unmasked frame carrying ``length`` payload bytes."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: the status code and a UTF-8 reason,
    truncated so the frame stays within the 125 bytes of a control frame."""
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


WebSocketEvent = Tuple[int, bytes]
"""``(opcode, payload)``: a whole data message (TEXT or BINARY, fragments
joined) or one control frame (CLOSE, PING, PONG)."""


class FrameReader:
    """Decodes the frames a client sends to a server, sans I/O.

    :meth:`feed` the bytes read from the socket, then call :meth:`next_event`
    until it returns ``None``. Enforces RFC 6455 §5 for a server that
    negotiated no extension: client frames must be masked, reserved bits and
    unknown opcodes are errors, control frames are short and unfragmented,
    continuation frames only continue a started message, lengths use their
    shortest encoding, text is UTF-8 (checked frame by frame), a close
    frame carries nothing, or a valid code and a UTF-8 reason. A message over
    ``max_message_size`` bytes is an error as soon as its length is known.
    Errors raise :class:`WebSocketProtocolError`.

    ``tests/test_wsproto_differential.py`` checks it against wsproto's frame
    parser on generated valid and invalid streams: the two agree on messages,
    control frames, errors and close codes; this reader may only fail a bad
    frame earlier (from its first two bytes), and it alone enforces the size
    limit (1009).
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._fragments: List[bytes] = []
        self._fragment_opcode: Optional[int] = None
        self._fragment_size = 0
        self._text: Optional[codecs.IncrementalDecoder] = None  # checks the UTF-8 of a text message
        self.buffered = 0

    def feed(self, data: Bytes) -> None:
        """Add bytes read from the socket."""
        self._buffer += data

    def next_event(self) -> Optional[WebSocketEvent]:
        """The next complete event, or ``None`` until more bytes are fed.
        Raises :class:`~remotedialer.errors.ProtocolError` on a bad frame."""
        while True:
            frame = self._next_frame()
            if frame is None:
                return None
            fin, opcode, payload = frame
            if opcode in _CONTROL_OPCODES:
                if opcode == OP_CLOSE:
                    _check_close(payload)
                return opcode, payload
            if opcode == OP_CONTINUATION:
                if self._fragment_opcode is None:
                    raise _error("continuation frame without a message to continue")
            else:
                if self._fragment_opcode is not None:
                    raise _error("new message while a fragmented one is unfinished")
                if opcode == OP_TEXT:
                    self._text = codecs.getincrementaldecoder("utf-8")()
                if fin:
                    self._check_text(payload, True)
                    return opcode, payload
                self._fragment_opcode = opcode
            self._check_text(payload, fin)
            self._fragment_size += len(payload)
            self._check_size(self._fragment_size)
            self._fragments.append(payload)
            if fin:
                message_opcode = self._fragment_opcode
                data = b"".join(self._fragments)
                self._fragments = []
                self._fragment_opcode = None
                self._fragment_size = 0
                return message_opcode, data

    def _check_text(self, payload: bytes, final: bool) -> None:
        """Fail a text message as soon as a frame breaks its UTF-8."""
        if self._text is None:
            return
        try:
            self._text.decode(payload, final)
        except UnicodeDecodeError as exc:
            self._text = None
            raise _error(f"text message is not UTF-8: {exc.reason}", CLOSE_INVALID_PAYLOAD) from None
        if final:
            self._text = None

    def _check_size(self, size: int) -> None:
        if size > self.max_message_size:
            raise _error(f"message of {size}+ bytes over the limit", CLOSE_TOO_BIG)

    def _next_frame(self) -> Optional[Tuple[bool, int, bytes]]:
        """One whole frame ``(fin, opcode, unmasked payload)`` if buffered."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin = bool(first & 0x80)
        if first & 0x70:
            raise _error("reserved bits set")
        opcode = first & 0x0F
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES and opcode != OP_CONTINUATION:
            raise _error(f"unknown opcode {opcode:#x}")
        if not second & 0x80:
            raise _error("client frame not masked")
        length = second & 0x7F
        offset = 2
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise _error("fragmented control frame")
            if length > 125:
                raise _error("control frame longer than 125 bytes")
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, 2)
            if length < 126:
                raise _error("frame length not in its shortest form")
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, 2)
            if length >> 63:
                raise _error("frame length with the high bit set")
            if length < 1 << 16:
                raise _error("frame length not in its shortest form")
            offset = 10
        if opcode not in _CONTROL_OPCODES:
            # fail before buffering a frame we will not accept
            self._check_size(self._fragment_size + length)
        end = offset + 4 + length
        if len(buf) < end:
            return None
        mask = bytes(buf[offset:offset + 4])
        payload = unmask(memoryview(buf)[offset + 4:end], mask)
        del buf[:end]
        return fin, opcode, payload


class WebSocketProtocolError(ProtocolError):
    """A frame breaking RFC 6455 (or our size limit); ``close_code`` is the
    close status to answer with."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


def _error(message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> WebSocketProtocolError:
    return WebSocketProtocolError(f"websocket: {message}", close_code)


def _check_close(payload: bytes) -> None:
    """Fail a close frame whose payload is one byte, whose code a peer may not
    send (RFC 6455 §7.4) or whose reason is not UTF-8."""
    if not payload:
        return
    if len(payload) == 1:
        raise _error("close frame with a one-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if code not in _VALID_CLOSE_CODES:
        raise _error(f"close frame with the invalid code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _error("close reason is not UTF-8", CLOSE_INVALID_PAYLOAD) from None


def parse_close(payload: bytes) -> Tuple[int, str]:
    """The status code and reason of a close frame (1005 when it has none)."""
    if len(payload) < 2:
        return CLOSE_NO_STATUS, ""
    (code,) = struct.unpack_from("!H", payload)
    return code, payload[2:].decode("utf-8", "replace")


# ---------------------------------------------------------------- handshake
def _header_tokens(environ: Mapping[str, Any], name: str) -> List[str]:
    value = str(environ.get(name, ""))
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def is_websocket_request(environ: Mapping[str, Any]) -> Optional[str]:
    """Why ``environ`` is not a valid WebSocket upgrade request (RFC 6455
    §4.2.1), or ``None`` if it is one."""
    if environ.get("REQUEST_METHOD", "GET") != "GET":
        return "websocket: the request method is not GET"
    if "websocket" not in _header_tokens(environ, "HTTP_UPGRADE"):
        return "websocket: the client is not using the websocket protocol: 'upgrade' token not found"
    if "upgrade" not in _header_tokens(environ, "HTTP_CONNECTION"):
        return "websocket: the client is not using the websocket protocol: 'Connection: Upgrade' missing"
    if "13" not in _header_tokens(environ, "HTTP_SEC_WEBSOCKET_VERSION"):
        return "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header"
    key = str(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")).strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        return "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header is missing or blank"
    return None


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value answering ``Sec-WebSocket-Key: key``."""
    digest = hashlib.sha1(key.strip().encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


class UnsupportedServerError(RuntimeError):
    """The WSGI server does not expose its socket (only werkzeug and gunicorn do)."""


def socket_from_environ(environ: Mapping[str, Any]) -> Tuple[socket.socket, str]:
    """The client socket of the request and the server kind (``"werkzeug"``
    or ``"gunicorn"``). Raises :class:`UnsupportedServerError` otherwise."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        return sock, "werkzeug"
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        return sock, "gunicorn"
    raise UnsupportedServerError(
        "this WSGI server does not expose the client socket; "
        "use werkzeug's server or gunicorn with the gthread worker"
    )


class _TakenOver(ConnectionResetError):
    """Raised out of the WSGI app under werkzeug: werkzeug treats a
    ``ConnectionError`` as a dropped connection and writes nothing more."""


def finish_taken_over_response(server_kind: str) -> None:
    """End a WSGI call whose socket was taken over, so that the WSGI server
    writes nothing more into it; always raises.

    werkzeug writes a status line for any return value but stays silent on a
    ``ConnectionError``; gunicorn closes the connection quietly on
    ``StopIteration`` (the same ways flask-sock ends its responses). The
    socket must already be shut down so that werkzeug's drain of unread
    input ends at once.
    """
    if server_kind == "gunicorn":
        raise StopIteration()
    raise _TakenOver(errno.ECONNRESET, "websocket session ended")


# ------------------------------------------------------------------ transport
class ServerWebSocket:
    """The server side of an upgraded WebSocket, as a
    :class:`~remotedialer.transport.Transport`.

    :meth:`accept` answers the handshake on the socket of a WSGI request.
    Reading happens on the thread calling :meth:`receive` (the session's
    reader): pings are answered and counted as keepalive there, a close frame
    is answered and ends the stream. ``_send_lock`` guards every write to the
    socket and ``_close_sent``; nothing else is taken while it is held.
    """

    def __init__(
        self,
        sock: socket.socket,
        max_message_size: int,
        description: str = "",
        receive_bytes: int = RECEIVE_BYTES,
    ) -> None:
        self.sock = sock
        self.receive_bytes = receive_bytes
        self.last_keepalive = time.monotonic()
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self._reader = FrameReader(max_message_size)
        self._description = description or "websocket"
        self._send_lock = threading.Lock()
        self._close_sent = False  # guarded by _send_lock
        # Pongs: the reader must never block on the socket (a bulk send stuck
        # on a peer that is itself stuck writing to us would deadlock both
        # sides), so it queues its pong in _pending_pongs; writers send what
        # is queued after their own write, and the reader sends it itself only
        # when no writer is around and the socket can take it at once.
        # _pong_lock guards _writers (writers waiting for or holding
        # _send_lock); it is never held together with another lock nor during
        # I/O. Pongs are popped only by whoever holds _send_lock.
        self._pong_lock = threading.Lock()
        self._writers = 0
        self._pending_pongs: Deque[bytes] = collections.deque(maxlen=_MAX_PENDING_PONGS)
        # _close_lock serializes close(): a second caller waits until the
        # first has written the close frame and shut the socket down. It is
        # taken before _send_lock, never after.
        self._close_lock = threading.Lock()
        self._closed = False  # close() began: readers stop
        self._shut_down = False  # close() finished (guarded by _close_lock)
        sock.settimeout(None)  # liveness is the heartbeat's job, not a socket timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # not TCP
            pass

    @classmethod
    def accept(
        cls,
        environ: Mapping[str, Any],
        max_message_size: int,
        receive_bytes: int = RECEIVE_BYTES,
    ) -> "ServerWebSocket":
        """Answer the upgrade request in ``environ`` with ``101 Switching
        Protocols``, written straight to the socket. Check the request with
        :func:`is_websocket_request` first. Blocks on the socket write; raises
        ``OSError`` if it fails and :class:`UnsupportedServerError` if the
        server does not expose its socket."""
        sock, _kind = socket_from_environ(environ)
        key = str(environ["HTTP_SEC_WEBSOCKET_KEY"])
        response = (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
            "\r\n"
        ).encode("ascii")
        sock.sendall(response)
        peer = environ.get("REMOTE_ADDR", "?")
        port = environ.get("REMOTE_PORT")
        description = f"{peer}:{port}" if port else str(peer)
        return cls(sock, max_message_size, description, receive_bytes)

    # -- writes
    def _write(self, data: Bytes, payload: Optional[Bytes] = None) -> None:
        """Write ``data`` (then ``payload``) completely, under the send lock,
        then the pongs owed."""
        with self._pong_lock:
            self._writers += 1
        try:
            with self._send_lock:
                if self._close_sent:
                    raise TransportClosed("websocket closed")
                try:
                    self.sock.sendall(data)
                    if payload is not None:
                        self.sock.sendall(payload)
                    while self._pending_pongs:
                        self.sock.sendall(self._pending_pongs.popleft())
                        self.last_keepalive = time.monotonic()
                except OSError as exc:
                    raise TransportClosed(f"websocket write failed: {exc}") from exc
        finally:
            with self._pong_lock:
                self._writers -= 1
                stranded = not self._writers and bool(self._pending_pongs)
            if stranded:  # a pong queued after our flush, with no writer left
                self._flush_pongs()

    def _answer_ping(self, payload: bytes) -> None:
        """Reader thread: owe a pong and send it if that cannot block."""
        with self._pong_lock:
            self._pending_pongs.append(encode_frame(OP_PONG, payload))
            if self._writers:
                return  # a writer sends it after its write
        self._flush_pongs()

    def _flush_pongs(self) -> None:
        """Send the pongs owed if the socket is free and can take them at
        once; otherwise they go after the next write (or with the next ping).
        Never blocks. Errors show on the next read or write."""
        if not self._send_lock.acquire(blocking=False):
            return  # a writer took the socket since: it sends them
        try:
            if self._close_sent:
                self._pending_pongs.clear()
                return
            while self._pending_pongs:
                _, writable, _ = select.select([], [self.sock], [], 0)
                if not writable:
                    return
                self.sock.sendall(self._pending_pongs.popleft())
                self.last_keepalive = time.monotonic()
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    def send(self, data: Bytes) -> None:
        """Send one binary message. Blocks until the socket took all of it;
        raises :class:`TransportClosed` if the WebSocket is closed or fails."""
        header = encode_frame_header(OP_BINARY, len(data))
        if len(data) <= _JOIN_LIMIT:
            self._write(header + bytes(data))
        else:
            self._write(header, data)

    def ping(self) -> None:
        """Send a ping frame (the client pings; the server need not)."""
        self._write(encode_frame(OP_PING))

    def _send_close(self, code: int, reason: str = "", timeout: Optional[float] = None) -> None:
        """Send a close frame once; best effort, bounded by ``timeout`` for
        the send lock and for the socket to become writable."""
        if not self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            if self._close_sent:
                return
            self._close_sent = True
            frame = encode_frame(OP_CLOSE, close_payload(code, reason))
            if timeout is not None:
                _, writable, _ = select.select([], [self.sock], [], timeout)
                if not writable:
                    return
            self.sock.sendall(frame)
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    # -- reads
    def receive(self) -> bytes:
        """Block for the next binary message, answering pings on the way.

        Raises :class:`TransportClosed` when the WebSocket closes (a close
        frame, EOF or a socket error) and
        :class:`~remotedialer.errors.ProtocolError` for a text message or a
        frame breaking RFC 6455 (after sending the matching close frame).
        """
        while True:
            try:
                event = self._reader.next_event()
            except WebSocketProtocolError as exc:
                self._send_close(exc.close_code, str(exc)[:60], _CLOSE_WRITE_TIMEOUT)
                raise
            if event is None:
                self._fill()
                continue
            opcode, payload = event
            if opcode == OP_BINARY:
                return payload
            if opcode == OP_PING:
                # Keepalive counts once the pong is out: a peer that pings but
                # never reads cannot be answered and is cut at the read deadline.
                self._answer_ping(payload)
            elif opcode == OP_TEXT:
                self._send_close(CLOSE_UNSUPPORTED_DATA, "text message", _CLOSE_WRITE_TIMEOUT)
                raise ProtocolError("text message received")
            elif opcode == OP_CLOSE:
                self.close_code, self.close_reason = parse_close(payload)
                answer = CLOSE_NORMAL if self.close_code == CLOSE_NO_STATUS else self.close_code
                self._send_close(answer, "", _CLOSE_WRITE_TIMEOUT)
                raise TransportClosed(f"websocket closed by the client ({self.close_code})")
            # a pong: nothing to do (the server does not ping on its own)

    def _fill(self) -> None:
        if self._closed:
            raise TransportClosed("websocket closed")
        try:
            data = self.sock.recv(self.receive_bytes)
        except OSError as exc:
            if self._closed:
                raise TransportClosed("websocket closed") from exc
            raise TransportClosed(f"websocket read failed: {exc}") from exc
        if not data:
            raise TransportClosed("websocket closed" if self._closed else "websocket EOF")
        self._reader.feed(data)

    # -- closing
    def close(self) -> None:
        """Send a close frame (if none went yet) and shut the socket down,
        which ends a blocked :meth:`receive` or :meth:`send` at once. The
        socket itself is closed by the WSGI server once the handler returns,
        so the handler calls this too before returning: if another thread is
        closing, it waits (a few seconds at most) until the close frame is
        out. Idempotent, callable from any thread."""
        self._closed = True
        with self._close_lock:
            if self._shut_down:
                return
            self._send_close(CLOSE_NORMAL, "", _CLOSE_WRITE_TIMEOUT)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
            self._shut_down = True

    def describe(self) -> str:
        return self._description


# ------------------------------------------------------- simple-websocket
class _LockedSocket:
    """Socket proxy given to simple-websocket: every write goes through one
    lock and is complete; ``close`` only shuts down (the WSGI server closes)."""

    def __init__(self, sock: socket.socket, lock: threading.Lock) -> None:
        self._sock = sock
        self._lock = lock

    def send(self, data: Bytes, *flags: int) -> int:
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    sendall = send

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SimpleWebSocketTransport:
    """A :class:`~remotedialer.transport.Transport` over simple-websocket's
    server, for comparison with :class:`ServerWebSocket`.

    simple-websocket reads on its own thread and queues whole messages without
    bound, so it costs a thread per tunnel and gives up TCP backpressure. Its
    writes (pongs included) are routed through one lock as complete
    ``sendall`` calls, and pings are counted as keepalive.
    """

    def __init__(
        self,
        environ: Dict[str, Any],
        max_message_size: int,
        receive_bytes: int = RECEIVE_BYTES,
    ) -> None:
        import simple_websocket  # type: ignore[import-untyped,unused-ignore]
        from wsproto.events import Ping

        sock, kind = socket_from_environ(environ)
        self._lock = threading.Lock()
        locked = _LockedSocket(sock, self._lock)
        environ = dict(environ)
        environ[f"{kind}.socket"] = locked
        self.last_keepalive = time.monotonic()
        transport = self

        class _Events:
            """Wraps wsproto's connection to note every ping received."""

            def __init__(self, ws: Any) -> None:
                self._ws = ws

            def events(self) -> Any:
                for event in self._ws.events():
                    if isinstance(event, Ping):
                        transport.last_keepalive = time.monotonic()
                    yield event

            def __getattr__(self, name: str) -> Any:
                return getattr(self._ws, name)

        class _Server(simple_websocket.Server):  # type: ignore[misc]
            def handshake(self) -> None:
                super().handshake()
                self.ws: Any = _Events(self.ws)

        self._closed_error = simple_websocket.ConnectionClosed
        self._close_lock = threading.Lock()  # serializes close(), see ServerWebSocket.close
        self._shut_down = False
        self.ws = _Server(
            environ, receive_bytes=receive_bytes, max_message_size=max_message_size
        )
        peer = environ.get("REMOTE_ADDR", "?")
        self._description = f"{peer}:{environ.get('REMOTE_PORT', '?')} (simple-websocket)"

    def send(self, data: Bytes) -> None:
        try:
            self.ws.send(bytes(data))
        except (self._closed_error, OSError) as exc:
            raise TransportClosed(f"websocket write failed: {exc}") from exc

    def receive(self) -> bytes:
        try:
            data = self.ws.receive()
        except (self._closed_error, OSError) as exc:
            raise TransportClosed(f"websocket closed: {exc}") from exc
        if data is None:
            raise TransportClosed("websocket closed")
        if isinstance(data, str):
            raise ProtocolError("text message received")
        return bytes(data)

    def ping(self) -> None:
        from wsproto.events import Ping

        try:
            with self._lock:
                self.ws.sock._sock.sendall(self.ws.ws.send(Ping()))
        except OSError as exc:
            raise TransportClosed(f"websocket ping failed: {exc}") from exc

    def close(self) -> None:
        with self._close_lock:
            if self._shut_down:
                return
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws.sock.close()  # shutdown: ends simple-websocket's reader thread
            self.ws.event.set()
            self._shut_down = True

    def describe(self) -> str:
        return self._description
