"""The remotedialer wire protocol, sans I/O.

Every binary WebSocket message is one protocol message::

    varint message_id | varint conn_id | varint type | [varint deadline] | payload

Varints are Go's *signed* varints (zig-zag, then unsigned LEB128). The deadline
field exists only for DATA and CONNECT; it is ignored on read and always written
as 15000. This module encodes and decodes such messages and nothing else: no
sockets, threads or clocks, so it can be tested from byte vectors alone.
"""

from __future__ import annotations

import enum
import itertools
import random
import re
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import ProtocolError

__all__ = [
    "MessageType",
    "Message",
    "MessageIdCounter",
    "encode_message",
    "encode_data_header",
    "decode_message",
    "encode_sync_payload",
    "decode_sync_payload",
    "encode_varint",
    "decode_varint",
    "split_client_address",
    "LEGACY_DEADLINE_MS",
    "MAX_CONNECT_PAYLOAD",
    "MAX_ERROR_PAYLOAD",
    "MAX_CLIENT_PAYLOAD",
    "EOF_TEXT",
    "TUNNEL_DISCONNECT_TEXT",
]

Bytes = Union[bytes, bytearray, memoryview]
"""Any bytes-like payload the codecs accept."""

LEGACY_DEADLINE_MS = 15000
"""Value written into the legacy deadline field of DATA and CONNECT."""

MAX_CONNECT_PAYLOAD = 266
"""Readers keep at most this many bytes of a CONNECT payload."""
MAX_ERROR_PAYLOAD = 100
"""Readers keep at most this many bytes of an ERROR payload."""
MAX_CLIENT_PAYLOAD = 100
"""Readers keep at most this many bytes of an ADD_CLIENT / REMOVE_CLIENT payload."""

EOF_TEXT = "EOF"
"""ERROR text that means a clean close."""
TUNNEL_DISCONNECT_TEXT = "tunnel disconnect"
"""Error given to every connection of a session that ended."""

_INT64_MIN = -(1 << 63)
_UINT64_MASK = (1 << 64) - 1
_MAX_VARINT_LEN = 10


class MessageType(enum.IntEnum):
    """Message types of the protocol. Other values may arrive and are ignored."""

    DATA = 1
    CONNECT = 2
    ERROR = 3
    ADD_CLIENT = 4
    REMOVE_CLIENT = 5
    PAUSE = 6
    RESUME = 7
    SYNC_CONNECTIONS = 8


_TYPES_WITH_DEADLINE = (MessageType.DATA, MessageType.CONNECT)
_PAYLOAD_LIMITS = {
    MessageType.CONNECT: MAX_CONNECT_PAYLOAD,
    MessageType.ERROR: MAX_ERROR_PAYLOAD,
    MessageType.ADD_CLIENT: MAX_CLIENT_PAYLOAD,
    MessageType.REMOVE_CLIENT: MAX_CLIENT_PAYLOAD,
}


def to_int64(value: int) -> int:
    """Wrap an integer into the signed 64-bit range, as Go's int64 overflow does."""
    value &= _UINT64_MASK
    return value - (1 << 64) if value >> 63 else value


# Single-byte encodings of the small values that fill nearly every header.
_SMALL_VARINTS = {n: bytes([(n << 1) if n >= 0 else ((-n << 1) - 1)]) for n in range(-64, 64)}


_BYTE = [bytes((n,)) for n in range(256)]
# Message ids count up by one, so all but the first byte of their varint stay
# the same for 128 messages in a row: those tails are remembered (a few
# entries, emptied when full). Plain dict operations, safe from any thread.
_TAIL_CACHE_SIZE = 64
_encoded_tails: Dict[int, bytes] = {}  # unsigned >> 7 -> its LEB128 bytes
_decoded_tails: Dict[bytes, int] = {}  # LEB128 bytes after the first -> their value


def _encode_unsigned(unsigned: int) -> bytes:
    out = bytearray()
    while unsigned >= 0x80:
        out.append((unsigned & 0x7F) | 0x80)
        unsigned >>= 7
    out.append(unsigned)
    return bytes(out)


