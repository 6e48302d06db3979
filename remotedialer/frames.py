"""The WebSocket frame codec (RFC 6455 §5), sans I/O.

Everything that turns frames into bytes and back lives here, for both ends:

* :class:`FrameReader` decodes frames (a server's reader: the masked frames
  of a client; with ``from_client=False`` a client's: unmasked server
  frames), assembles fragmented messages and enforces the message size limit;
* :func:`encode_frame` / :func:`encode_frame_header` build server-to-client
  frames (never masked), :func:`encode_masked_frame` client-to-server ones;
* :func:`close_payload` / :func:`parse_close` build and read close frames;
* :func:`mask` / :func:`mask_in_place` XOR payloads with the 4-byte key.

Masking is the hottest loop of a tunnel (a 1 GiB download profile showed
wsaccel's masker at about half of each side's CPU), so the fastest available
implementation serves payloads of :data:`NUMPY_MIN_SIZE` bytes or more: numpy
(the ``speedups`` extra, imported on first use so an idle process does not pay
its ~12 MiB), then wsaccel, then pure Python (~700 MB/s). That first import
runs on a thread of its own, never on the one masking: it takes 0.1 s idle and
over a second on a loaded machine, and a client masks under its session's
write lock, so an inline import held back every control message (PAUSE among
them: the peer's transfers overran the receive buffer's hard limit meanwhile).
Until it is done, the next implementation masks.

No extensions (permessage-deflate) are supported, as with the Go server.
"""

from __future__ import annotations

import codecs
import os
import struct
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple

from .errors import ProtocolError
from .protocol import Bytes

__all__ = [
    "FrameReader",
    "WebSocketEvent",
    "WebSocketProtocolError",
    "encode_frame",
    "encode_frame_header",
    "encode_masked_frame",
    "close_payload",
    "parse_close",
    "mask",
    "mask_in_place",
    "masking_implementation",
    "OP_CONTINUATION",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
]

