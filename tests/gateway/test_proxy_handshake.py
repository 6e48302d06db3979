"""The proxy handshakes, sans-IO: SOCKS5 (RFC 1928/1929) and HTTP CONNECT /
absolute-form, fed byte by byte and whole, with the limits."""

from __future__ import annotations

import base64
import ipaddress
import struct
from typing import List

import pytest

from remotedialer.gateway.proxy_handshake import (
    CheckCredentials,
    Close,
    ProxyEvent,
    ProxyHandshake,
    ProxyKind,
    ProxyRequest,
    Refusal,
    Send,
)


def feed(handshake: ProxyHandshake, data: bytes, bytewise: bool = False) -> List[ProxyEvent]:
    if not bytewise:
        return handshake.receive_data(data)
    events: List[ProxyEvent] = []
    for i in range(len(data)):
        events += handshake.receive_data(data[i:i + 1])
    return events


def socks_auth(user: bytes, password: bytes) -> bytes:
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


def socks_connect(atyp: int, address: bytes, port: int, command: int = 1) -> bytes:
    return bytes((5, command, 0, atyp)) + address + struct.pack(">H", port)


def basic(user: str, password: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode())


# ----------------------------------------------------------------- SOCKS5
@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("atyp,address,host", [
    (1, bytes((127, 0, 0, 1)), "127.0.0.1"),
    (4, ipaddress.IPv6Address("::1").packed, "::1"),
    (3, bytes((9,)) + b"localhost", "localhost"),
])
def test_socks5_connect(bytewise: bool, atyp: int, address: bytes, host: str) -> None:
    hs = ProxyHandshake()
    assert feed(hs, b"\x05\x02\x00\x02", bytewise) == [Send(b"\x05\x02")]
    assert feed(hs, socks_auth(b"agent-1", b"s3cret"), bytewise) == [CheckCredentials("agent-1", "s3cret")]
    assert not hs.waiting_for_client
    assert hs.credentials_checked(True) == b"\x01\x00"
    events = feed(hs, socks_connect(atyp, address, 8080) + b"early", bytewise)
    assert events == [ProxyRequest(ProxyKind.SOCKS5, host, 8080, "agent-1", "s3cret")]
    assert hs.take_rest() == b"early"
    assert hs.accept() == b"\x05\x00\x00\x01" + bytes(6)
    assert hs.done


def test_socks5_address_of_ipv6_is_bracketed() -> None:
    request = ProxyRequest(ProxyKind.SOCKS5, "::1", 22, "k", "p")
    assert request.address == "[::1]:22"


def test_socks5_without_username_method_is_refused() -> None:
    hs = ProxyHandshake()
    [event] = feed(hs, b"\x05\x01\x00")
    assert isinstance(event, Close) and event.data == b"\x05\xff"
    assert hs.done


def test_socks5_refused_credentials() -> None:
    hs = ProxyHandshake()
    feed(hs, b"\x05\x01\x02" + socks_auth(b"k", b"wrong"))
    assert hs.credentials_checked(False) == b"\x01\x01"
    assert hs.done


@pytest.mark.parametrize("refusal,code", [
    (Refusal.NOT_ALLOWED, 0x02), (Refusal.NO_AGENT, 0x04), (Refusal.REFUSED, 0x05),
    (Refusal.TIMED_OUT, 0x04), (Refusal.FAILURE, 0x01),
])
def test_socks5_refusal_codes(refusal: Refusal, code: int) -> None:
    hs = ProxyHandshake()
    feed(hs, b"\x05\x01\x02" + socks_auth(b"k", b"p"))
    hs.credentials_checked(True)
    feed(hs, socks_connect(1, bytes(4), 80))
    assert hs.refuse(refusal) == bytes((5, code, 0, 1)) + bytes(6)


def test_socks5_bind_and_udp_are_not_supported() -> None:
    for command in (2, 3):
        hs = ProxyHandshake()
        feed(hs, b"\x05\x01\x02" + socks_auth(b"k", b"p"))
        hs.credentials_checked(True)
        [event] = feed(hs, socks_connect(1, bytes(4), 80, command))
        assert isinstance(event, Close) and event.data[:2] == b"\x05\x07"


