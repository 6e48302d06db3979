"""The proxy front end's handshakes, sans-IO: HTTP ``CONNECT``, absolute-form
HTTP proxying (``GET http://host/path``) and SOCKS5 (RFC 1928, with RFC 1929
username/password), told apart by the first byte.

A :class:`ProxyHandshake` is fed the bytes a client sent
(:meth:`~ProxyHandshake.receive_data`) and hands back events: bytes to send
(:class:`Send`), credentials to check before a SOCKS5 client may go on
(:class:`CheckCredentials`, answered with
:meth:`~ProxyHandshake.credentials_checked`), the request itself
(:class:`ProxyRequest`, answered with :meth:`~ProxyHandshake.accept` or
:meth:`~ProxyHandshake.refuse`), or the end of a handshake that cannot go on
(:class:`Close`, with the bytes to send first). No sockets, threads or clocks:
the caller enforces the time limit.

Limits: an HTTP request head longer than ``max_head`` bytes or with more
than ``max_headers`` header lines is refused (HTTP 431); SOCKS5 messages are
bounded by their format, and a bad version or field cuts the connection. Lines must end in CRLF, header
values may not hold CR or NUL, and the body's framing must be unambiguous
(RFC 9112 §6), since an absolute-form request is passed on.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

from ..addresses import join_host_port
from .http1 import HOP_BY_HOP, is_token, parse_request_header_line, request_framing_error, request_line_error

__all__ = [
    "ProxyKind",
    "Refusal",
    "Send",
    "Close",
    "CheckCredentials",
    "ProxyRequest",
    "ProxyEvent",
    "ProxyHandshake",
    "DEFAULT_MAX_HEAD",
    "DEFAULT_MAX_HEADERS",
    "PROXY_REALM",
    "http_refusal",
]

#: Bytes a request head (or the SOCKS5 greeting, authentication and request) may take.
DEFAULT_MAX_HEAD = 64 * 1024
#: Header lines a request head may have.
DEFAULT_MAX_HEADERS = 100
#: The realm named in ``Proxy-Authenticate``.
PROXY_REALM = "remotedialer"

SOCKS_VERSION = 0x05
SOCKS4_VERSION = 0x04
_AUTH_VERSION = 0x01
_NO_AUTH = 0x00
_USERNAME_PASSWORD = 0x02
_NO_ACCEPTABLE_METHOD = 0xFF
_CMD_CONNECT = 0x01
_ATYP_IPV4 = 0x01
_ATYP_DOMAIN = 0x03
_ATYP_IPV6 = 0x04

_DIGITS = re.compile(r"[0-9]+")
#: Headers not passed on with an absolute-form request: the hop-by-hop ones
#: but the body's framing, as the body is passed on unchanged.
_DROPPED = HOP_BY_HOP - {"transfer-encoding", "trailer"}


class ProxyKind(enum.Enum):
    """How the client asked."""

    CONNECT = "connect"  # HTTP CONNECT host:port
    FORWARD = "forward"  # HTTP absolute-form request, passed on
    SOCKS5 = "socks5"


class Refusal(enum.Enum):
    """Why a request is refused: the HTTP status and phrase, SOCKS5 reply
    code and default text of each."""

    BAD_REQUEST = (400, "Bad Request", 0x01, "malformed request")
    AUTH_REQUIRED = (407, "Proxy Authentication Required", 0x02, "proxy authentication required")
    NOT_ALLOWED = (403, "Forbidden", 0x02, "not allowed")
    TOO_MANY = (503, "Service Unavailable", 0x02, "too many connections through this agent")
    NO_AGENT = (502, "Bad Gateway", 0x04, "no agent connected with that client key")
    UNREACHABLE = (502, "Bad Gateway", 0x04, "target unreachable")
    REFUSED = (502, "Bad Gateway", 0x05, "connection refused by the target")
    TIMED_OUT = (504, "Gateway Timeout", 0x04, "timed out")
    FAILURE = (502, "Bad Gateway", 0x01, "failed")
    UNSUPPORTED_COMMAND = (501, "Not Implemented", 0x07, "command not supported")
    UNSUPPORTED_ADDRESS = (400, "Bad Request", 0x08, "address type not supported")
    HEAD_TOO_LARGE = (431, "Request Header Fields Too Large", 0x01, "request head too large")
    SLOW = (408, "Request Timeout", 0x01, "request head not received in time")

    def __init__(self, status: int, phrase: str, socks_code: int, text: str) -> None:
        #: The HTTP status and reason phrase answered.
        self.status = status
        self.phrase = phrase
        #: The SOCKS5 reply code (RFC 1928 §6) answered.
        self.socks_code = socks_code
        #: What the refusal says when no reason is given.
        self.text = text


@dataclass(frozen=True)
class Send:
    """Bytes to send the client; the handshake goes on."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Send ``data`` (maybe empty), then close: the handshake failed
    (``reason``; ``refusal`` says how it counts)."""

    data: bytes
    reason: str
    refusal: Refusal = Refusal.BAD_REQUEST


@dataclass(frozen=True)
class CheckCredentials:
    """A SOCKS5 client sent its username and password (RFC 1929): check them
    and answer with :meth:`ProxyHandshake.credentials_checked` before
    feeding more data."""

    username: str
    password: str


@dataclass(frozen=True)
class ProxyRequest:
    """The client's request: reach ``host:port`` for ``username`` (the client
    key). ``head`` is the request head to send the target first (absolute-form
    requests, rewritten to origin-form; empty otherwise). Credentials are
    ``None`` when the client sent none."""

    kind: ProxyKind
    host: str
    port: int
    username: Optional[str]
    password: Optional[str]
    head: bytes = b""

    @property
    def address(self) -> str:
        """``host:port`` as dialed (IPv6 in brackets)."""
        return join_host_port(self.host, self.port)


ProxyEvent = Union[Send, Close, CheckCredentials, ProxyRequest]
"""What :meth:`ProxyHandshake.receive_data` hands back."""


class _State(enum.Enum):
    START = "start"
    HTTP_HEAD = "http head"
    SOCKS_GREETING = "socks greeting"
    SOCKS_AUTH = "socks auth"
    SOCKS_CHECKING = "socks checking credentials"
    SOCKS_REQUEST = "socks request"
    DECIDING = "deciding"
    DONE = "done"


class ProxyHandshake:
    """One client connection's handshake (see the module doc). Not thread-safe:
    one owner feeds it."""

    def __init__(self, max_head: int = DEFAULT_MAX_HEAD, max_headers: int = DEFAULT_MAX_HEADERS) -> None:
        self.max_head = max_head
        self.max_headers = max_headers
        self._state = _State.START
        self._buffer = bytearray()
        self._request: Optional[ProxyRequest] = None
        self._username: Optional[str] = None
        self._password: Optional[str] = None
        self.kind: Optional[ProxyKind] = None

    @property
    def done(self) -> bool:
        """Whether the handshake ended (accepted, refused or failed)."""
        return self._state is _State.DONE

    @property
    def waiting_for_client(self) -> bool:
        """Whether the next step is the client's (more bytes are wanted)."""
        return self._state in (_State.START, _State.HTTP_HEAD, _State.SOCKS_GREETING,
                               _State.SOCKS_AUTH, _State.SOCKS_REQUEST)

    def take_rest(self) -> bytes:
        """Bytes received after the request (the client's first payload bytes);
        clears them."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    # ---------------------------------------------------------------- input
    def receive_data(self, data: bytes) -> List[ProxyEvent]:
        """Feed bytes from the client; returns the events they complete."""
        if self._state is _State.DONE:
            return []
        self._buffer += data
        events: List[ProxyEvent] = []
        while self.waiting_for_client and self._buffer:
            event = self._step()
            if event is None:
                break
            events.append(event)
            if isinstance(event, Close):
                self._state = _State.DONE
                self._buffer.clear()
        return events

    def _step(self) -> Optional[ProxyEvent]:
        state = self._state
        if state is _State.START:
            return self._start()
        if state is _State.HTTP_HEAD:
            return self._http_head()
        if state is _State.SOCKS_GREETING:
            return self._socks_greeting()
        if state is _State.SOCKS_AUTH:
            return self._socks_auth()
        return self._socks_request()

    def _start(self) -> Optional[ProxyEvent]:
        first = self._buffer[0]
        if first == SOCKS_VERSION:
            self.kind = ProxyKind.SOCKS5
            self._state = _State.SOCKS_GREETING
            return None if len(self._buffer) < 2 else self._socks_greeting()
        if first == SOCKS4_VERSION:
            # SOCKS4 reply "request rejected or failed" (0x5B), then close.
            return Close(b"\x00\x5b" + bytes(6), "SOCKS4 is not supported (use SOCKS5)")
        if 0x41 <= first <= 0x5A:  # an upper-case letter: an HTTP method
            self._state = _State.HTTP_HEAD
            return self._http_head()
        return Close(b"", f"not a proxy request (first byte 0x{first:02x})")

    def _take(self, count: int) -> Optional[bytes]:
        """Take ``count`` bytes of a SOCKS5 message (None if not all here yet).
        Each message's format bounds its size (at most 513 bytes)."""
        if len(self._buffer) < count:
            return None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    # ---------------------------------------------------------------- SOCKS5
    def _socks_greeting(self) -> Optional[ProxyEvent]:
        if len(self._buffer) < 2:
            return None
        count = self._buffer[1]
        message = self._take(2 + count)
        if message is None:
            return None
        if count == 0:
            return Close(b"", "SOCKS5 greeting offers no method")
        if _USERNAME_PASSWORD not in message[2:]:
            # The username names the agent: without it there is nowhere to go.
            return Close(bytes((SOCKS_VERSION, _NO_ACCEPTABLE_METHOD)),
                         "SOCKS5 client offers no username/password authentication", Refusal.AUTH_REQUIRED)
        self._state = _State.SOCKS_AUTH
        return Send(bytes((SOCKS_VERSION, _USERNAME_PASSWORD)))

    def _socks_auth(self) -> Optional[ProxyEvent]:
        buffer = self._buffer
        if buffer[0] != _AUTH_VERSION:
            return Close(bytes((_AUTH_VERSION, 0x01)), f"bad SOCKS5 authentication version {buffer[0]}")
        if len(buffer) < 2 or len(buffer) < 3 + buffer[1]:
            return None
        username_end = 2 + buffer[1]
        message = self._take(username_end + 1 + buffer[username_end])
        if message is None:
            return None
        try:
            username = message[2:username_end].decode("utf-8")
            password = message[username_end + 1:].decode("utf-8")
        except UnicodeDecodeError:
            return Close(bytes((_AUTH_VERSION, 0x01)), "SOCKS5 username or password is not UTF-8")
        self._username, self._password = username, password
        self._state = _State.SOCKS_CHECKING
        return CheckCredentials(username, password)

    def credentials_checked(self, accepted: bool) -> bytes:
        """Answer a :class:`CheckCredentials`: the bytes to send. Refused
        credentials end the handshake (send them, then close)."""
        if self._state is not _State.SOCKS_CHECKING:
            raise RuntimeError(f"no credentials to answer ({self._state.value})")
        if not accepted:
            self._state = _State.DONE
            return bytes((_AUTH_VERSION, 0x01))
        self._state = _State.SOCKS_REQUEST
        return bytes((_AUTH_VERSION, 0x00))

    def _socks_request(self) -> Optional[ProxyEvent]:
        buffer = self._buffer
        if len(buffer) < 5:
            return None
        version, command, _reserved, address_type = buffer[0], buffer[1], buffer[2], buffer[3]
        if version != SOCKS_VERSION:
            return Close(b"", f"bad SOCKS5 request version {version}")
        if address_type == _ATYP_IPV4:
            length = 4 + 4 + 2
        elif address_type == _ATYP_IPV6:
            length = 4 + 16 + 2
        elif address_type == _ATYP_DOMAIN:
            length = 4 + 1 + buffer[4] + 2
        else:
            return Close(_socks_reply(Refusal.UNSUPPORTED_ADDRESS.socks_code),
                         f"SOCKS5 address type {address_type} is not supported", Refusal.UNSUPPORTED_ADDRESS)
        message = self._take(length)
        if message is None:
            return None
        if command != _CMD_CONNECT:
            return Close(_socks_reply(Refusal.UNSUPPORTED_COMMAND.socks_code),
                         f"SOCKS5 command {command} is not supported (only CONNECT)",
                         Refusal.UNSUPPORTED_COMMAND)
        port = int.from_bytes(message[-2:], "big")
        if address_type == _ATYP_IPV4:
            host = str(ipaddress.IPv4Address(message[4:8]))
        elif address_type == _ATYP_IPV6:
            host = str(ipaddress.IPv6Address(message[4:20]))
        else:
            try:
                host = message[5:-2].decode("ascii")
            except UnicodeDecodeError:
                host = ""
            if not _valid_host(host):
                return Close(_socks_reply(Refusal.UNSUPPORTED_ADDRESS.socks_code),
                             "SOCKS5 domain name is not a host name")
        if port == 0:
            return Close(_socks_reply(Refusal.BAD_REQUEST.socks_code), "SOCKS5 request for port 0")
        return self._decided(ProxyRequest(ProxyKind.SOCKS5, host, port, self._username, self._password))

    # ------------------------------------------------------------------ HTTP
    def _http_head(self) -> Optional[ProxyEvent]:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self.max_head:
                return self._http_close(Refusal.HEAD_TOO_LARGE, "request head too large")
            if self._buffer.count(b"\n") > self.max_headers + 1:
                return self._http_close(Refusal.HEAD_TOO_LARGE, "too many header lines")
            return None
        if end + 4 > self.max_head:
            return self._http_close(Refusal.HEAD_TOO_LARGE, "request head too large")
        head = bytes(self._buffer[:end])
        del self._buffer[:end + 4]
        lines = head.split(b"\r\n")
        if len(lines) - 1 > self.max_headers:
            return self._http_close(Refusal.HEAD_TOO_LARGE, "too many header lines")
        words = lines[0].decode("iso-8859-1").split(" ")
        if len(words) != 3 or not all(words) or not is_token(words[0]):
            return self._http_close(Refusal.BAD_REQUEST, "malformed request line")
        method, target, version = words
        refused = request_line_error(lines[0] + b"\r\n", version)
        if refused is not None:
            return self._http_close(Refusal.BAD_REQUEST, refused[1])
        fields = []
        for line in lines[1:]:
            field = parse_request_header_line(line + b"\r\n")
            if field is None:
                return self._http_close(Refusal.BAD_REQUEST, "malformed header line")
            fields.append(field)
        credentials = _proxy_credentials(fields)
        username, password = credentials if credentials is not None else (None, None)
        if method == "CONNECT":
            authority = _parse_authority(target, None)
            if isinstance(authority, str):
                return self._http_close(Refusal.BAD_REQUEST, authority)
            self.kind = ProxyKind.CONNECT
            return self._decided(ProxyRequest(ProxyKind.CONNECT, *authority, username, password))
        self.kind = ProxyKind.FORWARD
        forward = _forward_head(method, target, version, fields)
        if isinstance(forward, str):
            return self._http_close(Refusal.BAD_REQUEST, forward)
        host, port, out_head = forward
        return self._decided(ProxyRequest(ProxyKind.FORWARD, host, port, username, password, out_head))

    def _http_close(self, refusal: Refusal, reason: str) -> Close:
        return Close(http_refusal(refusal, reason), reason, refusal)

    def timed_out(self) -> bytes:
        """The client took too long: the bytes to send before closing (an
        HTTP 408 to an HTTP client, nothing to a SOCKS5 one). Ends the handshake."""
        http = self._state is _State.HTTP_HEAD
        self._state = _State.DONE
        return http_refusal(Refusal.SLOW, "") if http else b""

    # -------------------------------------------------------------- decision
    def _decided(self, request: ProxyRequest) -> ProxyRequest:
        self._request = request
        self._state = _State.DECIDING
        return request

    def accept(self) -> bytes:
        """The request is granted and its connection open: the bytes to send
        the client before piping (nothing for an absolute-form request, whose
        answer is the target's)."""
        request = self._deciding()
        self._state = _State.DONE
        if request.kind is ProxyKind.SOCKS5:
            return _socks_reply(0x00)
        if request.kind is ProxyKind.CONNECT:
            return b"HTTP/1.1 200 Connection established\r\n\r\n"
        return b""

    def refuse(self, refusal: Refusal, reason: str = "") -> bytes:
        """The request is refused: the bytes to send the client, then close."""
        request = self._deciding()
        self._state = _State.DONE
        if request.kind is ProxyKind.SOCKS5:
            return _socks_reply(refusal.socks_code)
        return http_refusal(refusal, reason)

    def _deciding(self) -> ProxyRequest:
        if self._state is not _State.DECIDING or self._request is None:
            raise RuntimeError(f"no request to answer ({self._state.value})")
        return self._request


