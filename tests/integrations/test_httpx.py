"""The httpx transport over a real session pair and loopback servers (http
and https), and over the real WSGI server with a real tunnel client."""

from __future__ import annotations

import hashlib
import ssl
from typing import AsyncIterator, Iterator, Optional

import httpx
import pytest

from remotedialer.connection import TunnelConnection
from remotedialer.errors import NoSessionError
from remotedialer.integrations.httpx import TunnelTransport

from testkit.http_targets import LoopbackServer, Tunnel, pattern
from testkit.support import TIMEOUT, TunnelServer, wait_for

# The loopback servers, the test CA and the tunnel are fixtures of conftest.py.


@pytest.fixture
def client(tunnel: Tunnel, client_context: ssl.SSLContext) -> Iterator[httpx.Client]:
    with httpx.Client(transport=TunnelTransport(tunnel.dial, verify=client_context), timeout=TIMEOUT) as c:
        yield c


def test_http_keep_alive_bodies_and_streaming(
    tunnel: Tunnel, server: LoopbackServer, client: httpx.Client
) -> None:
    bodies = {client.get(server.url("/hello")).content for _ in range(3)}
    assert len(bodies) == 1
    body = pattern(3 * 1024 * 1024 + 7)
    reply = client.post(server.url("/upload"), content=body)
    assert reply.status_code == 200
    assert reply.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    with client.stream("GET", server.url("/chunked")) as streamed:
        assert b"".join(streamed.iter_bytes()) == b"alpha-" + b"beta-" * 1000 + b"gamma"
    # one tunneled connection, kept alive for every request
    assert [address for _, address, _ in tunnel.dialed] == [f"127.0.0.1:{server.port}"]


def test_https_verifies_and_keeps_alive(
    tunnel: Tunnel, tls_server: LoopbackServer, client: httpx.Client
) -> None:
    for _ in range(2):
        response = client.get(tls_server.url("/host", host="localhost"))
        assert response.text == f"localhost:{tls_server.port}"
    assert [address for _, address, _ in tunnel.dialed] == [f"localhost:{tls_server.port}"]


def test_https_with_a_ca_bundle_path_and_unverified(
    tunnel: Tunnel, tls_server: LoopbackServer, ca_bundle: str
) -> None:
    with httpx.Client(transport=TunnelTransport(tunnel.dial, verify=ca_bundle), timeout=TIMEOUT) as c:
        assert c.get(tls_server.url("/host", host="localhost")).status_code == 200
    with httpx.Client(transport=TunnelTransport(tunnel.dial), timeout=TIMEOUT) as c:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get(tls_server.url("/host", host="localhost"))
    with httpx.Client(transport=TunnelTransport(tunnel.dial, verify=False), timeout=TIMEOUT) as c:
        assert c.get(tls_server.url("/host", host="127.0.0.1")).status_code == 200


def test_hostname_mismatch_fails_and_frees_the_tunnel(
    tunnel: Tunnel, tls_server: LoopbackServer, client: httpx.Client
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get(tls_server.url("/hello", host="127.0.0.1"))
    wait_for(tunnel.idle)


def test_errors_are_httpx_errors(
    tunnel: Tunnel, server: LoopbackServer, refusing_port: int, client: httpx.Client
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.get(server.url("/slow"), timeout=httpx.Timeout(TIMEOUT, read=0.2))
    # the far side's dial was refused: a ConnectError, with the far side's text
    with pytest.raises(httpx.ConnectError, match=f"dial tcp 127.0.0.1:{refusing_port}: Connection refused"):
        client.get(f"http://127.0.0.1:{refusing_port}/")
    with pytest.raises(httpx.ConnectError, match="refused"):
        client.get(f"https://localhost:{refusing_port}/")

    def no_session(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        raise NoSessionError("failed to find Session for client foo")

    with httpx.Client(transport=TunnelTransport(no_session)) as c:
        with pytest.raises(httpx.ConnectError, match="failed to find Session for client foo"):
            c.get("http://anything.internal/")


def test_async_requests_are_refused(tunnel: Tunnel) -> None:
    class AsyncOnly(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b""

    with TunnelTransport(tunnel.dial) as transport:
        with pytest.raises(TypeError, match="sync"):
            transport.handle_request(httpx.Request("GET", "http://x/", stream=AsyncOnly()))


def test_through_the_real_server(tunnel_server: TunnelServer, server: LoopbackServer) -> None:
    """As a user would: server.dialer(key) of the WSGI server, a real client."""
    tunnel_server.client("foo")
    transport = TunnelTransport(tunnel_server.server.dialer("foo"))
    with httpx.Client(transport=transport, timeout=TIMEOUT) as c:
        assert c.get(server.url("/hello")).status_code == 200
        body = pattern(1024 * 1024)
        reply = c.post(server.url("/upload"), content=body)
        assert reply.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
