"""remotedialer.addresses: host:port split and join, listen addresses, and
the command line taking the same listen forms for ``--listen`` and
``--forward``."""

from __future__ import annotations

from typing import Optional, Tuple

import pytest

from remotedialer.addresses import (
    join_host_port,
    parse_listen_address,
    reachable_host,
    split_host_optional_port,
    split_host_port,
    split_remote_address,
)
from remotedialer.cli import build_parser
from remotedialer.server.port_forward import parse_forward_spec


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:8125", ("127.0.0.1", 8125)),
        ("localhost:0", ("localhost", 0)),
        ("db.internal:65535", ("db.internal", 65535)),
        ("[::1]:22", ("::1", 22)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        (":80", ("", 80)),
        ("[]:80", ("", 80)),
    ],
)
def test_split_host_port(address: str, expected: Tuple[str, int]) -> None:
    assert split_host_port(address) == expected
    assert split_host_port(join_host_port(*expected)) == expected


@pytest.mark.parametrize(
    "address, reason",
    [
        ("", "missing port"),
        ("host", "missing port"),
        ("[::1]", "missing port"),
        ("host:", "invalid port"),
        ("host:x", "invalid port"),
        ("host:-1", "invalid port"),
        ("host:+1", "invalid port"),
        ("host: 80", "invalid port"),
        ("host:65536", "invalid port"),
        ("host:\u0661", "invalid port"),  # a non-ASCII digit
        ("::1:80", "too many colons"),
        ("[::1:80", "missing ']'"),
        ("[::1]80", "after ']'"),
        ("[::1]:80:1", "invalid port"),
        ("ho]st:80", "unexpected ']'"),
        ("[a[b]:80", "bracket"),
        ("ho]st", "unexpected ']'"),
    ],
)
def test_split_host_port_rejects(address: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        split_host_port(address)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("example.com", ("example.com", None)),
        ("example.com:8080", ("example.com", 8080)),
        ("[::1]", ("::1", None)),
        ("[::1]:443", ("::1", 443)),
        ("fd00::5", ("fd00::5", None)),  # bare IPv6: no port without brackets
        ("", ("", None)),
    ],
)
def test_split_host_optional_port(address: str, expected: Tuple[str, Optional[int]]) -> None:
    assert split_host_optional_port(address) == expected


def test_split_remote_address() -> None:
    assert split_remote_address("example.com") == ("example.com", None)
    assert split_remote_address("[::1]:1") == ("::1", 1)
    for bad in ("", ":80", "[]:80", "example.com:0", "[::1"):
        with pytest.raises(ValueError):
            split_remote_address(bad)


def test_join_host_port_brackets_ipv6_only() -> None:
    assert join_host_port("127.0.0.1", 80) == "127.0.0.1:80"
    assert join_host_port("example.com", "443") == "example.com:443"
    assert join_host_port("::1", 22) == "[::1]:22"
    assert join_host_port("", 80) == ":80"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8125", ("default", 8125)),
        (" 0 ", ("default", 0)),
        (":8123", ("0.0.0.0", 8123)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8123", ("::1", 8123)),
        ("[::]:0", ("::", 0)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_listen_address(text: str, expected: Tuple[str, int]) -> None:
    assert parse_listen_address(text, default_host="default") == expected


@pytest.mark.parametrize(
    "text", ["", "host", "host:", "host:x", ":99999", "99999", "::1:80", "[::1]", "[::1]:", "-1"]
)
def test_parse_listen_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid listen address"):
        parse_listen_address(text, default_host="default")


def test_reachable_host() -> None:
    assert reachable_host("0.0.0.0") == reachable_host("") == "127.0.0.1"
    assert reachable_host("::") == "::1"
    assert reachable_host("10.1.2.3") == "10.1.2.3"


# ------------------------------------------------------- the command line
LISTEN_FORMS = [
    ":8123", "8123", "127.0.0.1:0", "[::1]:9125", "localhost:80",  # accepted
    "", "host", "host:x", ":99999", "::1:80", "[::1]", "a:b",  # refused
]


@pytest.mark.parametrize("text", LISTEN_FORMS)
def test_listen_and_forward_take_the_same_forms(text: str) -> None:
    """``--listen X`` and ``--forward X=...`` accept and refuse the same X,
    and agree on host and port except for a bare port's default host."""
    parser = build_parser()
    try:
        listen: Optional[Tuple[str, int]] = parser.parse_args(["server", "--listen", text]).listen
    except SystemExit:
        listen = None
    try:
        forward: Optional[Tuple[str, int]] = parse_forward_spec(f"{text}=foo:tcp:127.0.0.1:1").listen
    except ValueError:
        forward = None
    assert (listen is None) == (forward is None)
    if listen is not None and forward is not None:
        assert listen[1] == forward[1]
        if not text.strip().isdigit():
            assert listen[0] == forward[0]
        else:  # a bare port: the server listens everywhere, a forward on loopback
            assert (listen[0], forward[0]) == ("0.0.0.0", "127.0.0.1")
