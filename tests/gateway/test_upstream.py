"""The upstream HTTP/1.1 client (:mod:`remotedialer.gateway.upstream`) over a
socket pair, the test playing the target (its framing rules against
smuggling: tests/gateway/test_http1.py)."""

from __future__ import annotations

import io
import socket
import threading

import pytest

from remotedialer.gateway.upstream import BadResponse
from testkit.gateway import RawTarget


def test_upstream_request_head(raw: RawTarget) -> None:
    raw.connection.request("GET", "/a?b=1", {"Host": "t:1", "X-A": "1"}, None, False)
    expected = b"GET /a?b=1 HTTP/1.1\r\nHost: t:1\r\nX-A: 1\r\nAccept-Encoding: identity\r\n\r\n"
    assert raw.received(len(expected)) == expected
    raw.connection.request("POST", "/", {"Host": "t", "Accept-Encoding": "gzip"}, None, False)
    expected = b"POST / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\nContent-Length: 0\r\n\r\n"
    assert raw.received(len(expected)) == expected


def test_upstream_request_bodies(raw: RawTarget) -> None:
    raw.connection.request("PUT", "/", {"Host": "t", "Content-Length": "5"}, io.BytesIO(b"hello"), False)
    expected = b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nAccept-Encoding: identity\r\n\r\nhello"
    assert raw.received(len(expected)) == expected
    raw.connection.request("POST", "/", {"Host": "t"}, iter([b"ab", b"", b"cde"]), True)
    expected = (b"POST / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"
                b"\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert raw.received(len(expected)) == expected


def test_upstream_content_length_body_and_reuse(raw: RawTarget) -> None:
    for _ in range(2):
        raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX: 1\r\n\r\n0123456789")
        response, body, _ = raw.body()
        assert (response.status, response.reason, body) == (200, "OK", b"0123456789")
        assert response.complete and not response.will_close and raw.connection.idle_clean


def test_upstream_body_is_read_in_pieces_and_not_past_its_end(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabcdefEXTRA")
    response, body, parts = raw.body(limit=4)
    assert (body, parts) == (b"abcdef", [b"abcd", b"ef"])
    assert not raw.connection.idle_clean  # bytes nobody asked for: never reused


def test_upstream_chunked_body(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n")
    response, body, _ = raw.body()
    assert body == b"abc0123456789" and response.complete and not response.will_close
    assert raw.connection.idle_clean


def test_upstream_close_delimited_and_http10(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", close=True)
    response, body, _ = raw.body()
    assert body == b"until the end" and response.will_close and response.complete


def test_upstream_http10_keep_alive(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok")
    response, body, _ = raw.body()
    assert body == b"ok" and not response.will_close


def test_upstream_bodyless_answers_and_interim_ones(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
               b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n")
    response, body, _ = raw.body()
    assert (response.status, body) == (204, b"")
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n")
    response, body, _ = raw.body("HEAD")
    assert (response.status, body, response.will_close) == (200, b"", False)
    assert raw.connection.idle_clean


def test_upstream_connection_close_is_honoured(raw: RawTarget) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nConnection: x, Close\r\nContent-Length: 0\r\n\r\n")
    response, body, _ = raw.body()
    assert response.will_close and response.complete


def test_upstream_closed_before_answering_or_too_early(raw: RawTarget) -> None:
    raw.answer(b"", close=True)
    with pytest.raises(ConnectionResetError):
        raw.connection.getresponse("GET")
    other = RawTarget()
    try:
        other.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", close=True)
        with pytest.raises(BadResponse):
            other.body()
    finally:
        other.close()
    third = RawTarget()
    try:
        third.answer(b"HTTP/1.1 200 OK\r\nContent", close=True)
        with pytest.raises(BadResponse):
            third.connection.getresponse("GET")
    finally:
        third.close()


def test_upstream_head_size_is_bounded(raw: RawTarget) -> None:
    threading.Thread(target=raw.answer, args=(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000,),
                     daemon=True).start()
    with pytest.raises(BadResponse):
        raw.connection.getresponse("GET")


def test_upstream_head_split_across_reads(raw: RawTarget) -> None:
    def trickle() -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz":
            raw.far.sendall(bytes([byte]))

    threading.Thread(target=trickle, daemon=True).start()
    assert raw.body()[1] == b"z"


def test_upstream_timeout_is_the_sockets(raw: RawTarget) -> None:
    raw.connection.sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        raw.connection.getresponse("GET")