def encode_varint(value: int) -> bytes:
    """Encode a signed 64-bit integer as Go's ``binary.PutVarint`` does."""
    small = _SMALL_VARINTS.get(value)
    if small is not None:
        return small
    if not _INT64_MIN <= value < (1 << 63):
        raise ValueError(f"varint out of int64 range: {value}")
    unsigned = ((value << 1) ^ (value >> 63)) & _UINT64_MASK
    high = unsigned >> 7
    tail = _encoded_tails.get(high)
    if tail is None:
        tail = _encode_unsigned(high)
        if len(_encoded_tails) >= _TAIL_CACHE_SIZE:
            _encoded_tails.clear()
        _encoded_tails[high] = tail
    return _BYTE[(unsigned & 0x7F) | 0x80] + tail


def decode_varint(data: Bytes, offset: int = 0) -> Tuple[int, int]:
    """Decode one signed varint at ``offset``; return ``(value, next_offset)``.

    Raises :class:`ProtocolError` when the data ends first or the varint
    overflows 64 bits, with the same distinctions Go's ``binary.ReadVarint``
    makes (``EOF`` before the first byte, ``unexpected EOF`` inside one).
    """
    unsigned = 0
    shift = 0
    end = len(data)
    for index in range(_MAX_VARINT_LEN):
        position = offset + index
        if position >= end:
            raise ProtocolError("EOF" if index == 0 else "unexpected EOF")
        byte = data[position]
        if byte < 0x80:
            if index == _MAX_VARINT_LEN - 1 and byte > 1:
                break
            unsigned |= byte << shift
            value = (unsigned >> 1) ^ -(unsigned & 1)
            return value, position + 1
        unsigned |= (byte & 0x7F) << shift
        shift += 7
    raise ProtocolError("varint overflows a 64-bit integer")


@dataclass(frozen=True)
class Message:
    """One decoded protocol message.

    ``payload`` is already cut to the read limit of its type. The properties
    below interpret it for the types that carry structured text.
    """

    message_id: int
    conn_id: int
    type: int
    payload: Bytes = b""

    @property
    def type_name(self) -> str:
        """The type's name, or ``UNKNOWN(n)`` for a type this module does not know."""
        try:
            return MessageType(self.type).name
        except ValueError:
            return f"UNKNOWN({self.type})"

    @property
    def text(self) -> str:
        """The payload as text (undecodable bytes replaced)."""
        return bytes(self.payload).decode("utf-8", "replace")

    @property
    def proto(self) -> str:
        """CONNECT: the part of ``proto/address`` before the first ``/``."""
        return self.text.split("/", 1)[0]

    @property
    def address(self) -> str:
        """CONNECT: the part after the first ``/``; ADD/REMOVE_CLIENT: the whole text."""
        if self.type == MessageType.CONNECT:
            return self.text.split("/", 1)[1]
        return self.text

    @property
    def is_eof(self) -> bool:
        """ERROR: whether the text means a clean close."""
        return self.type == MessageType.ERROR and bytes(self.payload) == b"EOF"

    def __repr__(self) -> str:
        size = len(self.payload)
        shown = bytes(self.payload[:48])
        return (
            f"Message(id={self.message_id}, conn={self.conn_id}, {self.type_name}, "
            f"{size} bytes: {shown!r}{'...' if size > 48 else ''})"
        )


#: The header of a DATA message: message id, connection id, type 1 (zig-zag
#: 2), deadline; each varint at most 10 bytes (the 10th is checked after).
_DATA_HEADER = re.compile(
    rb"([\x80-\xff]{0,9}[\x00-\x7f])([\x80-\xff]{0,9}[\x00-\x7f])\x02([\x80-\xff]{0,9}[\x00-\x7f])"
)


def _varint_value(data: Bytes, start: int, end: int) -> int:
    """The value of the well-formed varint ``data[start:end]``."""
    if end - start == 1:
        unsigned = data[start]
    else:
        key = bytes(data[start + 1 : end])
        high = _decoded_tails.get(key)
        if high is None:
            high = 0
            for byte in reversed(key):
                high = (high << 7) | (byte & 0x7F)
            if len(_decoded_tails) >= _TAIL_CACHE_SIZE:
                _decoded_tails.clear()
            _decoded_tails[key] = high
        unsigned = (high << 7) | (data[start] & 0x7F)
    return (unsigned >> 1) ^ -(unsigned & 1)


