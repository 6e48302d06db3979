"""WebSocket payload masking (RFC 6455 §5.3), the hottest loop of a tunnel.

Every client-to-server frame is XORed with a 4-byte key: the client masks all
it sends and the server unmasks all it receives. Profiles of a 1 GiB download
showed wsaccel's masker taking about half of each side's CPU; numpy's
vectorized XOR over 32-bit words is about seven times faster on 32 KiB
payloads. The fastest available implementation is used:

1. numpy (the ``speedups`` extra), imported lazily on the first payload of at
   least :data:`NUMPY_MIN_SIZE` bytes so that an idle process does not pay
   its memory;
2. wsaccel, if installed;
3. pure Python (XOR of two big integers), about 700 MB/s.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any, Callable, Optional, Union

__all__ = ["mask", "mask_in_place", "encode_masked_frame", "NUMPY_MIN_SIZE", "implementation"]

Bytes = Union[bytes, bytearray, memoryview]

#: Payloads shorter than this are masked without numpy: its call overhead
#: wins, and a process carrying only small messages never loads it (~12 MiB).
NUMPY_MIN_SIZE = 4096

_numpy: Any = None  # the module once imported, False if unavailable

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


def implementation() -> str:
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
        numpy = _numpy if _numpy is not None else _load_numpy()
        if numpy:
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
    whole, rest = divmod(length, 4)
    stream = key * whole + key[:rest]
    value = int.from_bytes(buffer[start:], "little") ^ int.from_bytes(stream, "little")
    buffer[start:] = value.to_bytes(length, "little")


def mask(data: Bytes, key: bytes) -> bytes:
    """``data`` XORed with ``key`` repeated (masking and unmasking are the same)."""
    if not len(data):
        return b""
    buffer = bytearray(data)
    mask_in_place(buffer, key)
    return bytes(buffer)


def encode_masked_frame(opcode: int, payload: Bytes, key: Optional[bytes] = None) -> bytearray:
    """One whole client-to-server frame (FIN set): header, ``key`` (random if
    not given) and the masked payload, built in one buffer with one copy of
    ``payload``."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    if key is None:
        key = os.urandom(4)
    frame = bytearray(header)
    frame += key
    start = len(frame)
    frame += payload
    mask_in_place(frame, key, start)
    return frame
