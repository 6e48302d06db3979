"""HTTP/1.1 as the example server's gateway speaks it, both directions, sans-IO.

One home for the rules the front end (:mod:`remotedialer.gateway.frontend`,
requests from clients) and the upstream client
(:mod:`remotedialer.gateway.upstream`, responses from targets) apply: the
token grammar and header value checks, the framing of a body (RFC 9112 §6)
in each direction, the chunked coding (§7.1), the response head parser and
the hop-by-hop header set. No sockets, threads or clocks here: the callers
read bytes and hand them in.

The two directions differ on purpose. A request's framing is checked
strictly: the front end keeps connections alive and the forwarder sends
requests on over pooled connections, so a request whose length two parsers
could read differently must never be served (request smuggling):
:func:`request_framing_error` refuses it, and a chunked request body
(:class:`ChunkedDecoder` with ``strict=True``) takes hex sizes only, CRLF
line ends and a bounded trailer, where werkzeug's development dechunker
accepts ``0x10``, ``+10``, ``1_0`` and bare CR or LF. A response from a
target is read as a user agent reads it (bare LF line ends, obsolete line
folding, a blank before a chunk extension), but its framing is never
guessed: :func:`response_framing` refuses what is ambiguous and marks what
may not be reused.

Written by hand rather than with h11 after measuring both
(docs/benchmarks.rst, "Libraries against the hand-written code").
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from ..server.wsgi import header_tokens
from .errors import BadResponse

__all__ = [
    "HOP_BY_HOP",
    "BadResponse",
    "ChunkedError",
    "ChunkedDecoder",
    "ResponseHead",
    "ResponseFraming",
    "is_token",
    "valid_header_value",
    "request_framing_error",
    "RequestRefused",
    "request_line_error",
    "read_request_fields",
    "parse_request_header_line",
    "encode_request_head",
    "parse_response_head",
    "response_framing",
    "find_head_end",
]

#: Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# ------------------------------------------------------------------ grammar

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9A-Fa-f]{1,16}")
# The parsers' loops call these bound methods directly (a call less per
# header line than is_token() and valid_header_value(), which say the same).
_token_match = _TOKEN.fullmatch
_bad_value_search = _BAD_HEADER_VALUE.search

#: Header names already found to be tokens: the same few dozen names come in
#: every head, and a set lookup costs a tenth of the regex. Bounded; adding
#: to a set is atomic under the GIL.
_TOKEN_NAMES: Set[str] = set()
_TOKEN_NAMES_MAX = 1024


def _name_is_token(name: str) -> bool:
    """:func:`is_token` for a header name, remembering the names that passed."""
    if _token_match(name) is None:
        return False
    if len(_TOKEN_NAMES) < _TOKEN_NAMES_MAX:
        _TOKEN_NAMES.add(name)
    return True


def is_token(text: str) -> bool:
    """Whether ``text`` is an RFC 9110 token (a method, a header name)."""
    return _TOKEN.fullmatch(text) is not None


def valid_header_value(value: str) -> bool:
    """Whether a header value (its line ending removed) holds no CR, LF or NUL."""
    return _BAD_HEADER_VALUE.search(value) is None


# ----------------------------------------------------------------- requests

#: Limits of a request head, as http.client's: bytes per header line, header lines.
MAX_HEADER_LINE = 65536
MAX_REQUEST_HEADERS = 100
#: Request-line versions served; another ``HTTP/x.y`` is answered with 505.
SUPPORTED_VERSIONS = ("HTTP/1.1", "HTTP/1.0")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
#: Methods that get ``Content-Length: 0`` when sent without a body (as http.client).
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})


class RequestRefused(ValueError):
    """A request head the front end answers with an error: ``status``,
    ``reason`` and an optional ``explain`` text (``send_error``'s)."""

    def __init__(self, status: int, reason: str, explain: Optional[str] = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.explain = explain


def request_line_error(raw_line: bytes, version: str) -> Optional[Tuple[int, str]]:
    """``(status, reason)`` to refuse a request line (``raw_line`` as read,
    with its ending; ``version`` its third word) with, or ``None``: only
    HTTP/1.1 and HTTP/1.0 (505 for another ``HTTP/x.y``), and the line ends
    in CRLF."""
    if version not in SUPPORTED_VERSIONS:
        if _VERSION.fullmatch(version):
            return 505, "HTTP Version Not Supported"
        return 400, "Bad request version"
    if not raw_line.endswith(b"\r\n"):
        return 400, "Request line not ended by CRLF"
    return None


def read_request_fields(version: str, readline: Callable[[int], bytes]) -> List[Tuple[str, str]]:
    """The header fields of a request head, each line taken from the
    caller's ``readline(limit)`` up to the empty line (or the end); nothing
    else is read. Raises :class:`RequestRefused`: 431 for a line over
    :data:`MAX_HEADER_LINE` bytes or more than :data:`MAX_REQUEST_HEADERS`
    lines, 400 for a malformed line (:func:`parse_request_header_line`), and
    what :func:`request_framing_error` refuses."""
    fields: List[Tuple[str, str]] = []
    while True:
        line = readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise RequestRefused(431, "Line too long", "header line")
        if line in (b"\r\n", b""):
            break
        if len(fields) >= MAX_REQUEST_HEADERS:
            raise RequestRefused(431, "Too many headers", f"got more than {MAX_REQUEST_HEADERS} headers")
        field = parse_request_header_line(line)
        if field is None:
            raise RequestRefused(400, "Bad request header")
        fields.append(field)
    refused = request_framing_error(version, fields)
    if refused is not None:
        raise RequestRefused(*refused)
    return fields


def parse_request_header_line(line: bytes) -> Optional[Tuple[str, str]]:
    """``(name, value)`` of one request header line as read (with its line
    ending), or ``None`` if it is refused: no colon, a name that is not a
    token (whitespace before the colon, obsolete folding), a line not ended
    by CRLF, a CR or NUL in the value. The value is stripped of blanks."""
    name, colon, value = line.decode("iso-8859-1").partition(":")
    value = value[:-2] if value.endswith("\r\n") else "\r"  # a bare LF: refused below
    if not colon or (name not in _TOKEN_NAMES and not _name_is_token(name)) or _bad_value_search(value):
        return None
    return name, value.strip(" \t")


def request_framing_error(version: str, fields: Sequence[Tuple[str, str]]) -> Optional[Tuple[int, str]]:
    """``(status, reason)`` to refuse a request whose header ``fields`` frame
    its body ambiguously or unsupportedly, or ``None`` if it may be served: a
    ``Content-Length`` that is not one plain decimal number (``+5``, ``1_0``,
    ``0x5``, ``5, 6``, two different values), a ``Transfer-Encoding`` beside a
    ``Content-Length`` or in an HTTP/1.0 request, or any transfer coding
    other than a single ``chunked``."""
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


def encode_request_head(method: str, path: str, headers: Mapping[str, str], has_body: bool,
                        chunked: bool) -> bytes:
    """The head of a request to send: ``headers`` in order, then
    ``Accept-Encoding: identity`` unless given (as http.client: no compressed
    answer the client did not ask for), then the framing (``Transfer-Encoding:
    chunked``, or ``Content-Length: 0`` for a bodyless POST, PUT or PATCH).
    Raises ``ValueError`` for a method, target or header value that cannot
    be sent."""
    if not is_token(method):
        raise ValueError(f"invalid method {method!r}")
    if not path.isascii() or _BAD_TARGET.search(path):
        raise ValueError(f"invalid characters in the request target {path!r}")
    parts = [f"{method} {path} HTTP/1.1\r\n"]
    send_length = method in _BODY_EXPECTED and not has_body
    send_encoding = True
    for name, value in headers.items():
        if _bad_value_search(value):
            raise ValueError(f"invalid value of header {name}")
        lowered = name.lower()
        if lowered == "content-length":
            send_length = False
        elif lowered == "accept-encoding":
            send_encoding = False
        parts.append(f"{name}: {value}\r\n")
    if send_encoding:
        parts.append("Accept-Encoding: identity\r\n")
    if chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    elif send_length:
        parts.append("Content-Length: 0\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


# ---------------------------------------------------------------- responses

#: A response head longer than this is refused (http.client allows 100 lines
#: of 64 KiB; real heads are a few hundred bytes).
MAX_RESPONSE_HEAD = 64 * 1024
#: Header lines a response head may have (as http.client).
MAX_RESPONSE_HEADERS = 100
_VERSIONS = {"HTTP/1.1": 11, "HTTP/1.0": 10}


def find_head_end(buffer: bytearray, searched: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` of the empty line ending a response head in
    ``buffer`` (CRLF or LF line ends), or ``None`` yet; ``searched`` is how
    much of the buffer an earlier call already looked at."""
    # bytearray.find (memchr) for each LF, not a regex: a regex starting with
    # an optional CR tries every position of the body that follows the head.
    start = position = max(0, searched - 3)
    size = len(buffer)
    while True:
        line_end = buffer.find(b"\n", position)
        if line_end < 0:
            return None
        after = line_end + 1
        if after < size and buffer[after] == 10:  # LF LF
            end = after + 1
        elif after + 1 < size and buffer[after] == 13 and buffer[after + 1] == 10:  # LF CR LF
            end = after + 2
        else:
            position = after
            continue
        begin = line_end - 1 if line_end > start and buffer[line_end - 1] == 13 else line_end
        return begin, end


class ResponseHead:
    """A parsed response head: ``status``, ``reason``, ``version`` (10 or 11)
    and ``headers`` as received (name case kept, order kept)."""

    __slots__ = ("version", "status", "reason", "headers")

    def __init__(self, version: int, status: int, reason: str, headers: List[Tuple[str, str]]) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head (status line and header lines, without the empty
    line ending it; lines end in CRLF or LF). Obsolete line folding is
    replaced by a space (RFC 9112 §5.2). Raises :class:`BadResponse`."""
    lines = head.decode("latin-1").split("\n")
    status_line = lines[0].rstrip("\r")
    version_text, _, rest = status_line.partition(" ")
    version = _VERSIONS.get(version_text)
    if version is None:
        raise BadResponse(f"invalid status line from the target: {status_line[:100]!r}")
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isdigit() or code[0] == "0":
        raise BadResponse(f"invalid status line from the target: {status_line[:100]!r}")
    if len(lines) > MAX_RESPONSE_HEADERS + 1:
        raise BadResponse(f"more than {MAX_RESPONSE_HEADERS} response headers")
    headers: List[Tuple[str, str]] = []
    for line in itertools.islice(lines, 1, None):
        if line.endswith("\r"):
            line = line[:-1]
        if line[:1] in (" ", "\t"):
            if not headers:
                raise BadResponse("response head starts with a continuation line")
            name, value = headers[-1]
            folded = line.strip(" \t")
            headers[-1] = (name, f"{value} {folded}" if value else folded)
            continue
        name, colon, value = line.partition(":")
        if not colon or (name not in _TOKEN_NAMES and not _name_is_token(name)):
            raise BadResponse(f"invalid response header line {line[:100]!r}")
        if "\r" in value or "\x00" in value:  # the header value check; no LF after the split
            raise BadResponse(f"invalid value of response header {name}")
        headers.append((name, value.strip(" \t")))
    return ResponseHead(version, int(code), reason.strip(), headers)


class ResponseFraming(NamedTuple):
    """How a response body is framed: ``length`` bytes (``None``: until the
    connection closes, or chunked), ``chunked``, and ``will_close`` (the
    connection cannot carry another request)."""

    length: Optional[int]
    chunked: bool
    will_close: bool


def response_framing(head: ResponseHead, method: str) -> ResponseFraming:
    """The framing of the body answering ``method`` with ``head`` (RFC 9112
    §6.3). Raises :class:`BadResponse` for a framing that cannot be trusted:
    ``Transfer-Encoding`` in an HTTP/1.0 answer, a ``Content-Length`` that is
    not one plain decimal number (identical repeats allowed). A body framed
    both ways is read as chunked and its connection never reused."""
    tokens: List[str] = []
    lengths: List[str] = []
    codings: List[str] = []
    for name, value in head.headers:
        lowered = name.lower()
        if lowered == "connection":
            tokens.extend(header_tokens(value))
        elif lowered == "content-length":
            lengths.extend(item.strip() for item in value.split(","))
        elif lowered == "transfer-encoding":
            codings.extend(header_tokens(value))
    if head.version == 10:
        will_close = "keep-alive" not in tokens
    else:
        will_close = "close" in tokens
    status = head.status
    if method == "HEAD" or status < 200 or status in (204, 304):
        return ResponseFraming(0, False, will_close or status == 101)
    if codings:
        if head.version == 10:  # RFC 9112 §6.1: the framing is faulty
            raise BadResponse("Transfer-Encoding in an HTTP/1.0 response")
        if lengths:
            will_close = True  # RFC 9112 §6.3: never reuse such a connection
        if codings[-1] == "chunked":
            return ResponseFraming(None, True, will_close)
        return ResponseFraming(None, False, True)  # the body ends where the connection does
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or not lengths[0].isascii():
            raise BadResponse(f"invalid Content-Length from the target: {', '.join(lengths)[:100]!r}")
        return ResponseFraming(int(lengths[0]), False, will_close)
    return ResponseFraming(None, False, True)  # the body ends where the connection does


# ------------------------------------------------------------ chunked coding

#: Longest chunk-size or trailer line accepted in a chunked body.
MAX_CHUNK_LINE = 4096
#: Trailer lines a strict (request) body may have.
MAX_TRAILER_LINES = 100
#: chunk-size [ chunk-ext ] CRLF (RFC 9112 §7.1); extensions are ignored.
_STRICT_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r\n")


class ChunkedError(ValueError):
    """A chunked body breaks RFC 9112 §7.1 (as the decoder's mode reads it)."""


class ChunkedDecoder:
    """Where the reader of one chunked body is (RFC 9112 §7.1), sans-IO.

    The reader looks at :attr:`chunk_left`: while it is positive, that many
    bytes of chunk data come next (report each piece read with
    :meth:`consumed`); when it is 0 and :attr:`done` is false, the next line
    comes next (a size line, the line ending a chunk, a trailer line): hand
    it to :meth:`feed_line` with its line ending. In ``strict`` mode the line
    ending a chunk is exactly the two bytes CRLF, so a reader may read just
    two bytes there.

    ``strict`` (requests): lines end in CRLF, the size line is hex digits
    and an optional extension, at most :data:`MAX_TRAILER_LINES` trailer
    lines. Otherwise (responses): LF line ends and blanks before an
    extension are accepted, the trailer is unbounded (its lines are bounded
    by the reader). Malformed input raises :class:`ChunkedError`.
    """

    __slots__ = ("strict", "chunk_left", "done", "_chunk_ended", "_trailer_lines")

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.chunk_left = 0  # bytes of data left in the current chunk
        self.done = False  # the last chunk and the trailer were read
        self._chunk_ended = False  # the data of a chunk was read: its line ending is due
        self._trailer_lines = -1  # trailer lines read; -1: not in the trailer

    def consumed(self, size: int) -> None:
        """``size`` bytes of the current chunk's data were read."""
        self.chunk_left -= size
        if self.chunk_left == 0:
            self._chunk_ended = True

    def feed_line(self, line: bytes) -> None:
        """Take the next line (with its ending); raises :class:`ChunkedError`."""
        strict = self.strict
        if strict:
            if self._chunk_ended:
                if line != b"\r\n":
                    raise ChunkedError("no CRLF after a chunk")
                self._chunk_ended = False
                return
            if not line.endswith(b"\r\n"):
                raise ChunkedError("invalid chunked body: line too long, bare LF or end of stream")
            empty = line == b"\r\n"
        else:
            line = line[:-1].rstrip(b"\r") if line.endswith(b"\n") else line.rstrip(b"\r")
            if self._chunk_ended:
                if line:
                    raise ChunkedError("invalid chunked body from the target (no CRLF after a chunk)")
                self._chunk_ended = False
                return
            empty = not line
        if self._trailer_lines >= 0:  # trailer fields: dropped
            if empty:
                self.done = True
                return
            self._trailer_lines += 1
            if strict and self._trailer_lines > MAX_TRAILER_LINES:
                raise ChunkedError("too many trailer lines")
            return
        if strict:
            match = _STRICT_CHUNK_LINE.fullmatch(line)
            if match is None:
                raise ChunkedError("invalid chunk size line")
            size = int(match.group(1), 16)
        else:
            size_text = line.decode("latin-1").partition(";")[0].rstrip(" \t")
            if not _HEX.fullmatch(size_text):
                raise ChunkedError(f"invalid chunk size from the target: {size_text[:40]!r}")
            size = int(size_text, 16)
        if size == 0:
            self._trailer_lines = 0
        else:
            self.chunk_left = size
