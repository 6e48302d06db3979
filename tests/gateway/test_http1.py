"""The gateway's HTTP/1.1 rules (:mod:`remotedialer.gateway.http1`): first
sans-IO, then as the front end and the upstream client apply them over real
sockets (request smuggling in both directions)."""

from __future__ import annotations

import io
import itertools
import re
from typing import Any, Dict, Optional, Tuple

import pytest

from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from remotedialer.gateway.http1 import (
    HOP_BY_HOP,
    MAX_TRAILER_LINES,
    BadResponse,
    ChunkedDecoder,
    ChunkedError,
    RequestRefused,
    encode_request_head,
    find_head_end,
    is_token,
    parse_request_header_line,
    parse_response_head,
    read_request_fields,
    request_line_error,
    response_framing,
    valid_header_value,
)
from testkit.gateway import RawTarget, raw_exchange, read_to_close

# ---------------------------------------------------------------- grammar


def test_tokens_and_header_values() -> None:
    assert is_token("X-Custom_1!#$%&'*+.^`|~") and is_token("GET")
    assert not any(is_token(text) for text in ("", "Bad Name", "a:b", "x\x00", "\u00e9", "a\t"))
    assert valid_header_value(" any \t text \u00e9 ")
    assert not any(valid_header_value(value) for value in ("a\rb", "a\nb", "a\x00b"))
    assert {"connection", "transfer-encoding", "upgrade", "te"} <= HOP_BY_HOP
    assert "content-length" not in HOP_BY_HOP


# --------------------------------------------------------------- requests


# Malformed request heads and requests whose framing two parsers could read
# differently. Each is checked twice: by the rules alone (sans-IO, below)
# and over a socket by the front end (at the end of this module).
MALFORMED_HEAD_LINES = [
    (b"Bad Name: 1\r\n", b"400"),
    (b"X-A: 1\r\n folded\r\n", b"400"),
    (b"no colon\r\n", b"400"),
    (b": empty name\r\n", b"400"),
    (b"X: y\r\n" * 101, b"431"),
    (b"X: " + b"y" * 70_000 + b"\r\n", b"431"),
]

SMUGGLING_REQUESTS = [
    # Content-Length and Transfer-Encoding together (CL.TE and TE.CL desync)
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
     b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
     b"400"),
    # duplicate or malformed Content-Length
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: +2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 1_0\r\n\r\n0123456789", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 0x2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", b"400"),
    # transfer codings: chunked must be the only one, and not in HTTP/1.0
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: , chunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", b"501"),
    (b"POST /body HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    # obs-fold, bare LF, bare CR, NUL, whitespace before the colon
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\r\n Content-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\nHost: h\r\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"GET /a HTTP/1.1\r\nHost: h\r\n\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\rContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nX: a\x00\r\n\r\n", b"400"),
    (b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length : 2\r\n\r\nab", b"400"),
]

OTHER_REQUEST_LINES = [
    (b"GET /env HTTP/1.01\r\nHost: h\r\n\r\n", b"400"),
    (b"GET /env HTTP/1.2\r\nHost: h\r\n\r\n", b"505"),
    (b"GET /env HTTP/2.0\r\nHost: h\r\n\r\n", b"505"),
]


def _refusal(request: bytes) -> Optional[bytes]:
    """The status the rules alone refuse ``request`` (a request line and
    head) with, read as the front end reads it; ``None`` if they accept it."""
    reader = io.BytesIO(request)
    line = reader.readline(65537)
    version = line.decode("iso-8859-1").split()[2]
    refused = request_line_error(line, version)
    if refused is not None:
        return b"%d" % refused[0]
    try:
        read_request_fields(version, reader.readline)
    except RequestRefused as exc:
        return b"%d" % exc.status
    return None


