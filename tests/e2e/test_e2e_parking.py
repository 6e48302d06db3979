"""Idle tunnels parked on the poller (``Limits(park_idle=True)``, issue 24)
under each front end: werkzeug's threaded server, gunicorn's ``gthread``
worker and ours. A real client's idle tunnel parks, its reader thread (the
WSGI handler's) leaves, the poller answers its pings, and a dial through it
is served on a new reader; once the connection is closed the tunnel parks
again and that reader leaves too. The session stays listed while parked,
and ending it from the server side while parked ends it cleanly (the client
reconnects, and its new tunnel parks)."""

from __future__ import annotations

import os
from typing import Callable, Iterator, List

import pytest
import requests

from remotedialer import poller
from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from testkit.gunicorn import Gunicorn
from testkit.support import TIMEOUT, EchoServer, TunnelServer, server_readers, wait_for

WORKER = "remotedialer.workers.RemotedialerWorker"


class Front:
    """One front end serving a parking server and a client ``foo``."""

    echo: Callable[[bytes], bytes]  # bytes through the tunnel to the echo server and back
    parked: Callable[[], int]  # tunnels on the poller
    readers: Callable[[], int]  # threads reading for a tunnel
    clients: Callable[[], List[str]]  # the session manager's keys
    kick: Callable[[], None]  # end foo's sessions from the server side
    client: TunnelClient


def _through_werkzeug(echo_server: EchoServer) -> Iterator[Front]:
    server = TunnelServer(limits=Limits(park_idle=True, ping_interval=0.2))
    client = server.client("foo", limits=Limits(ping_interval=0.2))

    def echo(body: bytes) -> bytes:
        with server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
            conn.sendall(body)
            received = b""
            while len(received) < len(body):
                chunk = conn.recv(65536)
                assert chunk
                received += chunk
            return received

    def kick() -> None:
        server.server.disconnect("foo", "kicked")

    front = Front()
    front.echo = echo
    front.parked = lambda: len(poller.default())
    front.readers = server_readers
    front.clients = server.server.list_clients
    front.kick = kick
    front.client = client
    try:
        yield front
    finally:
        server.close()


def _through_gunicorn(worker: str, echo_server: EchoServer) -> Iterator[Front]:
    threads = 3 if worker == "gthread" else 1
    gunicorn = Gunicorn(worker=worker, threads=threads, env={"TESTKIT_PARK_IDLE": "1"})
    client = TunnelClient(gunicorn.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
                          backoff=Backoff(initial=0.05, maximum=0.2), limits=Limits(ping_interval=0.2))

    def echo(body: bytes) -> bytes:
        params = {"key": "foo", "address": echo_server.address}
        response = requests.post(f"{gunicorn.base}/echo", params=params, data=body, timeout=TIMEOUT * 3)
        assert response.status_code == 200, response.text
        return response.content

    def number(path: str) -> int:
        return int(requests.get(f"{gunicorn.base}{path}", timeout=TIMEOUT).text)

    front = Front()
    front.echo = echo
    front.parked = lambda: number("/parked")
    front.readers = lambda: number("/readers")
    front.clients = gunicorn.clients
    front.kick = lambda: requests.get(f"{gunicorn.base}/kick", params={"key": "foo"},
                                      timeout=TIMEOUT).raise_for_status()
    front.client = client
    client.start()
    try:
        client.wait_connected(TIMEOUT)
        wait_for(lambda: "foo" in gunicorn.clients())
        yield front
    finally:
        client.stop(TIMEOUT)
        gunicorn.stop()


@pytest.fixture(params=["werkzeug", "gthread", "remotedialer-worker"])
def front(request: pytest.FixtureRequest, echo_server: EchoServer) -> Iterator[Front]:
    if request.param == "werkzeug":
        yield from _through_werkzeug(echo_server)
    else:
        yield from _through_gunicorn("gthread" if request.param == "gthread" else WORKER, echo_server)


def _idle(front: Front) -> None:
    """Wait until foo's one tunnel is parked with no thread reading for it."""
    wait_for(lambda: front.parked() == 1 and front.readers() == 0)


def test_an_idle_tunnel_parks_without_a_thread_and_serves_dials(front: Front) -> None:
    for size in (1, 200_000):
        _idle(front)  # idle, pinging every 0.2 s: parked, and its reader gone
        assert front.clients() == ["foo"]  # still listed, and dialed:
        body = os.urandom(size)
        assert front.echo(body) == body
    _idle(front)


def test_a_parked_tunnel_ended_by_the_server_ends_cleanly(front: Front) -> None:
    _idle(front)
    ended = front.client.session
    front.kick()
    wait_for(lambda: front.client.session not in (None, ended))  # it saw its end and came back
    _idle(front)
    assert front.clients() == ["foo"]  # the old session left the table, the new one is in it
    body = os.urandom(1000)
    assert front.echo(body) == body
