"""Request framing rules of the example server's front end, against request
smuggling (RFC 9112 §6).

The front end (:class:`~remotedialer.cli.server.KeepAliveRequestHandler`)
keeps connections alive and the forwarder sends requests on over pooled
connections, so a request whose length two parsers could read differently
must never be served. :func:`framing_error` decides, from the header fields,
whether a request is refused: a ``Content-Length`` that is not one plain
decimal number (``+5``, ``1_0``, ``0x5``, ``5, 6``, two different values), a
``Transfer-Encoding`` beside a ``Content-Length`` or in an HTTP/1.0 request,
or any transfer coding other than a single ``chunked``.
:class:`ChunkedRequestBody` reads a chunked body strictly (hex sizes only,
CRLF line ends, the CRLF after each chunk, bounded trailer), where werkzeug's
development dechunker accepts ``0x10``, ``+10``, ``1_0`` and bare CR or LF.
"""

from __future__ import annotations

import io
import re
from typing import Any, BinaryIO, List, Optional, Sequence, Tuple

__all__ = ["framing_error", "ChunkedRequestBody", "BadChunkedBody"]

_DIGITS = re.compile(r"[0-9]+")
#: chunk-size [ chunk-ext ] CRLF (RFC 9112 §7.1); extensions are ignored.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r\n")
#: Longest chunk-size or trailer line, and trailer lines, accepted.
_MAX_LINE = 4096
_MAX_TRAILER_LINES = 100


def framing_error(version: str, fields: Sequence[Tuple[str, str]]) -> Optional[Tuple[int, str]]:
    """``(status, reason)`` to refuse a request whose header ``fields`` frame
    its body ambiguously or unsupportedly, or ``None`` if it may be served."""
    lengths: List[str] = []
    codings: List[str] = []
    for name, value in fields:
        lowered = name.lower()
        if lowered == "content-length":
            lengths.append(value)
        elif lowered == "transfer-encoding":
            codings.extend(item.strip(" \t").lower() for item in value.split(","))
    if any(not _DIGITS.fullmatch(value) for value in lengths):
        return 400, "Invalid Content-Length"
    if len(set(lengths)) > 1:
        return 400, "Conflicting Content-Length"
    if not codings:
        return None
    if lengths:
        return 400, "Both Transfer-Encoding and Content-Length"
    if version == "HTTP/1.0":
        return 400, "Transfer-Encoding in an HTTP/1.0 request"
    if codings == ["chunked"]:
        return None
    if codings[-1] != "chunked" or codings.count("chunked") > 1 or "" in codings:
        return 400, "Invalid Transfer-Encoding"
    return 501, "Unsupported transfer coding"


class BadChunkedBody(OSError):
    """A chunked request body breaks RFC 9112 §7.1 (the request fails and
    its connection is closed)."""


class ChunkedRequestBody(io.RawIOBase):
    """The decoded body of a chunked request, read strictly from ``rfile``
    (the connection's buffered reader). Reads block on the socket; a
    malformed body raises :class:`BadChunkedBody`."""

    def __init__(self, rfile: BinaryIO) -> None:
        self._rfile = rfile
        self._left = 0  # bytes left in the current chunk
        self._done = False

    def readable(self) -> bool:
        return True

    def _line(self) -> bytes:
        line = self._rfile.readline(_MAX_LINE + 1)
        if not line.endswith(b"\r\n"):
            raise BadChunkedBody("invalid chunked body: line too long, bare LF or end of stream")
        return line

    def _next_chunk(self) -> None:
        match = _CHUNK_LINE.fullmatch(self._line())
        if match is None:
            raise BadChunkedBody("invalid chunk size line")
        self._left = int(match.group(1), 16)
        if self._left == 0:
            for _ in range(_MAX_TRAILER_LINES + 1):
                if self._line() == b"\r\n":
                    self._done = True
                    return
            raise BadChunkedBody("too many trailer lines")

    def readinto(self, buffer: Any) -> int:
        if self._done:
            return 0
        if self._left == 0:
            self._next_chunk()
            if self._done:
                return 0
        wanted = min(len(buffer), self._left)
        data = self._rfile.read(wanted)
        if len(data) != wanted:
            raise BadChunkedBody("chunked body ended early")
        buffer[: len(data)] = data
        self._left -= len(data)
        if self._left == 0 and self._rfile.read(2) != b"\r\n":
            raise BadChunkedBody("no CRLF after a chunk")
        return len(data)
