"""Fixtures of the HTTP client integrations' tests (requests, httpx,
httpcore): loopback HTTP(S) targets, a test CA, and the tunnel to them (the
helpers behind them: testkit.http_targets)."""

from __future__ import annotations

import socket
import ssl
from typing import Iterator

import pytest
import trustme

from testkit.http_targets import LoopbackServer, Tunnel, tls_context


@pytest.fixture
def tunnel() -> Iterator[Tunnel]:
    t = Tunnel()
    yield t
    t.close()


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client TLS context trusting the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[LoopbackServer]:
    srv = LoopbackServer(tls_context(ca))
    yield srv
    srv.stop()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()