def http_refusal(refusal: Refusal, reason: str) -> bytes:
    """A complete HTTP answer for ``refusal`` (``Connection: close``), with
    ``reason`` as its plain-text body."""
    status, phrase = refusal.status, refusal.phrase
    body = (reason or refusal.text).encode("utf-8", "replace") + b"\n"
    extra = ""
    if refusal is Refusal.AUTH_REQUIRED:
        extra = f'Proxy-Authenticate: Basic realm="{PROXY_REALM}"\r\n'
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _socks_reply(code: int) -> bytes:
    """A SOCKS5 reply with ``code`` and an unspecified bound address (0.0.0.0:0)."""
    return bytes((SOCKS_VERSION, code, 0x00, _ATYP_IPV4)) + bytes(6)


def _proxy_credentials(fields: List[Tuple[str, str]]) -> Optional[Tuple[str, str]]:
    """``(username, password)`` of a ``Proxy-Authorization: Basic`` header, or None."""
    for name, value in fields:
        if name.lower() != "proxy-authorization":
            continue
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, colon, password = decoded.partition(":")
        return (username, password) if colon else None
    return None


def _valid_host(host: str) -> bool:
    """A host name or IP literal (no spaces, slashes, colons or empty labels)."""
    if not host or len(host) > 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return all(label and re.fullmatch(r"[A-Za-z0-9_-]+", label) for label in host.rstrip(".").split("."))


