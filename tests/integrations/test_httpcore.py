"""The httpcore network backend over a real session pair and loopback servers."""

from __future__ import annotations

import hashlib
import socket
import ssl
from typing import Iterator, List, Optional

import pytest

httpcore = pytest.importorskip("httpcore")


from remotedialer.connection import TunnelConnection  # noqa: E402
from remotedialer.errors import NoSessionError  # noqa: E402
from remotedialer.integrations.httpcore import TunnelBackend  # noqa: E402

from testkit.http_targets import LoopbackServer, Tunnel, pattern  # noqa: E402
from testkit.support import TIMEOUT, wait_for  # noqa: E402

# The loopback servers, the test CA and the tunnel are fixtures of conftest.py.

TIMEOUTS = {"timeout": {"connect": TIMEOUT, "read": TIMEOUT, "write": TIMEOUT, "pool": TIMEOUT}}


@pytest.fixture
def pool(tunnel: Tunnel, client_context: ssl.SSLContext) -> Iterator["httpcore.ConnectionPool"]:
    with httpcore.ConnectionPool(network_backend=TunnelBackend(tunnel.dial), ssl_context=client_context) as p:
        yield p


def test_keep_alive_and_bodies(
    tunnel: Tunnel, server: LoopbackServer, pool: "httpcore.ConnectionPool"
) -> None:
    bodies = {pool.request("GET", server.url("/hello"), extensions=TIMEOUTS).content for _ in range(3)}
    assert len(bodies) == 1
    body = pattern(3 * 1024 * 1024 + 7)
    reply = pool.request("POST", server.url("/upload"), content=body, extensions=TIMEOUTS)
    assert reply.content.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    chunked = pool.request("GET", server.url("/chunked"), extensions=TIMEOUTS)
    assert chunked.content == b"alpha-" + b"beta-" * 1000 + b"gamma"
    assert [address for _, address, _ in tunnel.dialed] == [f"127.0.0.1:{server.port}"]


def test_pooled_connection_closed_by_the_far_side_is_replaced(
    tunnel: Tunnel, server: LoopbackServer, pool: "httpcore.ConnectionPool"
) -> None:
    first = pool.request("GET", server.url("/hello"), extensions=TIMEOUTS).content
    server.drop_idle_connections()
    wait_for(tunnel.idle)
    # httpcore's liveness check, on every idle connection of the pool:
    wait_for(lambda: all(conn.has_expired() for conn in pool.connections))
    second = pool.request("GET", server.url("/hello"), extensions=TIMEOUTS).content
    assert first != second
    assert len(tunnel.dialed) == 2


def test_read_timeout(server: LoopbackServer, pool: "httpcore.ConnectionPool") -> None:
    with pytest.raises(httpcore.ReadTimeout):
        pool.request("GET", server.url("/slow"), extensions={"timeout": {"read": 0.2}})


def test_dial_failures_are_connect_errors() -> None:
    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        raise NoSessionError("no session for client key")

    with httpcore.ConnectionPool(network_backend=TunnelBackend(dial)) as pool:
        with pytest.raises(httpcore.ConnectError, match="no session"):
            pool.request("GET", "http://anything.internal/", extensions=TIMEOUTS)


def test_https_verifies_and_keeps_alive(
    tunnel: Tunnel, tls_server: LoopbackServer, pool: "httpcore.ConnectionPool"
) -> None:
    for _ in range(2):
        response = pool.request("GET", tls_server.url("/host", host="localhost"), extensions=TIMEOUTS)
        assert response.content == f"localhost:{tls_server.port}".encode()
    assert [address for _, address, _ in tunnel.dialed] == [f"localhost:{tls_server.port}"]


def test_https_hostname_mismatch_fails_and_frees_the_tunnel(
    tunnel: Tunnel, tls_server: LoopbackServer, pool: "httpcore.ConnectionPool"
) -> None:
    with pytest.raises(httpcore.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        pool.request("GET", tls_server.url("/hello", host="127.0.0.1"), extensions=TIMEOUTS)
    wait_for(tunnel.idle)


def test_https_far_side_refusal_names_the_dial(
    tunnel: Tunnel, refusing_port: int, pool: "httpcore.ConnectionPool"
) -> None:
    with pytest.raises(httpcore.ConnectError, match="refused"):
        pool.request("GET", f"https://localhost:{refusing_port}/", extensions=TIMEOUTS)
    wait_for(tunnel.idle)


def test_http_far_side_refusal_is_a_connect_error(
    tunnel: Tunnel, refusing_port: int, pool: "httpcore.ConnectionPool"
) -> None:
    refused = f"dial tcp 127.0.0.1:{refusing_port}: Connection refused"
    with pytest.raises(httpcore.ConnectError, match=refused):
        pool.request("GET", f"http://127.0.0.1:{refusing_port}/", extensions=TIMEOUTS)
    wait_for(tunnel.idle)


def test_dial_address_for_ipv6_and_names() -> None:
    seen: List[str] = []

    def dial(proto: str, address: str, timeout: Optional[float]) -> socket.socket:
        seen.append(f"{proto}/{address}")
        raise NoSessionError("none")

    with httpcore.ConnectionPool(network_backend=TunnelBackend(dial)) as pool:
        for url in ("http://[::1]:8080/", "http://far.internal/"):
            with pytest.raises(httpcore.ConnectError):
                pool.request("GET", url, extensions=TIMEOUTS)
    assert seen == ["tcp/[::1]:8080", "tcp/far.internal:80"]