@pytest.mark.parametrize("request_bytes,code", [
    (bytes((5, 1, 0, 9)) + bytes(6), 0x08),  # unknown address type
    (socks_connect(3, bytes((8,)) + b"bad host", 80), 0x08),
    (socks_connect(1, bytes(4), 0), 0x01),  # port 0
])
def test_socks5_bad_requests(request_bytes: bytes, code: int) -> None:
    hs = ProxyHandshake()
    feed(hs, b"\x05\x01\x02" + socks_auth(b"k", b"p"))
    hs.credentials_checked(True)
    [event] = feed(hs, request_bytes)
    assert isinstance(event, Close) and event.data[1] == code


@pytest.mark.parametrize("data", [
    b"\x05\x00",  # no method offered
    b"\x05\x01\x02\x02",  # bad auth sub-negotiation version
    b"\x16\x03\x01",  # a TLS ClientHello
    b"\x00",
])
def test_bad_starts_are_cut(data: bytes) -> None:
    hs = ProxyHandshake()
    events = feed(hs, data)
    assert events and isinstance(events[-1], Close)
    assert hs.done
    assert hs.receive_data(b"more") == []


def test_socks4_is_answered_rejected() -> None:
    [event] = ProxyHandshake().receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00")
    assert isinstance(event, Close) and event.data[:2] == b"\x00\x5b"


def test_socks5_bad_request_version_is_cut() -> None:
    hs = ProxyHandshake()
    feed(hs, b"\x05\x01\x02" + socks_auth(b"k", b"p"))
    hs.credentials_checked(True)
    [event] = feed(hs, b"\x04\x01\x00\x01" + bytes(6))
    assert isinstance(event, Close) and event.data == b""


def test_answers_out_of_turn_are_errors() -> None:
    hs = ProxyHandshake()
    with pytest.raises(RuntimeError):
        hs.accept()
    with pytest.raises(RuntimeError):
        hs.credentials_checked(True)


# ------------------------------------------------------------------- HTTP
@pytest.mark.parametrize("bytewise", [False, True])
def test_http_connect(bytewise: bool) -> None:
    hs = ProxyHandshake()
    head = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n" + basic("agent", "pw:x") + b"\r\n\r\n"
    events = feed(hs, head + b"\x16\x03", bytewise)
    assert events == [ProxyRequest(ProxyKind.CONNECT, "127.0.0.1", 443, "agent", "pw:x")]
    assert hs.take_rest() == b"\x16\x03"
    assert hs.accept() == b"HTTP/1.1 200 Connection established\r\n\r\n"


