"""Run the socket conformance suite against sockets and tunneled connections."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest

from remotedialer.bridge import as_socket
from remotedialer.config import Limits
from remotedialer.piping import LocalDialer, Piper

from .conftest import TIMEOUT, SessionPair, wait_for
from .socket_conformance import *  # noqa: F401,F403  (the tests)
from .socket_conformance import Pair

KiB = 1024
# Small thresholds so that backpressure shows up after little data.
TUNNEL_LIMITS = Limits(
    pause_threshold=256 * KiB, resume_threshold=32 * KiB, hard_buffer_limit=8192 * KiB,
)


def _tcp_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(TIMEOUT)
    return listener


@pytest.fixture(params=["socketpair", "tcp", "tunnel", "as_socket"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    kind = request.param
    closers = []
    if kind == "socketpair":
        a, b = socket.socketpair()
        closers += [a.close, b.close]
        result = Pair(kind, a, b)
    elif kind == "tcp":
        listener = _tcp_listener()
        a = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        b, _ = listener.accept()
        listener.close()
        closers += [a.close, b.close]
        result = Pair(kind, a, b)
    else:
        listener = _tcp_listener()
        piper = Piper("conformance-piper")
        dialer = LocalDialer(lambda proto, address: True, limits=TUNNEL_LIMITS, piper=piper)
        sessions = SessionPair(limits=TUNNEL_LIMITS, connect_handler=dialer)
        host, port = listener.getsockname()
        a = sessions.server.dial("tcp", f"{host}:{port}", timeout=TIMEOUT)
        b, _ = listener.accept()
        listener.close()

        def teardown() -> None:
            sessions.close()
            piper.stop()
            dialer.shutdown()
            wait_for(lambda: piper.active_pipes == 0)

        if kind == "as_socket":
            a = as_socket(a, piper)  # a real socket bridged to the tunneled connection
        closers += [a.close, b.close, teardown]
        result = Pair(kind, a, b)
    result.b.settimeout(TIMEOUT)
    result.a.settimeout(TIMEOUT)
    yield result
    for close in closers:
        close()