def _parse_authority(text: str, default_port: Optional[int]) -> Union[Tuple[str, int], str]:
    """``host:port`` (IPv6 in brackets) to ``(host, port)``; a message if malformed."""
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1:] if close > 0 else ""
        if close < 0:
            return "malformed IPv6 address"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "malformed IPv6 address"
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, rest = text, ""
        else:
            rest = ":" + port_text
        if not _valid_host(host):
            return "malformed host"
    if not rest:
        if default_port is None:
            return "the target needs a port (host:port)"
        return host, default_port
    port_text = rest[1:]
    if not rest.startswith(":") or not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        return "malformed port"
    return host, int(port_text)


def _forward_head(
    method: str, target: str, version: str, fields: List[Tuple[str, str]]
) -> Union[Tuple[str, int, bytes], str]:
    """The head to send the target for an absolute-form request: origin-form
    request line, ``Host`` from the URI, hop-by-hop headers dropped and
    ``Connection: close`` (one request per connection)."""
    try:
        url = urllib.parse.urlsplit(target)
    except ValueError:
        return "malformed request target"
    if url.scheme.lower() != "http" or not url.netloc:
        if url.scheme.lower() == "https":
            return "https:// targets go through CONNECT"
        return "this is a proxy: the request target must be an absolute http:// URL"
    if "@" in url.netloc:
        return "user information in the request target"
    if not url.netloc.isascii() or any(ord(c) <= 0x20 or c == "\x7f" for c in target):
        return "malformed request target"
    authority = _parse_authority(url.netloc, 80)
    if isinstance(authority, str):
        return authority
    refused = request_framing_error(version, fields)
    if refused is not None:
        return refused[1]
    connection_tokens = {
        token.strip(" \t").lower()
        for name, value in fields if name.lower() == "connection"
        for token in value.split(",")
    }
    origin_form = (url.path or "/") + (f"?{url.query}" if url.query else "")
    lines = [f"{method} {origin_form} {version}", f"Host: {url.netloc}"]
    for name, value in fields:
        lowered = name.lower()
        if lowered in _DROPPED or lowered in connection_tokens or lowered == "host":
            continue
        lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return authority[0], authority[1], ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1")