# Opcodes (RFC 6455 §5.2). Every protocol message travels in BINARY messages;
# TEXT is a protocol error for remotedialer; clients PING every 5 s.
OP_CONTINUATION = 0x0
"""Opcode: continues a fragmented message."""
OP_TEXT = 0x1
"""Opcode: a text message (a protocol error for remotedialer)."""
OP_BINARY = 0x2
"""Opcode: a binary message: every remotedialer message travels in one."""
OP_CLOSE = 0x8
"""Opcode: the closing handshake."""
OP_PING = 0x9
"""Opcode: a ping (clients send one every 5 s)."""
OP_PONG = 0xA
"""Opcode: the answer to a ping."""
_DATA_OPCODES = (OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TOO_BIG = 1009


def _valid_close_code(code: int) -> bool:
    """Whether a peer may send close ``code`` (RFC 6455 §7.4: the defined
    ones that are not local-only, and the ranges for libraries and
    applications). Compared, not looked up: a set of the 2,011 codes held
    0.2 MiB in every process."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1013 or 3000 <= code <= 4999


# ------------------------------------------------------------------ masking
#: Payloads shorter than this are masked without numpy: its call overhead
#: wins, and a process carrying only small messages never loads it (~12 MiB).
NUMPY_MIN_SIZE = 4096

_numpy: Any = None  # the module once imported, False if unavailable
# Guards _numpy_import_started: whether the background import was started.
_numpy_import_lock = threading.Lock()
_numpy_import_started = False

try:  # optional C speedup
    from wsaccel.xormask import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
        XorMaskerSimple as _AccelMasker,
    )
except ImportError:  # pragma: no cover - depends on the environment
    _AccelMasker = None

_accel: Optional[Callable[[bytes], Any]] = _AccelMasker


def _load_numpy() -> Any:
    global _numpy
    if _numpy is None:
        try:
            import numpy

            _numpy = numpy
        except ImportError:  # pragma: no cover - depends on the environment
            _numpy = False
    return _numpy


def _load_numpy_in_background() -> None:
    """Start importing numpy on a thread of its own (once per process)."""
    global _numpy_import_started
    with _numpy_import_lock:
        if _numpy_import_started:
            return
        _numpy_import_started = True
    threading.Thread(target=_load_numpy, name="remotedialer-numpy-import", daemon=True).start()


def masking_implementation() -> str:
    """Which implementation masks large payloads: ``numpy``, ``wsaccel`` or ``python``."""
    if _load_numpy():
        return "numpy"
    return "wsaccel" if _accel is not None else "python"


def mask_in_place(buffer: bytearray, key: bytes, start: int = 0) -> None:
    """XOR ``buffer[start:]`` with ``key`` (4 bytes) repeated, in place; the
    key's first byte applies at ``start``. Never blocks, never raises for
    valid input."""
    length = len(buffer) - start
    if length <= 0:
        return
    if length >= NUMPY_MIN_SIZE:
        numpy = _numpy
        if numpy is None:
            _load_numpy_in_background()  # never here: the caller may hold a session's write lock
        elif numpy:
            words = length >> 2
            view = numpy.frombuffer(buffer, dtype=numpy.uint32, count=words, offset=start)
            view ^= numpy.uint32(int.from_bytes(key, sys.byteorder))
            del view  # release the export so the bytearray may be resized again
            for index in range(start + (words << 2), len(buffer)):
                buffer[index] ^= key[(index - start) & 3]
            return
    if _accel is not None:
        buffer[start:] = _accel(key).process(bytes(buffer[start:]))
        return
    buffer[start:] = _xor_python(memoryview(buffer)[start:], key)


def _xor_python(data: Bytes, key: bytes) -> bytes:
    """``data`` (not empty) XORed with ``key`` repeated, as one big-integer XOR."""
    length = len(data)
    whole, rest = divmod(length, 4)
    stream = key * whole + key[:rest]
    value = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(length, "little")


def mask(data: Bytes, key: bytes) -> bytes:
    """``data`` XORed with ``key`` repeated (masking and unmasking are the same).

    Below :data:`NUMPY_MIN_SIZE` (a server's unmasking of the client's
    response frames) the payload goes to wsaccel or the big-integer XOR
    directly, without the in-place path's copies: 30k -> 22k instructions
    per call at 1.2 KiB with wsaccel (callgrind)."""
    length = len(data)
    if not length:
        return b""
    if length < NUMPY_MIN_SIZE:
        if _accel is not None:
            return bytes(_accel(key).process(data))
        return _xor_python(data, key)
    buffer = bytearray(data)
    mask_in_place(buffer, key)
    return bytes(buffer)


# ----------------------------------------------------------------- encoding
_EMPTY = bytearray()  # never changed: its join builds a new bytearray
def encode_frame_header(opcode: int, length: int, fin: bool = True, masked: bool = False) -> bytes:
    """The header of a frame carrying ``length`` payload bytes, without the
    masking key that follows it when ``masked``."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", first, mask_bit | length)
    if length < 1 << 16:
        return struct.pack("!BBH", first, mask_bit | 126, length)
    return struct.pack("!BBQ", first, mask_bit | 127, length)


def encode_frame(opcode: int, payload: Bytes = b"", fin: bool = True) -> bytes:
    """An unmasked (server-to-client) frame: its header followed by ``payload``."""
    return encode_frame_header(opcode, len(payload), fin) + bytes(payload)


