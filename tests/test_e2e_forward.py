"""Port forwarding end to end: a real Server under werkzeug with real tunnel
clients over loopback WebSockets, and real processes (``remotedialer server
--forward`` and ``remotedialer client``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, List, Optional, Tuple

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.forward import PortForward
from remotedialer.piping import Piper

from .conftest import TIMEOUT, TunnelServer, wait_for
from .test_forward import (
    MiB,
    SelectorEchoServer,
    SourceServer,
    payload,
    recv_exactly,
    recv_to_end,
)


def connect(address: Tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT)
    return sock


def echo_both_ways(address: Tuple[str, int], data: bytes) -> bytes:
    """Write ``data`` on one thread while reading its echo on this one."""
    with connect(address) as sock:
        errors: List[BaseException] = []

        def write() -> None:
            try:
                sock.sendall(data)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        got = recv_exactly(sock, len(data))
        writer.join(TIMEOUT)
        assert not errors and not writer.is_alive()
        return got


def wait_forward_ready(address: Tuple[str, int]) -> None:
    """Poll (with a deadline) until a connection through the forward echoes:
    until then the client is absent and connections are closed at once."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with connect(address) as sock:
                sock.sendall(b"?")
                if sock.recv(1) == b"?":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"forward {address} never became ready")
        time.sleep(0.02)


# ------------------------------------------------------------- in-process
class InProcess:
    """A real Server (werkzeug, loopback, port 0) and a real TunnelClient
    ``foo``, each with its own piper."""

    def __init__(self) -> None:
        self.server_piper = Piper("e2e-server-piper")
        self.client_piper = Piper("e2e-client-piper")
        self.tunnel = TunnelServer(piper=self.server_piper)
        self.client: Optional[TunnelClient] = None
        self.forwards: List[PortForward] = []

    def start_client(self) -> TunnelClient:
        client = TunnelClient(
            self.tunnel.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
            backoff=Backoff(initial=0.05, maximum=0.2), piper=self.client_piper,
        )
        client.start()
        client.wait_connected(TIMEOUT)
        wait_for(lambda: self.tunnel.server.has_session("foo"))
        self.client = client
        return client

    def forward(self, address: str) -> PortForward:
        fwd = self.tunnel.server.forward(("127.0.0.1", 0), "foo", "tcp", address, dial_timeout=TIMEOUT)
        self.forwards.append(fwd)
        return fwd

    def close(self) -> None:
        for fwd in self.forwards:
            fwd.stop(timeout=TIMEOUT)
        if self.client is not None:
            self.client.stop(TIMEOUT)
        self.tunnel.close()
        self.client_piper.stop()
        self.server_piper.stop()


@pytest.fixture
def live() -> Iterator[InProcess]:
    env = InProcess()
    yield env
    env.close()


@pytest.fixture
def echo() -> Iterator[SelectorEchoServer]:
    server = SelectorEchoServer()
    yield server
    server.close()


def test_server_forward_multi_mib_both_ways(live: InProcess, echo: SelectorEchoServer) -> None:
    live.start_client()
    fwd = live.forward(echo.address)
    data = payload(16 * MiB, 11)
    assert echo_both_ways(fwd.address, data) == data
    wait_for(lambda: fwd.active == 0)


def test_server_forward_many_connections_bounded_threads(
    live: InProcess, echo: SelectorEchoServer
) -> None:
    live.start_client()
    fwd = live.forward(echo.address)
    wait_forward_ready(fwd.address)
    count = 200
    baseline = threading.active_count()
    peak = baseline
    socks: List[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(connect(fwd.address))
        messages = [payload(2048, 200 + i) for i in range(count)]
        for sock, message in zip(socks, messages):
            sock.sendall(message)
        for sock, message in zip(socks, messages):
            assert recv_exactly(sock, len(message)) == message
            peak = max(peak, threading.active_count())
        wait_for(lambda: fwd.active == count)
        peak = max(peak, threading.active_count())
        assert peak - baseline <= 16 + 2, (baseline, peak)  # the client's dial pool, at most
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: fwd.active == 0)
    wait_for(lambda: not live.tunnel.server.sessions("foo")[0].connections())


def test_client_disconnect_mid_transfer_closes_forwarded_connections(live: InProcess) -> None:
    source = SourceServer(payload(1 * MiB, 12), hold=True)  # streams forever
    try:
        client = live.start_client()
        fwd = live.forward(source.address)
        socks = [connect(fwd.address) for _ in range(8)]
        for sock in socks:
            recv_exactly(sock, 200_000)
        wait_for(lambda: fwd.active == 8)
        client.stop(TIMEOUT)
        for sock in socks:
            with sock:
                recv_to_end(sock)  # EOF within TIMEOUT, not a hang
        wait_for(lambda: fwd.active == 0)
        assert source.peer_closed.wait(TIMEOUT)  # the far side closed its target too
    finally:
        source.close()


def test_client_absent_closes_accepted_connection_at_once(
    live: InProcess, echo: SelectorEchoServer
) -> None:
    fwd = live.forward(echo.address)  # no client has connected
    for _ in range(3):
        with connect(fwd.address) as sock:
            assert recv_to_end(sock)[0] == b""
    assert fwd.failed == 3
    live.start_client()  # once it is there, the same forward works
    wait_forward_ready(fwd.address)
    assert echo_both_ways(fwd.address, b"late") == b"late"
