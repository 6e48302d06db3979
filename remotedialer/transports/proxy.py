"""The agent's way out through a proxy: which proxy, and the socket through it.

Which proxy follows Go's ``http.ProxyFromEnvironment`` (what a Go agent's
WebSocket dialer uses), read once:

* a ``ws://`` server is reached through ``HTTP_PROXY``, a ``wss://`` one
  through ``HTTPS_PROXY``; the upper-case name wins over the lower-case one
  when both are set and not empty; a value without a scheme is ``http://``;
* ``NO_PROXY`` lists hosts reached directly: comma-separated names (``foo.com``
  matches it and its subdomains, ``.foo.com`` and ``*.foo.com`` only the
  subdomains), IP addresses, CIDR blocks (``10.0.0.0/8``), each optionally
  with a port (``foo.com:8443``), or ``*`` for every host. Names match names
  and addresses match addresses: nothing is resolved to decide;
* ``localhost`` and loopback addresses are always reached directly;
* with ``REQUEST_METHOD`` set (a CGI program), ``HTTP_PROXY`` is refused, as
  Go refuses it (a request header can set it there).

An explicit proxy URL (``TunnelClient(proxy=...)``, ``--proxy``) applies to
every host, loopback included, like Go's ``http.ProxyURL``.

Proxy kinds: ``http://`` (HTTP ``CONNECT`` over TCP), ``https://`` (the same
over TLS to the proxy, verified against the system store), ``socks5://`` and
``socks5h://`` (RFC 1928, written here: the proxy resolves the server's name
in both, as Go's SOCKS5 dialer has it).
Credentials come from the URL (``http://user:secret@proxy:3128``; percent-escape
special characters) and go as ``Proxy-Authorization: Basic`` or the SOCKS5
username/password method.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

from ..addresses import join_host_port
from ..errors import ConfigurationError, ProxyError
from .base import connect_tcp

__all__ = [
    "PROXY_SCHEMES",
    "ProxyURL",
    "NoProxy",
    "parse_proxy_url",
    "proxy_from_environment",
    "connect_through_proxy",
]

log = logging.getLogger(__name__)

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
"""The proxy URL schemes the agent understands."""

_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}

MAX_RESPONSE_HEAD = 16 * 1024
"""Bytes of a proxy's answer to ``CONNECT`` read before giving up on it."""


@dataclass(frozen=True)
class ProxyURL:
    """A parsed proxy URL. ``str()`` hides the password."""

    scheme: str
    host: str
    port: int
    username: str = ""
    password: str = ""

    @property
    def is_socks(self) -> bool:
        return self.scheme in ("socks5", "socks5h")

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"{self.scheme}://{user}{join_host_port(self.host, self.port)}"