def encode_masked_frame(
    opcode: int, payload: Bytes, key: Optional[bytes] = None, tail: Bytes = b""
) -> bytearray:
    """One whole client-to-server frame (FIN set): header, ``key`` (random if
    not given) and the masked payload ``payload`` + ``tail``, built in one
    buffer with one copy of each (a DATA message's header and its payload
    are never joined first)."""
    if key is None:
        key = os.urandom(4)
    header = encode_frame_header(opcode, len(payload) + len(tail), masked=True)
    # join: one allocation of the frame's size (appending grew it in steps)
    frame = _EMPTY.join((header, key, payload, tail))
    mask_in_place(frame, key, len(header) + 4)
    return frame


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: the status code and a UTF-8 reason,
    truncated so the frame stays within the 125 bytes of a control frame."""
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


def _check_close(payload: bytes) -> None:
    """Fail a close frame whose payload is one byte, whose code a peer may not
    send (RFC 6455 §7.4) or whose reason is not UTF-8."""
    if not payload:
        return
    if len(payload) == 1:
        raise _error("close frame with a one-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not _valid_close_code(code):
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


# ----------------------------------------------------------------- decoding
WebSocketEvent = Tuple[int, bytes]
"""``(opcode, payload)``: a whole data message (TEXT or BINARY, fragments
joined) or one control frame (CLOSE, PING, PONG)."""


class WebSocketProtocolError(ProtocolError):
    """A frame breaking RFC 6455 (or our size limit); ``close_code`` is the
    close status to answer with."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


def _error(message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> WebSocketProtocolError:
    return WebSocketProtocolError(f"websocket: {message}", close_code)


class FrameReader:
    """Decodes the frames a client sends to a server (or, with
    ``from_client=False``, those a server sends to a client), sans I/O.

    :meth:`feed` the bytes read from the socket, then call :meth:`next_event`
    until it returns ``None``. Enforces RFC 6455 §5 for an end that
    negotiated no extension: client frames must be masked and server frames
    must not be, reserved bits and unknown opcodes are errors, control frames
    are short and unfragmented, continuation frames only continue a started
    message, lengths use their shortest encoding, text is UTF-8 (checked frame
    by frame), a close frame carries nothing, or a valid code and a UTF-8
    reason. A message over ``max_message_size`` bytes is an error as soon as
    its length is known. Errors raise :class:`WebSocketProtocolError`.

    ``tests/core/test_wsproto_differential.py`` checks it against wsproto's frame
    parser on generated valid and invalid streams, in both directions (found
    and fixed that way: non-minimal lengths, unchecked close payloads and
    text that was not UTF-8 were accepted): the two agree on messages,
    control frames, errors and close codes; this reader may only fail a bad
    frame earlier (from its first two bytes), and it alone enforces the size
    limit (1009).
    """

    def __init__(self, max_message_size: int, from_client: bool = True) -> None:
        self.max_message_size = max_message_size
        self.from_client = from_client
        self._buffer = bytearray()
        self._fragments: List[bytes] = []
        self._fragment_opcode: Optional[int] = None
        self._fragment_size = 0
        self._text: Optional[codecs.IncrementalDecoder] = None  # checks the UTF-8 of a text message

    def feed(self, data: Bytes) -> None:
        """Add bytes read from the socket."""
        self._buffer += data

    def next_event(self) -> Optional[WebSocketEvent]:
        """The next complete event, or ``None`` until more bytes are fed.
        Raises :class:`WebSocketProtocolError` on a bad frame."""
        while True:
            frame = self._next_frame()
            if frame is None:
                return None
            fin, opcode, payload = frame
            if opcode in _CONTROL_OPCODES:
                if opcode == OP_CLOSE:
                    _check_close(payload)
                return opcode, payload
            if opcode != OP_CONTINUATION:
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
                assert message_opcode is not None  # _next_frame checked the order
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
        if opcode == OP_CONTINUATION and self._fragment_opcode is None:
            raise _error("continuation frame without a message to continue")
        if opcode in _DATA_OPCODES and self._fragment_opcode is not None:
            raise _error("new message while a fragmented one is unfinished")
        masked = bool(second & 0x80)
        if masked != self.from_client:
            raise _error("client frame not masked" if self.from_client else "server frame masked")
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
        start = offset + 4 if masked else offset
        end = start + length
        if len(buf) < end:
            return None
        if masked:
            payload = mask(memoryview(buf)[start:end], bytes(buf[offset:start]))
        else:
            payload = bytes(buf[start:end])
        del buf[:end]
        return fin, opcode, payload
