"""Run the socket conformance suite against sockets and tunneled connections."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest

from remotedialer.bridge import as_socket
from remotedialer.config import Limits

from testkit.support import TIMEOUT, LocalDialTunnel, dial_and_accept, wait_for
from testkit.conformance import *  # noqa: F401,F403  (the tests)
from testkit.conformance import Pair

KiB = 1024
# Small thresholds so that backpressure shows up after little data.
TUNNEL_LIMITS = Limits(
    pause_threshold=256 * KiB, resume_threshold=32 * KiB, hard_buffer_limit=8192 * KiB,
)


def _tcp_connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


@pytest.fixture(params=["socketpair", "tcp", "tunnel", "as_socket"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    kind = request.param
    closers = []
    if kind == "socketpair":
        a, b = socket.socketpair()
        closers += [a.close, b.close]
        result = Pair(kind, a, b)
    elif kind == "tcp":
        a, b = dial_and_accept(_tcp_connect)
        closers += [a.close, b.close]
        result = Pair(kind, a, b)
    else:
        tunnel = LocalDialTunnel(limits=TUNNEL_LIMITS, name="conformance-piper")
        conn, b = dial_and_accept(tunnel.dial)

        def teardown() -> None:
            tunnel.close()
            wait_for(lambda: tunnel.piper.active_pipes == 0)

        # as_socket: a real socket bridged to the tunneled connection
        a = as_socket(conn, tunnel.piper) if kind == "as_socket" else conn
        closers += [a.close, b.close, teardown]
        result = Pair(kind, a, b, break_link=lambda: tunnel.pair.client.close("link lost"))
    result.b.settimeout(TIMEOUT)
    result.a.settimeout(TIMEOUT)
    yield result
    for close in closers:
        close()
