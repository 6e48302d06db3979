"""``host:port`` text, split and joined in one place (like Go's
``net.SplitHostPort`` / ``net.JoinHostPort``).

IPv6 literals are written in brackets (``[::1]:8123``); a host with a colon
and no brackets is refused, since its port cannot be told apart. Listen
addresses add two short forms: ``:PORT`` (every interface, as in Go) and a
bare ``PORT`` (on the caller's default host). Errors are ``ValueError`` with
Go's wording (``address x: missing port in address``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

__all__ = ["ALL_INTERFACES", "split_host_port", "join_host_port", "parse_listen_address"]

ALL_INTERFACES = "0.0.0.0"
"""The host a listen address with an empty host (``:PORT``) binds to."""


def split_host_optional_port(address: str) -> Tuple[str, Optional[int]]:
    """Split ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6
    literal (``fd00::5``: no port can follow it without brackets) into the
    host (without brackets, possibly empty) and the port (``None`` when
    absent). Raises ``ValueError`` for unbalanced brackets or a port that is
    not a number from 0 to 65535."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"address {address}: missing ']' in address")
        host, rest = address[1:end], address[end + 1:]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"address {address}: unexpected text after ']'")
        port_text = rest[1:]
    else:
        host, colon, port_text = address.partition(":")
        if "]" in address:
            raise ValueError(f"address {address}: unexpected ']' in address")
        if not colon or ":" in port_text:
            return address, None
    if "[" in host or "]" in host:
        raise ValueError(f"address {address}: unexpected bracket in address")
    return host, _port(address, port_text)


def split_remote_address(address: str) -> Tuple[str, Optional[int]]:
    """:func:`split_host_optional_port` for an address to connect to: the
    host may not be empty nor the port 0."""
    host, port = split_host_optional_port(address)
    if not host:
        raise ValueError(f"address {address}: missing host in address")
    if port == 0:
        raise ValueError(f"address {address}: invalid port '0'")
    return host, port


def split_host_port(address: str) -> Tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` (the host may be empty). Raises
    ``ValueError`` when the port is missing or invalid, see
    :func:`split_host_optional_port`."""
    if address.count(":") > 1 and not address.startswith("["):
        raise ValueError(f"address {address}: too many colons in address")
    host, port = split_host_optional_port(address)
    if port is None:
        raise ValueError(f"address {address}: missing port in address")
    return host, port


def join_host_port(host: str, port: Union[int, str]) -> str:
    """``host:port``, with brackets around a host containing a colon (IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen_address(text: str, default_host: str) -> Tuple[str, int]:
    """Parse a listen address: ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (on
    :data:`ALL_INTERFACES`) or ``PORT`` (on ``default_host``); port 0 asks for
    a free port. Surrounding white space is ignored. Raises ``ValueError``
    for anything else."""
    text = text.strip()
    try:
        if text.isascii() and text.isdigit():
            return default_host, _port(text, text)
        host, port = split_host_port(text)
    except ValueError as exc:
        raise ValueError(f"invalid listen address {text!r} (want HOST:PORT, :PORT or PORT): {exc}") from None
    return host or ALL_INTERFACES, port


def reachable_host(host: str) -> str:
    """The host to connect to for a listener bound to ``host`` on this
    machine: loopback for the wildcard addresses, ``host`` otherwise."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _port(address: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ValueError(f"address {address}: invalid port {text!r}")
    return int(text)
