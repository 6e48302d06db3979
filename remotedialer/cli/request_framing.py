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
from typing import Any, BinaryIO

from ..gateway.http1 import MAX_CHUNK_LINE, ChunkedDecoder, ChunkedError
from ..gateway.http1 import request_framing_error as framing_error

__all__ = ["framing_error", "ChunkedRequestBody", "BadChunkedBody"]


class BadChunkedBody(OSError):
    """A chunked request body breaks RFC 9112 §7.1 (the request fails and
    its connection is closed)."""


class ChunkedRequestBody(io.RawIOBase):
    """The decoded body of a chunked request, read strictly from ``rfile``
    (the connection's buffered reader). Reads block on the socket; a
    malformed body raises :class:`BadChunkedBody`."""

    def __init__(self, rfile: BinaryIO) -> None:
        self._rfile = rfile
        self._decoder = ChunkedDecoder(strict=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        decoder = self._decoder
        try:
            while decoder.chunk_left == 0 and not decoder.done:
                decoder.feed_line(self._rfile.readline(MAX_CHUNK_LINE + 1))
            if decoder.done:
                return 0
            wanted = min(len(buffer), decoder.chunk_left)
            data = self._rfile.read(wanted)
            if len(data) != wanted:
                raise BadChunkedBody("chunked body ended early")
            buffer[: len(data)] = data
            decoder.consumed(len(data))
            if decoder.chunk_left == 0:
                decoder.feed_line(self._rfile.read(2))  # the CRLF ending the chunk
        except ChunkedError as exc:
            raise BadChunkedBody(str(exc)) from None
        return len(data)