def test_http_connect_ipv6_and_no_credentials() -> None:
    [event] = ProxyHandshake().receive_data(b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n")
    assert event == ProxyRequest(ProxyKind.CONNECT, "::1", 22, None, None)


@pytest.mark.parametrize("target", [b"127.0.0.1", b"[::1", b"host:0", b"host:99999", b"a b:1", b"host:+1"])
def test_http_connect_bad_targets(target: bytes) -> None:
    [event] = ProxyHandshake().receive_data(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
    assert isinstance(event, Close) and event.data.startswith(b"HTTP/1.1 400 ")


def test_http_refusals() -> None:
    hs = ProxyHandshake()
    hs.receive_data(b"CONNECT h:1 HTTP/1.1\r\n\r\n")
    answer = hs.refuse(Refusal.AUTH_REQUIRED, "who are you")
    assert answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="remotedialer"\r\n' in answer
    assert answer.endswith(b"\r\n\r\nwho are you\n")
    for refusal, status in ((Refusal.NOT_ALLOWED, b"403"), (Refusal.NO_AGENT, b"502"),
                            (Refusal.REFUSED, b"502"), (Refusal.TIMED_OUT, b"504")):
        hs = ProxyHandshake()
        hs.receive_data(b"CONNECT h:1 HTTP/1.1\r\n\r\n")
        answer = hs.refuse(refusal)
        assert answer.startswith(b"HTTP/1.1 " + status + b" ")
        assert b"Proxy-Authenticate" not in answer and b"Connection: close\r\n" in answer


def test_absolute_form_is_rewritten() -> None:
    hs = ProxyHandshake()
    head = (b"POST http://127.0.0.1:8080/a/b?c=d HTTP/1.1\r\nHost: wrong\r\n" + basic("k", "p")
            + b"\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
            b"Content-Length: 4\r\nUser-Agent: t\r\n\r\nbody")
    [event] = hs.receive_data(head)
    assert isinstance(event, ProxyRequest)
    assert (event.kind, event.host, event.port, event.username, event.password) == (
        ProxyKind.FORWARD, "127.0.0.1", 8080, "k", "p")
    assert event.head == (b"POST /a/b?c=d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 4\r\n"
                          b"User-Agent: t\r\nConnection: close\r\n\r\n")
    assert hs.take_rest() == b"body"
    assert hs.accept() == b""


def test_absolute_form_default_port_and_path() -> None:
    [event] = ProxyHandshake().receive_data(b"GET http://example.internal HTTP/1.0\r\n\r\n")
    assert isinstance(event, ProxyRequest)
    assert (event.host, event.port) == ("example.internal", 80)
    assert event.head.startswith(b"GET / HTTP/1.0\r\nHost: example.internal\r\n")


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\n\r\n",  # origin-form: not a proxy request
    b"GET https://h/ HTTP/1.1\r\n\r\n",
    b"GET http://u@h/ HTTP/1.1\r\n\r\n",
    b"GET http://h/ HTTP/2.0\r\n\r\n",
    b"GET  http://h/ HTTP/1.1\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\nNo-colon\r\n\r\n",
    # smuggling: ambiguous body framing
    b"POST http://h/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST http://h/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST http://h/ HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
    b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"POST http://h/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
])
def test_absolute_form_bad_requests(head: bytes) -> None:
    [event] = ProxyHandshake().receive_data(head)
    assert isinstance(event, Close), event
    assert event.data.startswith(b"HTTP/1.1 400 ")


def test_bare_lf_head_never_completes_and_is_limited() -> None:
    hs = ProxyHandshake(max_head=1024)
    assert hs.receive_data(b"CONNECT h:1 HTTP/1.1\n\n") == []
    [event] = hs.receive_data(b"X" * 1100)
    assert isinstance(event, Close) and event.data.startswith(b"HTTP/1.1 431 ")


def test_head_size_limit() -> None:
    hs = ProxyHandshake(max_head=100)
    [event] = hs.receive_data(b"CONNECT h:1 HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n\r\n")
    assert isinstance(event, Close) and event.data.startswith(b"HTTP/1.1 431 ")


def test_header_count_limit() -> None:
    hs = ProxyHandshake(max_headers=3)
    assert hs.receive_data(b"CONNECT h:1 HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\n") == []
    [event] = hs.receive_data(b"D: 1\r\nE: 1\r\n")
    assert isinstance(event, Close) and event.data.startswith(b"HTTP/1.1 431 ")
    hs = ProxyHandshake(max_headers=3)
    [event] = hs.receive_data(b"CONNECT h:1 HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n")
    assert isinstance(event, Close) and event.data.startswith(b"HTTP/1.1 431 ")


def test_malformed_basic_credentials_count_as_none() -> None:
    for value in (b"Bearer x", b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon")):
        [event] = ProxyHandshake().receive_data(
            b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: " + value + b"\r\n\r\n")
        assert isinstance(event, ProxyRequest) and event.username is None


def test_timed_out_answers() -> None:
    hs = ProxyHandshake()
    hs.receive_data(b"CONNECT h:1 HTTP/1.1\r\nHost")
    assert hs.timed_out().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert hs.done
    hs = ProxyHandshake()
    hs.receive_data(b"\x05\x01")
    assert hs.timed_out() == b""


def test_every_refusal_is_distinct() -> None:
    assert len({refusal.value for refusal in Refusal}) == len(list(Refusal)) == len(Refusal.__members__)