@pytest.mark.parametrize("request_, status", [
    *SMUGGLING_REQUESTS,
    *OTHER_REQUEST_LINES,
    *((b"GET /a HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n", status)
      for lines, status in MALFORMED_HEAD_LINES),
])
def test_request_rules_refuse(request_: bytes, status: bytes) -> None:
    assert _refusal(request_) == status


def test_request_rules_accept() -> None:
    head = b"X-A:  one two \r\nx-b:\xe9\r\nX-Empty:\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nab"
    assert read_request_fields("HTTP/1.1", io.BytesIO(head).readline) == [
        ("X-A", "one two"), ("x-b", "\u00e9"), ("X-Empty", ""),
        ("Content-Length", "2"), ("content-length", "2"),
    ]
    for te in (b"chunked", b"Chunked"):
        assert _refusal(b"POST / HTTP/1.1\r\nTransfer-Encoding: " + te + b"\r\n\r\n") is None
    assert _refusal(b"GET / HTTP/1.0\r\nContent-Length: 5\r\n\r\n") is None
    assert _refusal(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n") is None
    assert _refusal(b"GET / HTTP/1.1\r\nX: a\n\r\n") == b"400"  # bare LF
    assert parse_request_header_line(b"X: a\n") is None
    assert parse_request_header_line(b"X-A:  one two \r\n") == ("X-A", "one two")


def test_encode_request_head() -> None:
    assert encode_request_head("GET", "/a?b=1", {"Host": "t:1", "X-A": "1"}, False, False) == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: t:1\r\nX-A: 1\r\nAccept-Encoding: identity\r\n\r\n")
    assert encode_request_head("POST", "/", {"Host": "t", "Accept-Encoding": "gzip"}, False, False) == (
        b"POST / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\nContent-Length: 0\r\n\r\n")
    assert encode_request_head("POST", "/", {"Host": "t"}, True, True) == (
        b"POST / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert b"Content-Length" not in encode_request_head("DELETE", "/", {}, False, False)


#: Requests the upstream client refuses to send: ``(method, path, headers)``.
UNSENDABLE = [("GE T", "/", {}), ("GET", "/a b", {}), ("GET", "/\x7f", {}), ("GET", "/\u00e9", {}),
              ("GET", "/", {"X": "a\r\nInjected: 1"}), ("GET", "/", {"X": "a\x00"})]


@pytest.mark.parametrize("method, path, headers", UNSENDABLE)
def test_encode_request_head_refuses_what_cannot_be_sent(method: str, path: str,
                                                         headers: Dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_request_head(method, path, headers, False, False)


# ------------------------------------------------------------ chunked coding


def _decode(data: bytes, strict: bool) -> bytes:
    """Drive a :class:`ChunkedDecoder` over ``data`` as the readers do;
    ``ChunkedError`` for a malformed body, ``EOFError`` if it is cut short."""
    decoder = ChunkedDecoder(strict)
    body = b""
    position = 0
    while not decoder.done:
        if decoder.chunk_left:
            piece = data[position : position + decoder.chunk_left]
            if not piece:
                raise EOFError
            body += piece
            position += len(piece)
            decoder.consumed(len(piece))
            if strict and decoder.chunk_left == 0:
                decoder.feed_line(data[position : position + 2])
                position += 2
            continue
        end = data.find(b"\n", position)
        if end < 0:
            if strict:  # a strict reader hands in what it got; the decoder refuses it
                decoder.feed_line(data[position:])
            raise EOFError
        decoder.feed_line(data[position : end + 1])
        position = end + 1
    assert position == len(data), "read past the body"
    return body


@pytest.mark.parametrize("strict", [True, False])
def test_chunked_bodies_both_directions_read(strict: bool) -> None:
    assert _decode(b"2;name=value\r\nab\r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\n", strict) == (
        b"ab0123456789")
    assert _decode(b"0\r\n\r\n", strict) == b""
    assert _decode(b"3\t;x\r\nabc\r\n0\r\n\r\n", strict) == b"abc"
    assert _decode(b"0\r\n" + b"T: x\r\n" * MAX_TRAILER_LINES + b"\r\n", strict) == b""


#: Chunked bodies both directions refuse.
CHUNKED_REFUSED = [
    b"0x2\r\nab\r\n0\r\n\r\n",  # hex prefix (werkzeug's dechunker takes it)
    b"+2\r\nab\r\n0\r\n\r\n",
    b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    b"-1\r\n",
    b" 2\r\nab\r\n0\r\n\r\n",
    b"\r\nab\r\n0\r\n\r\n",  # no size
    b"2 2\r\nok\r\n0\r\n\r\n",
    b"0" * 17 + b"2\r\nok\r\n0\r\n\r\n",  # more than 16 digits
    b"zz\r\nabc\r\n0\r\n\r\n",
    b"2\r\nabX\r\n0\r\n\r\n",  # no CRLF after the data
]

#: Chunked bodies only a request's strict reading refuses.
CHUNKED_REFUSED_IN_REQUESTS = [
    b"2\nab\r\n0\r\n\r\n",  # bare LF after the size
    b"2\r\nab\r0\r\n\r\n",  # bare CR after the data
    b"2\r\nab\n0\r\n\r\n",  # bare LF after the data
    b"2 \r\nab\r\n0\r\n\r\n",  # a blank after the size without an extension
    b"0\r\n" + b"T: x\r\n" * (MAX_TRAILER_LINES + 1) + b"\r\n",  # endless trailer
    b"0\r\nT: x\n\r\n",
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("body", CHUNKED_REFUSED)
def test_chunked_bodies_both_directions_refuse(strict: bool, body: bytes) -> None:
    with pytest.raises(ChunkedError):
        _decode(body, strict)


@pytest.mark.parametrize("body", CHUNKED_REFUSED_IN_REQUESTS)
def test_chunked_requests_are_read_strictly(body: bytes) -> None:
    with pytest.raises(ChunkedError):
        _decode(body, strict=True)


def test_chunked_responses_are_read_as_a_user_agent_reads_them() -> None:
    assert _decode(b"2\nab\n0\n\n", strict=False) == b"ab"
    assert _decode(b"2 ;x=y\r\nok\r\n0\r\n\r\n", strict=False) == b"ok"
    assert _decode(b"2 \r\nok\r\n0\r\n" + b"T: x\r\n" * 1000 + b"\r\n", strict=False) == b"ok"


def test_chunked_messages_name_the_direction() -> None:
    with pytest.raises(ChunkedError, match="invalid chunk size line"):
        _decode(b"zz\r\n", strict=True)
    with pytest.raises(ChunkedError, match="from the target: 'zz'"):
        _decode(b"zz\r\n", strict=False)


# ---------------------------------------------------------------- responses


def test_find_head_end_matches_the_regex_it_replaced() -> None:
    # The empty line ending a head (CRLF or LF line ends) is found with
    # bytearray.find; the oracle is the regex used before, on every string
    # of up to 6 pieces of CR, LF, CRLF and a letter, from every offset.
    oracle = re.compile(rb"\r?\n\r?\n")
    checked = 0
    for size in range(7):
        for pieces in itertools.product((b"\r", b"\n", b"\r\n", b"a"), repeat=size):
            buffer = bytearray(b"".join(pieces))
            for searched in range(len(buffer) + 2):
                match = oracle.search(buffer, max(0, searched - 3))
                expected = None if match is None else (match.start(), match.end())
                assert find_head_end(buffer, searched) == expected, (bytes(buffer), searched)
                checked += 1
    assert checked > 30_000
    body = bytearray(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n" + b"x\n" * 500)
    assert find_head_end(body, 0) == (21, 25)


def test_parse_response_head() -> None:
    head = parse_response_head(b"HTTP/1.0 404 Not  Found\nX-A:  1 \r\nX-Fold: a\r\n  b\r\nX-Empty:")
    assert (head.version, head.status, head.reason) == (10, 404, "Not  Found")
    assert head.headers == [("X-A", "1"), ("X-Fold", "a b"), ("X-Empty", "")]
    assert parse_response_head(b"HTTP/1.1 204").reason == ""


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 200 OK\r\nno colon here",
        b"HTTP/1.1 200 OK\r\nBad Name: x",
        b"HTTP/1.1 200 OK\r\n: x",
        b"HTTP/1.1 200 OK\r\n folded first",
        b"HTTP/1.1 200 OK\r\nX: a\rb",
        b"HTTP/1.1 200 OK" + b"\r\nX: y" * 101,
    ],
)
def test_parse_response_head_rejects(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_response_head(raw)


@pytest.mark.parametrize("head, method, framing", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10", "GET", (10, False, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2", "GET", (2, False, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7", "HEAD", (0, False, False)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 7", "GET", (0, False, False)),
    (b"HTTP/1.1 304 Not Modified", "GET", (0, False, False)),
    (b"HTTP/1.1 101 Switching Protocols", "GET", (0, False, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", "GET", (None, True, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", "GET", (None, True, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip", "GET", (None, False, True)),
    (b"HTTP/1.1 200 OK", "GET", (None, False, True)),
    (b"HTTP/1.1 200 OK\r\nConnection: x, Close\r\nContent-Length: 0", "GET", (0, False, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2", "GET", (2, False, True)),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2", "GET", (2, False, False)),
])
def test_response_framing(head: bytes, method: str, framing: Tuple[Any, bool, bool]) -> None:
    assert tuple(response_framing(parse_response_head(head), method)) == framing


#: Response header lines whose ``Content-Length`` cannot be trusted.
BAD_LENGTHS = [b"Content-Length: 1\r\nContent-Length: 2", b"Content-Length: 1, 2", b"Content-Length: -1",
               b"Content-Length: 1x", b"Content-Length: \xd9\xa1", b"Content-Length: +2"]


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\n" + lines for lines in BAD_LENGTHS])
def test_response_framing_refuses(head: bytes) -> None:
    with pytest.raises(BadResponse):
        response_framing(parse_response_head(head), "GET")
    with pytest.raises(BadResponse):  # Transfer-Encoding in an HTTP/1.0 answer
        response_framing(parse_response_head(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked"), "GET")


# ----------------------------------- the upstream client applies the rules


@pytest.mark.parametrize("method, path, headers", UNSENDABLE)
def test_upstream_request_refuses_what_cannot_be_sent(raw: RawTarget, method: str, path: str,
                                                      headers: Dict[str, str]) -> None:
    with pytest.raises(ValueError):
        raw.connection.request(method, path, headers, None, False)


@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\n", b"3\r\nabcX\r\n0\r\n\r\n", b"0x3\r\nabc\r\n0\r\n\r\n",
     b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n", b"5\r\nabc"],
)
def test_upstream_broken_chunked_body(raw: RawTarget, chunks: bytes) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks, close=True)
    with pytest.raises(BadResponse):
        raw.body()


@pytest.mark.parametrize("head", BAD_LENGTHS)
def test_upstream_invalid_content_length(raw: RawTarget, head: bytes) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n")
    with pytest.raises(BadResponse):
        raw.connection.getresponse("GET")


def test_upstream_same_content_length_twice_is_fine(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    assert raw.body()[1] == b"ok"
# ------------------------------------- request smuggling: how the client frames answers
# The forwarder reuses upstream connections, so a response it frames
# differently from the target would make the next request read the rest of
# this one (response queue poisoning). Each case: the answer's head and body
# bytes, then what must happen: "error" (refused, never reused), or the body
# read and whether the connection may be reused.
@pytest.mark.parametrize(
    "answer, outcome",
    [
        # Content-Length and Transfer-Encoding together: chunked wins, connection not reused
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
         (b"ok", False)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n0\r\n\r\n",
         (b"", False)),
        # Transfer-Encoding in an HTTP/1.0 answer: faulty framing
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "error"),
        # a coding other than chunked last: the body runs to the close
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc", (b"abc", False)),
        # duplicate Content-Length: only identical values pass
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk", "error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", "error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789", "error"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok", "error"),
        # whitespace before the colon, a CR or NUL inside a value
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "error"),
        (b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 2\r\n\r\nok", "error"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok", "error"),
        # obs-fold is unfolded (RFC 9112 5.2: a user agent replaces it with a space)
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok", (b"ok", True)),
        # a folded Transfer-Encoding still frames as chunked
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", (b"ok", True)),
        # bare LF line ends are accepted in answers (RFC 9112 2.2 allows a recipient to)
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", (b"ok", True)),
        # invalid chunk sizes
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n", "error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 2\r\nok\r\n0\r\n\r\n", "error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 17 + b"2\r\nok\r\n0\r\n\r\n",
         "error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nok\r\n0\r\n\r\n", "error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 2\r\nok\r\n0\r\n\r\n", "error"),
        # a chunk size followed by an extension and blanks before it is fine
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 ;x=y\r\nok\r\n0\r\n\r\n", (b"ok", True)),
        # more body than Content-Length announced: the rest is never read as the next answer
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n", (b"ok", False)),
    ],
)
def test_upstream_framing_against_smuggling(raw: RawTarget, answer: bytes, outcome: Any) -> None:
    raw.answer(answer, close=True)
    if outcome == "error":
        with pytest.raises(BadResponse):
            raw.body()
        return
    body, reusable = outcome
    response, received, _ = raw.body()
    assert received == body and response.complete
    assert (not response.will_close and raw.connection.idle_clean) == reusable


# ------------------------------------- the front end applies the rules
# Each request is followed on the same connection by a second one, GET
# /smuggled: a refused request must close the connection without answering
# it (bytes another parser could have read as part of the first request
# are never served as a request of their own).
_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize("lines, status", MALFORMED_HEAD_LINES)
def test_front_end_refuses_malformed_request_heads(keepalive_server: BoundedThreadedWSGIServer,
                                                   lines: bytes, status: bytes) -> None:
    answer = raw_exchange(keepalive_server.port, b"GET /a HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status)


def test_front_end_other_request_lines(keepalive_server: BoundedThreadedWSGIServer) -> None:
    assert raw_exchange(keepalive_server.port, b"GET /a B HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    for request, status in OTHER_REQUEST_LINES:
        assert raw_exchange(keepalive_server.port, request).startswith(b"HTTP/1.1 " + status)


@pytest.mark.parametrize("head, status", SMUGGLING_REQUESTS)
def test_front_end_refuses_ambiguous_framing(keepalive_server: BoundedThreadedWSGIServer, head: bytes,
                                             status: bytes) -> None:
    answer = read_to_close(keepalive_server.port, head + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert answer.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in answer


@pytest.mark.parametrize("chunks", CHUNKED_REFUSED + CHUNKED_REFUSED_IN_REQUESTS)
def test_front_end_refuses_invalid_chunked_bodies(keepalive_server: BoundedThreadedWSGIServer,
                                                  chunks: bytes) -> None:
    request = b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    answer = read_to_close(keepalive_server.port, request + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 500")
    assert answer.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in answer


def test_front_end_reads_valid_framing(keepalive_server: BoundedThreadedWSGIServer) -> None:
    """What is allowed: a chunked body with extensions and a trailer (the
    connection then closes), the same Content-Length twice (kept alive)."""
    chunked = (b"POST /body HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
               b"2;name=value\r\nab\r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\n")
    answer = read_to_close(keepalive_server.port, chunked + _SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nab0123456789")
    twice = b"POST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"
    last = _SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer = read_to_close(keepalive_server.port, twice + last)
    assert answer.count(b"HTTP/1.1 200") == 2 and b"\r\n\r\nab" in answer
    assert answer.endswith(b"GET /smuggled")
