"""Many tunnels in one process: descriptors past 1023, timers that cost
nothing between deadlines, peering and metrics with many clients.

The full-size runs (10,000 tunnels) are the ``agents`` benchmark
(``python -m benchmarks --only agents``); these are the CI-sized checks.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Callable, Iterator, List

import pytest

from remotedialer.config import Limits
from remotedialer.frames import OP_PING, OP_PONG, FrameReader, encode_masked_frame

from .support import TIMEOUT, EchoServer, TunnelServer, echo_concurrently, raw_upgrade, wait_for

#: Descriptors are pushed past this before a tunnel opens (select() fails from 1024).
HIGH_DESCRIPTOR = 1100


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    """Occupy every descriptor up to :data:`HIGH_DESCRIPTOR` (raising the soft
    open-files limit within the hard one if needed), so that every socket
    opened in the test gets a number above 1023; all freed afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HIGH_DESCRIPTOR + 500
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the hard open-files limit ({hard}) is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held: List[int] = []
    try:
        with open(os.devnull, "rb") as null:
            while not held or held[-1] < HIGH_DESCRIPTOR:
                held.append(os.dup(null.fileno()))  # the lowest free number each time
        yield
    finally:
        for fd in held:
            os.close(fd)
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


#: Short keepalive limits: a tunnel must live through several deadlines.
SHORT = Limits(ping_interval=0.1, read_deadline=0.5)
DEADLINES = 4


def test_server_answers_pings_on_descriptors_past_1023(
    high_descriptors: None, make_tunnel_server: Callable[..., TunnelServer]
) -> None:
    """The server answers every ping and keeps the tunnel through several
    read deadlines when its socket's descriptor is above 1023 (select()
    raised ValueError there, the pong was never sent, and the tunnel was cut
    at the first deadline)."""
    server = make_tunnel_server(limits=SHORT)
    sock = raw_upgrade(server.port, "high")
    try:
        assert sock.fileno() > 1023
        wait_for(lambda: server.server.sessions("high"))
        session = server.server.sessions("high")[0]
        pings = pongs = 0
        reader = FrameReader(1 << 20, from_client=False)
        ends = time.monotonic() + DEADLINES * SHORT.read_deadline
        while time.monotonic() < ends:
            sock.sendall(bytes(encode_masked_frame(OP_PING, b"%d" % pings)))
            pings += 1
            deadline = time.monotonic() + TIMEOUT
            while pongs < pings:
                assert time.monotonic() < deadline, f"no pong for ping {pings}"
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the tunnel: {session.close_reason}"
                reader.feed(chunk)
                for opcode, _ in iter(reader.next_event, None):
                    pongs += opcode == OP_PONG
            time.sleep(SHORT.ping_interval)  # the agent's ping rhythm
        assert not session.closed, session.close_reason
        assert server.server.sessions("high") == [session]
    finally:
        sock.close()


def test_client_keeps_its_tunnel_on_descriptors_past_1023(
    high_descriptors: None, make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    """A client whose socket's descriptor is above 1023 pings, is answered
    and keeps one tunnel through several read deadlines (its ping's select()
    raised ValueError and ended the session), and dials still work."""
    server = make_tunnel_server(limits=SHORT)
    client = server.client("high", limits=SHORT)
    session = client.wait_connected(TIMEOUT)
    transport = session.transport
    ws_sock = transport.ws.sock  # type: ignore[attr-defined]
    assert ws_sock.fileno() > 1023
    server_session = server.server.sessions("high")[0]
    first_keepalive = transport.last_keepalive
    time.sleep(DEADLINES * SHORT.read_deadline)  # the span under test, not synchronisation
    assert not session.closed, session.close_reason
    assert client.session is session
    assert transport.last_keepalive > first_keepalive  # pongs arrived
    assert server.server.sessions("high") == [server_session] and not server_session.closed
    with server.server.dial("high", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
        assert echo_concurrently(conn, b"past 1023" * 1000) == b"past 1023" * 1000
