"""The two-way byte pipe of an upgraded exchange (gateway.upgrade.relay),
over socket pairs, plain and TLS."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from typing import Iterator, List, Tuple

import pytest
import trustme

from remotedialer.gateway.upgrade import IDLE_TIMEOUT, RelayError, relay
from testkit.support import TIMEOUT, recv_exactly

MiB = 1024 * 1024


class Relay:
    """``relay()`` on a thread between the near ends of two socket pairs;
    the test holds the far ends (``client`` and ``target``)."""

    def __init__(self, client_side: socket.socket, target_side: socket.socket, **kwargs: object) -> None:
        self.result: List[object] = []
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result.append(relay(client_side, target_side, **kwargs))  # type: ignore[arg-type]
            except RelayError as exc:
                self.result.append(exc)
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def outcome(self) -> object:
        assert self.done.wait(TIMEOUT), "relay did not end"
        return self.result[0]


def pairs() -> Tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(client far end, client near end, target near end, target far end)."""
    client, client_side = socket.socketpair()
    target_side, target = socket.socketpair()
    for sock in (client, target):
        sock.settimeout(TIMEOUT)
    return client, client_side, target_side, target


def test_owed_bytes_first_then_both_ways_until_the_target_ends() -> None:
    client, client_side, target_side, target = pairs()
    running = Relay(client_side, target_side, to_client=b"after-101:", to_target=b"early:")
    assert recv_exactly(client, 10) == b"after-101:"
    assert recv_exactly(target, 6) == b"early:"
    client.sendall(b"ping")
    assert recv_exactly(target, 4) == b"ping"
    target.sendall(b"pong" * 1000)
    target.shutdown(socket.SHUT_WR)  # the target ends: what it sent is delivered first
    assert recv_exactly(client, 4000) == b"pong" * 1000
    assert running.outcome() == "target closed"


def test_the_client_ends() -> None:
    client, client_side, target_side, target = pairs()
    running = Relay(client_side, target_side)
    client.sendall(b"bye")
    client.shutdown(socket.SHUT_WR)
    assert recv_exactly(target, 3) == b"bye"
    assert running.outcome() == "client closed"


def test_idle_timeout_counts_both_directions() -> None:
    client, client_side, target_side, target = pairs()
    started = time.monotonic()
    running = Relay(client_side, target_side, idle_timeout=1.0)
    for _ in range(4):  # traffic one way only keeps it alive
        time.sleep(0.3)
        target.sendall(b"t")
        assert recv_exactly(client, 1) == b"t"
    assert running.outcome() == IDLE_TIMEOUT
    assert time.monotonic() - started >= 1.2 + 1.0 * 0.9


def test_a_client_that_does_not_read_holds_the_target_back() -> None:
    client, client_side, target_side, target = pairs()
    running = Relay(client_side, target_side, idle_timeout=TIMEOUT)
    target.setblocking(False)
    accepted = 0
    deadline = time.monotonic() + 1.0
    chunk = b"x" * 65536
    while time.monotonic() < deadline and accepted < 256 * MiB:
        try:
            accepted += target.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    # socket buffers plus one read in flight, not the 256 MiB offered
    assert accepted < 32 * MiB
    client.close()  # now the relay fails writing to the client
    outcome = running.outcome()
    assert isinstance(outcome, RelayError) and outcome.side == "client"


@pytest.fixture(scope="module")
def tls() -> Iterator[Tuple[ssl.SSLContext, ssl.SSLContext]]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("target.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    yield server, client


def test_a_tls_target_both_ways_16_mib(tls: Tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    client, client_side, target_side, target = pairs()
    served: List[bytes] = []

    def tls_echo() -> None:
        with server_context.wrap_socket(target, server_side=True) as sock:
            digest = hashlib.sha256()
            while True:
                data = sock.recv(MiB)
                if not data:
                    break
                digest.update(data)
                sock.sendall(data)
            served.append(digest.digest())

    echo = threading.Thread(target=tls_echo, daemon=True)
    echo.start()
    target_side.settimeout(TIMEOUT)
    upstream = client_context.wrap_socket(target_side, server_hostname="target.test")
    running = Relay(client_side, upstream, idle_timeout=TIMEOUT)
    payload = os.urandom(16 * MiB)
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    sender.start()
    assert hashlib.sha256(recv_exactly(client, len(payload))).digest() == hashlib.sha256(payload).digest()
    sender.join(TIMEOUT)
    client.shutdown(socket.SHUT_WR)
    assert running.outcome() == "client closed"
    upstream.close()
    echo.join(TIMEOUT)
    assert served == [hashlib.sha256(payload).digest()]
