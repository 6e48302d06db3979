"""Idle tunnels parked on the poller (``Limits(park_idle=True)``, issue 24)
under each front end: werkzeug's threaded server, gunicorn's ``gthread``
worker and ours. A real client's idle tunnel parks, answers its pings from
the poller, and a dial through it (a CONNECT arriving on the parked socket)
is served; once the connection is closed the tunnel parks again."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Tuple

import pytest
import requests

from remotedialer import poller
from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from testkit.gunicorn import Gunicorn
from testkit.support import TIMEOUT, EchoServer, TunnelServer, wait_for

WORKER = "remotedialer.workers.RemotedialerWorker"

Echo = Callable[[bytes], bytes]
"""Sends bytes through the tunnel to the echo server; what came back."""


def _through_werkzeug(echo_server: EchoServer) -> Iterator[Tuple[Echo, Callable[[], int]]]:
    server = TunnelServer(limits=Limits(park_idle=True, ping_interval=0.2))
    server.client("foo", limits=Limits(ping_interval=0.2))

    def echo(body: bytes) -> bytes:
        with server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
            conn.sendall(body)
            received = b""
            while len(received) < len(body):
                chunk = conn.recv(65536)
                assert chunk
                received += chunk
            return received

    try:
        yield echo, lambda: len(poller.default())
    finally:
        server.close()


def _through_gunicorn(worker: str, echo_server: EchoServer) -> Iterator[Tuple[Echo, Callable[[], int]]]:
    threads = 3 if worker == "gthread" else 1
    gunicorn = Gunicorn(worker=worker, threads=threads, env={"TESTKIT_PARK_IDLE": "1"})
    client = TunnelClient(gunicorn.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
                          backoff=Backoff(initial=0.05, maximum=0.2), limits=Limits(ping_interval=0.2))

    def echo(body: bytes) -> bytes:
        params = {"key": "foo", "address": echo_server.address}
        response = requests.post(f"{gunicorn.base}/echo", params=params, data=body, timeout=TIMEOUT * 3)
        assert response.status_code == 200, response.text
        return response.content

    def parked() -> int:
        return int(requests.get(f"{gunicorn.base}/parked", timeout=TIMEOUT).text)

    client.start()
    try:
        client.wait_connected(TIMEOUT)
        wait_for(lambda: "foo" in gunicorn.clients())
        yield echo, parked
    finally:
        client.stop(TIMEOUT)
        gunicorn.stop()


@pytest.fixture(params=["werkzeug", "gthread", "remotedialer-worker"])
def front(
    request: pytest.FixtureRequest, echo_server: EchoServer
) -> Iterator[Tuple[Echo, Callable[[], int]]]:
    if request.param == "werkzeug":
        yield from _through_werkzeug(echo_server)
    else:
        yield from _through_gunicorn("gthread" if request.param == "gthread" else WORKER, echo_server)


def test_an_idle_tunnel_parks_and_serves_dials(front: Tuple[Echo, Callable[[], int]]) -> None:
    echo, parked = front
    for size in (1, 200_000):
        wait_for(lambda: parked() == 1)  # idle, pinging every 0.2 s: parked
        body = os.urandom(size)
        assert echo(body) == body