def parse_proxy_url(text: str, source: str = "proxy") -> ProxyURL:
    """Parse a proxy URL as Go does (no scheme means ``http://``); raise
    :class:`~remotedialer.errors.ConfigurationError` naming ``source`` (the
    option or variable it came from) when it is unusable."""
    value = text.strip()
    try:
        parts = urlsplit(value)
        if not parts.scheme or not parts.netloc:
            parts = urlsplit("http://" + value)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{source}: invalid proxy URL {value!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise ConfigurationError(
            f"{source}: unsupported proxy scheme {scheme!r} in {value!r}: want http, https, socks5 or socks5h"
        )
    if not parts.hostname:
        raise ConfigurationError(f"{source}: no host in proxy URL {value!r}")
    return ProxyURL(
        scheme, parts.hostname, port if port is not None else _DEFAULT_PORTS[scheme],
        unquote(parts.username or ""), unquote(parts.password or ""),
    )


_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class NoProxy:
    """The hosts of a ``NO_PROXY`` value, matched as Go matches them.
    Unparsable entries are skipped (Go makes the same best effort)."""

    def __init__(self, value: str) -> None:
        self.everything = False
        self.networks: List[_Network] = []
        self.addresses: List[Tuple[_Address, str]] = []  # (address, port or "")
        self.domains: List[Tuple[str, str, bool]] = []  # (".suffix", port or "", matches the bare name too)
        for entry in value.split(","):
            entry = entry.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
                return
            if "/" in entry:
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    pass
                continue
            host, port = _split_entry(entry)
            address = _ip_address(host)
            if address is not None:
                self.addresses.append((address, port))
                continue
            if host.startswith("*."):
                host = host[1:]
            bare = not host.startswith(".")
            self.domains.append(("." + host if bare else host, port, bare))

    def bypasses(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is reached directly."""
        host = host.strip().lower().strip("[]")
        if host == "localhost":
            return True
        address = _ip_address(host)
        if address is not None and address.is_loopback:
            return True
        if self.everything:
            return True
        wanted = str(port)
        if address is not None:
            return any(address in network for network in self.networks) or any(
                address == listed and entry_port in ("", wanted) for listed, entry_port in self.addresses
            )
        return any(
            (host.endswith(suffix) or (bare and host == suffix[1:])) and entry_port in ("", wanted)
            for suffix, entry_port, bare in self.domains
        )


def _split_entry(entry: str) -> Tuple[str, str]:
    """``host[:port]`` or ``[v6][:port]`` of a ``NO_PROXY`` entry -> (host, port or "")."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, ""


def _ip_address(host: str) -> Optional[_Address]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _first_set(environ: Mapping[str, str], *names: str) -> Tuple[str, str]:
    """(name, value) of the first of ``names`` set and not empty, or ("", "")."""
    for name in names:
        value = environ.get(name, "")
        if value:
            return name, value
    return "", ""


def proxy_from_environment(
    secure: bool, host: str, port: int, environ: Optional[Mapping[str, str]] = None
) -> Optional[ProxyURL]:
    """The proxy for a ``wss://`` (``secure``) or ``ws://`` server at
    ``host:port`` by the environment (see the module docstring), or ``None``
    to go directly. Raises :class:`~remotedialer.errors.ConfigurationError`
    for a proxy variable that cannot be used."""
    env = os.environ if environ is None else environ
    if secure:
        name, value = _first_set(env, "HTTPS_PROXY", "https_proxy")
    else:
        name, value = _first_set(env, "HTTP_PROXY", "http_proxy")
    if not value:
        return None
    if NoProxy(_first_set(env, "NO_PROXY", "no_proxy")[1]).bypasses(host, port):
        return None
    proxy = parse_proxy_url(value, name)
    if not secure and env.get("REQUEST_METHOD"):
        raise ConfigurationError(
            f"{name} is not used in a CGI environment (REQUEST_METHOD is set), as in Go"
        )
    return proxy


def connect_through_proxy(proxy: ProxyURL, host: str, port: int, timeout: Optional[float]) -> socket.socket:
    """A socket connected to ``host:port`` through ``proxy``: a plain TCP
    stream the caller runs its own protocol (and TLS) over. Each step blocks
    for at most ``timeout`` seconds. Raises
    :class:`~remotedialer.errors.ProxyError` (an ``OSError``) saying what
    failed: reaching the proxy, its credentials, its refusal."""
    try:
        sock = connect_tcp(proxy.host, proxy.port, timeout)
    except OSError as exc:
        raise ProxyError(f"cannot reach proxy {proxy}: {_reason(exc)}") from exc
    try:
        if proxy.is_socks:
            _socks5_connect(sock, proxy, host, port)
        else:
            if proxy.scheme == "https":
                import ssl  # only here: an agent that uses no TLS need not load it

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=proxy.host)
            _http_connect(sock, proxy, join_host_port(host, port))
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError) and not isinstance(exc, ProxyError):
            raise ProxyError(f"proxy {proxy}: {_reason(exc)}") from exc
        raise
    return sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _http_connect(sock: socket.socket, proxy: ProxyURL, authority: str) -> None:
    """Ask an HTTP proxy for a tunnel to ``authority``; return once it answered 2xx."""
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.username or proxy.password:
        token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode("ascii")
        request += f"Proxy-Authorization: Basic {token}\r\n"
    sock.sendall((request + "\r\n").encode("utf-8"))
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_RESPONSE_HEAD:
            raise ProxyError(f"proxy {proxy}: answer to CONNECT longer than {MAX_RESPONSE_HEAD} bytes")
        chunk = sock.recv(4096)
        if not chunk:
            raise ProxyError(f"proxy {proxy} closed the connection before answering CONNECT {authority}")
        head += chunk
    head, _, extra = head.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProxyError(f"proxy {proxy}: not an HTTP answer to CONNECT: {status_line[:80]!r}")
    status, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "")
    if status == 407:
        what = "rejected the credentials" if proxy.username else "wants credentials (none in the proxy URL)"
        raise ProxyError(f"proxy {proxy} {what}: HTTP 407 {reason}".rstrip(), status=status)
    if not 200 <= status < 300:
        raise ProxyError(f"proxy {proxy} refused CONNECT {authority}: HTTP {status} {reason}".rstrip(),
                         status=status)
    if extra:
        raise ProxyError(f"proxy {proxy}: {len(extra)} unexpected bytes after its answer to CONNECT")


