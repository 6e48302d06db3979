"""Many tunnels in one process: descriptors past 1023, timers that cost
nothing between deadlines, peering and metrics with many clients.

The full-size runs (10,000 tunnels) are the ``agents`` benchmark
(``python -m benchmarks --only agents``); these are the CI-sized checks.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any, Callable, Counter, Dict, Iterator, List

import pytest

from remotedialer.client import TunnelClient
from remotedialer.config import Limits
from remotedialer.errors import NoSessionError
from remotedialer.frames import OP_PING, OP_PONG, FrameReader, encode_masked_frame
from remotedialer.ha.peering import PEER_ID_HEADER, PEER_TOKEN_HEADER
from testkit.fleet import CANNED_RESPONSE, Fleet
from testkit.metrics import metrics_with_clients

from testkit.support import (
    TIMEOUT,
    AcceptingHandler,
    EchoServer,
    TunnelServer,
    echo_concurrently,
    raw_upgrade,
    recv_exactly,
    wait_for,
)

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


#: Short keepalive limits: a tunnel must live through several deadlines
#: (six pings per deadline leave room for a loaded CI machine).
SHORT = Limits(ping_interval=0.25, read_deadline=1.5)
DEADLINES = 3


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


def test_example_server_thread_cap_follows_the_descriptor_limit() -> None:
    """The example server's thread cap no longer stops it at ~1,000 tunnels:
    with 20,000 descriptors it serves 10,000 tunnels and more."""
    from remotedialer.server.process import DEFAULT_MAX_THREADS, default_max_threads

    assert default_max_threads(20000) >= 10000 + 1000
    assert default_max_threads(20000) < 20000  # descriptors kept for the rest
    assert default_max_threads(0) == DEFAULT_MAX_THREADS  # unknown limit
    assert default_max_threads(100) >= 64


# ------------------------------------------------------------------ fleets
class FleetThread:
    """A :class:`~testkit.fleet.Fleet` run on a thread of the test."""

    def __init__(self, port: int, count: int, **options: Any) -> None:
        self.fleet = Fleet("127.0.0.1", port, count, report_interval=0.2, **options)
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self.fleet.run, args=(self._emit,), daemon=True)
        self.thread.start()

    def _emit(self, record: Dict[str, object]) -> None:
        if record.get("event") == "opened":
            self.opened.set()

    @property
    def stats(self) -> Counter:  # type: ignore[type-arg]
        return self.fleet.stats

    def wait_opened(self) -> None:
        assert self.opened.wait(6 * TIMEOUT), f"not every agent opened: {self.fleet.status()}"

    def stop(self) -> None:
        self.fleet.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


AGENTS = 300
PEER_TOKEN = "scale-token"


def test_reconnect_storm_every_agent_is_back(make_tunnel_server: Callable[..., TunnelServer]) -> None:
    """The server goes away under 300 agents and comes back on the same
    port: every agent reconnects (all at once, within a second of jitter),
    the new server holds every tunnel, and no handshake is refused once it
    is up."""
    first = make_tunnel_server()
    port = first.port
    fleet = FleetThread(port, AGENTS, reconnect=True)
    try:
        fleet.wait_opened()
        wait_for(lambda: len(first.server.session_manager) == AGENTS)
        first.close()
        wait_for(lambda: fleet.stats["dropped"] == AGENTS)
        refused_while_down = fleet.stats["failed"]
        second = make_tunnel_server(port=port)
        wait_for(lambda: fleet.stats["open"] == AGENTS, timeout=6 * TIMEOUT)
        wait_for(lambda: len(second.server.session_manager) == AGENTS)
        assert fleet.stats["opened"] == 2 * AGENTS
        keys = second.server.list_clients()
        assert keys == sorted(f"agent-{i}" for i in range(AGENTS))
        # refused only while nothing listened (connection refused), never by the new server
        failed_after = fleet.stats["failed"] - refused_while_down
        assert failed_after <= AGENTS  # at most one refused attempt each, racing the listener
        assert fleet.stats["pongs"] > 0
    finally:
        fleet.stop()


def test_peer_link_announcing_ten_thousand_clients() -> None:
    """A peer link announces 10,000 clients in one burst: the server routes a
    dial to the 10,000th through it, and 10,000 REMOVE_CLIENTs take them all
    away again."""
    server = TunnelServer(peer_id="A", peer_token=PEER_TOKEN)
    server.server.peering.accept_peer("P", PEER_TOKEN)
    handler = AcceptingHandler()
    peer = TunnelClient(server.url, {PEER_ID_HEADER: "P", PEER_TOKEN_HEADER: PEER_TOKEN},
                        connect_handler=handler, client_key="P")
    peer.start()
    try:
        session = peer.wait_connected(TIMEOUT)
        for index in range(10_000):
            session.send_client_added(f"agent-{index}", index)
        peering = server.server.peering

        def advertised() -> int:
            return len(peering.remote_clients().get("P", []))

        wait_for(lambda: advertised() == 10_000, timeout=6 * TIMEOUT, interval=0.1)
        with server.server.dial("agent-9999", "tcp", "127.0.0.1:8080", timeout=TIMEOUT) as conn:
            far = handler.next()
            assert (far.proto, far.address) == ("agent-9999::tcp", "127.0.0.1:8080")
            conn.sendall(b"routed")
            far.settimeout(TIMEOUT)
            assert far.recv(6) == b"routed"
            far.close()
        for index in range(10_000):
            session.send_client_removed(f"agent-{index}", index)
        wait_for(lambda: advertised() == 0, timeout=6 * TIMEOUT, interval=0.1)
        with pytest.raises(NoSessionError):
            server.server.dial("agent-9999", "tcp", "127.0.0.1:8080", timeout=TIMEOUT)
    finally:
        peer.stop(TIMEOUT)
        server.close()


def test_peering_announces_every_agent_and_mass_disconnect_removes_them() -> None:
    """300 agents on server A, then A and B peer: the ADD_CLIENT burst at
    link start tells B about all of them, B's dial to the last agent is
    routed through A to it, and when every agent drops at once B hears a
    REMOVE_CLIENT for each."""
    a = TunnelServer(peer_id="A", peer_token=PEER_TOKEN)
    b = TunnelServer(peer_id="B", peer_token=PEER_TOKEN)
    fleet = FleetThread(a.port, AGENTS, answering=AGENTS)
    try:
        fleet.wait_opened()
        wait_for(lambda: len(a.server.session_manager) == AGENTS)
        a.server.add_peer(b.url, "B", PEER_TOKEN)
        b.server.add_peer(a.url, "A", PEER_TOKEN)
        wait_for(lambda: len(b.server.peering.remote_clients().get("A", [])) == AGENTS,
                 timeout=6 * TIMEOUT, interval=0.05)
        last = f"agent-{AGENTS - 1}"
        with b.server.dial(last, "tcp", "127.0.0.1:9", timeout=TIMEOUT) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(TIMEOUT)
            assert recv_exactly(conn, len(CANNED_RESPONSE)) == CANNED_RESPONSE
        fleet.stop()
        wait_for(lambda: not b.server.peering.remote_clients().get("A"), timeout=6 * TIMEOUT, interval=0.05)
        with pytest.raises(NoSessionError):
            b.server.dial(last, "tcp", "127.0.0.1:9", timeout=TIMEOUT)
    finally:
        fleet.stop()
        a.close()
        b.close()


def test_metrics_scrape_with_thousands_of_client_keys() -> None:
    """/metrics renders every one of 3,000 client keys, the same bytes as
    prometheus_client's own rendering (10,000 and the CPU it takes are a
    benchmark figure: ``python -m benchmarks.metrics_scrape``)."""
    from prometheus_client import generate_latest

    from remotedialer.metrics import make_wsgi_app

    registry, sessions = metrics_with_clients(3000)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    text = b"".join(make_wsgi_app(registry)(environ, lambda status, headers: None)).decode()
    live = [line for line in text.splitlines() if line.startswith("remotedialer_sessions{")]
    assert len(live) == 3000
    assert 'clientkey="agent-2999"' in text
    assert text == generate_latest(registry).decode()
    assert len(sessions) == 3000


def test_example_server_lengthens_the_switch_interval() -> None:
    """Thousands of tunnel threads waiting for the GIL each wake once per
    switch interval: the example server lengthens it (past ~6,000 tunnels
    the default 5 ms stopped it accepting and answering pings)."""
    import sys

    from remotedialer.server.process import SWITCH_INTERVAL, tune_interpreter_for_many_threads

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        tune_interpreter_for_many_threads()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
        sys.setswitchinterval(1.0)
        tune_interpreter_for_many_threads()  # never shortened
        assert sys.getswitchinterval() == pytest.approx(1.0)
    finally:
        sys.setswitchinterval(before)