def _decode_data_fast(data: Bytes) -> Optional[Message]:
    """The common case of :func:`decode_message`: a well-formed DATA header
    (None for anything else, which the general path decodes or refuses)."""
    match = _DATA_HEADER.match(data)
    if match is None:
        return None
    id_end, conn_end, end = match.end(1), match.end(2), match.end()
    if (
        (id_end == 10 and data[9] > 1)
        or (conn_end - id_end == 10 and data[conn_end - 1] > 1)
        or (end - conn_end == 11 and data[end - 1] > 1)
    ):
        return None  # a 10-byte varint overflowing 64 bits
    return Message(
        _varint_value(data, 0, id_end),
        _varint_value(data, id_end, conn_end),
        MessageType.DATA,
        memoryview(data)[end:],
    )


def decode_message(data: Bytes) -> Message:
    """Decode one whole WebSocket binary message.

    The payload of DATA messages is a zero-copy ``memoryview`` slice of ``data``;
    other payloads are ``bytes`` cut to their type's read limit. Raises
    :class:`ProtocolError` for a header that cannot be decoded or a CONNECT
    without ``/``; unknown types decode fine and are for the caller to ignore.
    """
    fast = _decode_data_fast(data)
    if fast is not None:
        return fast
    message_id, offset = decode_varint(data, 0)
    conn_id, offset = decode_varint(data, offset)
    message_type, offset = decode_varint(data, offset)
    if message_type in _TYPES_WITH_DEADLINE:
        _, offset = decode_varint(data, offset)
    if message_type == MessageType.DATA:
        payload: Bytes = memoryview(data)[offset:]
    else:
        limit = _PAYLOAD_LIMITS.get(message_type)  # type: ignore[call-overload]
        end = len(data) if limit is None else min(len(data), offset + limit)
        payload = bytes(data[offset:end])
        if message_type == MessageType.CONNECT and b"/" not in payload:
            raise ProtocolError("failed to parse connect address")
    return Message(message_id, conn_id, message_type, payload)


_DATA_TYPE_AND_DEADLINE = encode_varint(MessageType.DATA) + encode_varint(LEGACY_DEADLINE_MS)


def encode_data_header(message_id: int, conn_id: int) -> bytes:
    """The header of a DATA message; the payload follows it unchanged."""
    return encode_varint(message_id) + encode_varint(conn_id) + _DATA_TYPE_AND_DEADLINE


def encode_message(message_id: int, conn_id: int, message_type: int, payload: Bytes = b"") -> bytes:
    """Encode one message to the bytes of one WebSocket binary message."""
    parts = [encode_varint(message_id), encode_varint(conn_id), encode_varint(message_type)]
    if message_type in _TYPES_WITH_DEADLINE:
        parts.append(encode_varint(LEGACY_DEADLINE_MS))
    parts.append(bytes(payload))
    return b"".join(parts)


def encode_sync_payload(conn_ids: Sequence[int]) -> bytes:
    """SYNC_CONNECTIONS payload: each id as a little-endian signed 64-bit integer."""
    return struct.pack(f"<{len(conn_ids)}q", *conn_ids)


def decode_sync_payload(payload: Bytes) -> List[int]:
    """Decode a SYNC_CONNECTIONS payload; a length not a multiple of 8 is an error."""
    if len(payload) % 8:
        raise ProtocolError("incorrect data format")
    return list(struct.unpack(f"<{len(payload) // 8}q", payload))


def split_client_address(address: str) -> Optional[Tuple[str, int]]:
    """Split an ADD/REMOVE_CLIENT ``clientKey/sessionKey``; ``None`` if malformed."""
    client_key, slash, session_key = address.rpartition("/")
    digits = session_key[1:] if session_key[:1] in ("+", "-") else session_key
    if not slash or not digits.isascii() or not digits.isdigit():
        return None  # like Go's strconv.Atoi: no spaces, underscores or non-ASCII digits
    value = int(session_key)
    if not _INT64_MIN <= value < (1 << 63):
        return None
    return client_key, value


class MessageIdCounter:
    """Per-process message ids: random non-negative 63-bit start, +1 per message.

    ``next()`` is safe to call from many threads: ``itertools.count`` advances
    atomically under the GIL. The value wraps as a signed 64-bit integer.
    """

    def __init__(self, start: Optional[int] = None) -> None:
        first = random.getrandbits(63) if start is None else start
        self._counter: Iterator[int] = itertools.count(first)

    def next(self) -> int:
        """The id for the next message sent."""
        value = next(self._counter)
        if value >= (1 << 63):
            value = to_int64(value)
        return value


GLOBAL_MESSAGE_IDS = MessageIdCounter()
"""The process-wide counter every session uses, as in Go."""