_SOCKS_REPLIES = {
    1: "general SOCKS server failure", 2: "connection not allowed by ruleset",
    3: "network unreachable", 4: "host unreachable", 5: "connection refused",
    6: "TTL expired", 7: "command not supported", 8: "address type not supported",
}
"""RFC 1928 §6: the reply codes a SOCKS5 server refuses a request with."""


def _recv_exactly(sock: socket.socket, size: int, proxy: ProxyURL) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProxyError(f"proxy {proxy} closed the connection during the SOCKS5 handshake")
        data += chunk
    return data


def _socks5_address(host: str) -> bytes:
    """The address of a CONNECT request: an IP literal as such, a name for
    the proxy to resolve."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")  # see connect_tcp
        if not 0 < len(name) < 256:
            raise ProxyError(f"host name too long for SOCKS5: {host!r}") from None
        return bytes([3, len(name)]) + name
    return (b"\x01" if address.version == 4 else b"\x04") + address.packed


def _socks5_connect(sock: socket.socket, proxy: ProxyURL, host: str, port: int) -> None:
    """Ask a SOCKS5 server (RFC 1928, with RFC 1929's username/password
    method when the URL has credentials) to connect to ``host:port``;
    return once it has."""
    authority = join_host_port(host, port)
    method = 0x02 if proxy.username or proxy.password else 0x00
    sock.sendall(bytes([5, 1, method]))
    version, chosen = _recv_exactly(sock, 2, proxy)
    if version != 5:
        raise ProxyError(f"proxy {proxy}: not a SOCKS5 server (version {version})")
    if chosen != method:
        wanted = "wants authentication (no credentials in the proxy URL)" if method == 0 else \
            "did not accept username/password authentication"
        raise ProxyError(f"proxy {proxy} {wanted}")
    if method == 0x02:
        user, password = proxy.username.encode(), proxy.password.encode()
        if len(user) > 255 or len(password) > 255:
            raise ProxyError(f"proxy {proxy}: username or password longer than SOCKS5 allows (255 bytes)")
        sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        if _recv_exactly(sock, 2, proxy)[1] != 0:
            raise ProxyError(f"proxy {proxy}: authentication failure (username/password rejected)")
    sock.sendall(b"\x05\x01\x00" + _socks5_address(host) + port.to_bytes(2, "big"))
    version, reply, _reserved, kind = _recv_exactly(sock, 4, proxy)
    if version != 5:
        raise ProxyError(f"proxy {proxy}: not a SOCKS5 reply (version {version})")
    if reply != 0:
        reason = _SOCKS_REPLIES.get(reply, f"reply {reply}")
        raise ProxyError(f"proxy {proxy} refused {authority}: {reason}")
    if kind == 1:
        _recv_exactly(sock, 4 + 2, proxy)  # the bound address and port, unused
    elif kind == 4:
        _recv_exactly(sock, 16 + 2, proxy)
    elif kind == 3:
        _recv_exactly(sock, _recv_exactly(sock, 1, proxy)[0] + 2, proxy)
    else:
        raise ProxyError(f"proxy {proxy}: unknown address type {kind} in its reply")
