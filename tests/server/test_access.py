"""A real Server (werkzeug, loopback) with a credentials store and a dial
policy, and real TunnelClient agents: 401/403/allowed handshakes, policy
refusals through dial(), the connection cap, disconnect, and a reload that
leaves open tunnels alone."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Iterator, List

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.errors import DialRefusedError, HandshakeError
from remotedialer.observer import Observer
from remotedialer.server.credentials import CredentialStore, hash_secret, new_secret

from testkit.support import TIMEOUT, EchoServer, TunnelServer, allow_all, recv_exactly, wait_for

EDGE = new_secret()
DB = new_secret()


class Counting(Observer):
    def __init__(self) -> None:
        self.refused_handshakes: List[int] = []
        self.refused_dials: List[str] = []
        self.ended: List[str] = []

    def handshake_refused(self, status: int) -> None:
        self.refused_handshakes.append(status)

    def dial_refused(self, client_key: str, reason: str) -> None:
        self.refused_dials.append(f"{client_key}:{reason}")

    def session_ended(self, session: object, reason: str) -> None:
        self.ended.append(reason)


def write(path: Path, echo_port: int, edge_cap: int = 2, edge_secret: str = EDGE) -> None:
    path.write_text(
        f"agent {hash_secret(edge_secret)} edge-*\n"
        f"agent {hash_secret(DB)} db-1\n"
        f"policy edge-* allow=127.0.0.1:{echo_port} max-connections={edge_cap} dial-timeout=5\n"
    )


@pytest.fixture
def setup(tmp_path: Path, echo_server: EchoServer) -> Iterator[tuple]:
    path = tmp_path / "credentials"
    write(path, echo_server.port)
    store = CredentialStore.load(str(path))
    observer = Counting()
    server = TunnelServer(authorizer=store.agent_authorizer, dial_policy=store.dial_policy,
                          observer=observer)
    try:
        yield server, store, path, observer, echo_server
    finally:
        server.close()


def agent(server: TunnelServer, key: str, secret: str) -> TunnelClient:
    return TunnelClient(server.url, {"X-Tunnel-ID": key, "Authorization": f"Bearer {secret}"}, allow_all)


def test_handshakes_401_403_and_allowed(setup: tuple, caplog: pytest.LogCaptureFixture) -> None:
    server, _store, _path, observer, _echo = setup
    wrong = new_secret()
    with caplog.at_level(logging.INFO, logger="remotedialer"):
        for key, secret, status in [("edge-1", wrong, 401), ("edge-1", "", 401), ("edge-1", DB, 403)]:
            with pytest.raises(HandshakeError) as info:
                agent(server, key, secret).connect_once()
            assert info.value.status == status
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused agent")]
    assert len(lines) == 3
    for line in lines:
        assert "'edge-1' from 127.0.0.1:" in line
        assert wrong not in line and DB not in line and EDGE not in line
    assert "unknown secret" in lines[0] and "missing secret" in lines[1] and "HTTP 403" in lines[2]
    assert observer.refused_handshakes == [401, 401, 403]
    assert wrong not in caplog.text and DB not in caplog.text
    server.clients.append(agent(server, "edge-1", EDGE))
    server.clients[-1].start()
    server.clients[-1].wait_connected(TIMEOUT)
    wait_for(lambda: server.server.has_session("edge-1"))


def test_policy_refuses_in_dial_and_caps_connections(setup: tuple) -> None:
    server, _store, _path, observer, echo = setup
    for key, secret in (("edge-1", EDGE), ("db-1", DB)):
        client = agent(server, key, secret)
        server.clients.append(client)
        client.start()
        client.wait_connected(TIMEOUT)
    wait_for(lambda: server.server.has_session("db-1") and server.server.has_session("edge-1"))
    dial = server.server.dial
    with pytest.raises(DialRefusedError) as info:
        dial("edge-1", "tcp", "127.0.0.1:1", TIMEOUT)  # not in the policy
    assert info.value.errno == errno.EACCES and info.value.reason == "target"
    with pytest.raises(PermissionError) as no_policy:
        dial("db-1", "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)  # no policy line for db-1
    assert no_policy.value.reason == "no-policy"  # type: ignore[attr-defined]
    first = dial("edge-1", "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)
    second = server.server.dialer("edge-1").create_connection(("127.0.0.1", echo.port), TIMEOUT)
    assert first.gettimeout() == 5  # lowered to the policy's dial-timeout
    for conn in (first, second):
        conn.sendall(b"ping")
        assert recv_exactly(conn, 4) == b"ping"
    with pytest.raises(DialRefusedError) as capped:
        dial("edge-1", "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)
    assert capped.value.reason == "max-connections"
    first.close()
    wait_for(lambda: server.server.open_connections("edge-1") == 1)
    third = dial("edge-1", "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)
    third.sendall(b"pong")
    assert recv_exactly(third, 4) == b"pong"
    assert server.server.dials_in_flight() == 0
    assert observer.refused_dials == ["edge-1:target", "db-1:no-policy", "edge-1:max-connections"]
    second.close()
    third.close()


def test_reload_applies_to_the_next_handshake_and_dial_and_keeps_tunnels(setup: tuple) -> None:
    server, store, path, observer, echo = setup
    client = agent(server, "edge-1", EDGE)
    server.clients.append(client)
    client.start()
    session = client.wait_connected(TIMEOUT)
    wait_for(lambda: server.server.has_session("edge-1"))
    rotated = new_secret()
    write(path, echo.port + 1 if echo.port < 65535 else 1, edge_secret=rotated)  # new secret, other port
    assert store.reload()
    # the open tunnel stays up, but the new policy applies to its next dial
    assert not session.closed and server.server.has_session("edge-1")
    with pytest.raises(DialRefusedError):
        server.server.dial("edge-1", "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)
    with pytest.raises(HandshakeError) as info:
        agent(server, "edge-2", EDGE).connect_once()  # the old secret is gone
    assert info.value.status == 401
    fresh = agent(server, "edge-2", rotated)
    server.clients.append(fresh)
    fresh.start()
    fresh.wait_connected(TIMEOUT)
    path.write_text("agent nonsense\n")
    assert not store.reload()  # keeps the last good file
    wait_for(lambda: server.server.has_session("edge-2"))
    assert observer.ended == []


def test_disconnect_closes_every_session_of_the_key(setup: tuple) -> None:
    server, _store, _path, _observer, _echo = setup
    clients = [agent(server, "edge-1", EDGE) for _ in range(2)]
    for client in clients:
        server.clients.append(client)
        client.start()
        client.wait_connected(TIMEOUT)
    wait_for(lambda: len(server.server.sessions("edge-1")) == 2)
    sessions = server.server.sessions("edge-1")
    assert server.server.disconnect("edge-1", "test") == 2
    for session in sessions:
        assert session.wait_closed(TIMEOUT) and session.close_reason == "test"
    assert server.server.disconnect("nobody") == 0


def test_session_counts_bytes_each_way(setup: tuple) -> None:
    server, _store, _path, _observer, echo = setup
    client = agent(server, "edge-1", EDGE)
    server.clients.append(client)
    client.start()
    client.wait_connected(TIMEOUT)
    wait_for(lambda: server.server.has_session("edge-1"))
    conn = server.server.dial("edge-1", "tcp", f"127.0.0.1:{echo.port}", TIMEOUT)
    conn.sendall(b"x" * 1000)
    assert recv_exactly(conn, 1000) == b"x" * 1000
    session = server.server.sessions("edge-1")[0]
    assert session.connection_count() == 1
    assert (session.bytes_sent, session.bytes_received) == (1000, 1000)
    conn.close()


def test_without_a_policy_every_dial_is_allowed(echo_server: EchoServer) -> None:
    server = TunnelServer()
    try:
        server.client("foo")
        assert server.server.dial_gate is None
        conn = server.server.dial("foo", "tcp", f"127.0.0.1:{echo_server.port}", TIMEOUT)
        conn.sendall(b"hi")
        assert recv_exactly(conn, 2) == b"hi"
        assert server.server.dials_in_flight() == 0 and server.server.dials_in_flight_by_key() == {}
        conn.close()
    finally:
        server.close()


def test_peer_relayed_dials_obey_the_holding_servers_policy(tmp_path: Path, echo_server: EchoServer) -> None:
    """Server B holds edge-1 under a policy; server A dials it through the
    peer link: B refuses a target its policy does not allow."""
    path = tmp_path / "credentials"
    write(path, echo_server.port)
    store = CredentialStore.load(str(path))
    a = TunnelServer(peer_id="a", peer_token="t")
    b = TunnelServer(peer_id="b", peer_token="t", dial_policy=store.dial_policy,
                     authorizer=store.agent_authorizer)
    try:
        a.server.add_peer(b.url, "b", "t")
        b.server.add_peer(a.url, "a", "t")
        client = agent(b, "edge-1", EDGE)
        b.clients.append(client)
        client.start()
        client.wait_connected(TIMEOUT)
        wait_for(lambda: "edge-1" in a.server.peering.remote_clients().get("b", []))
        ok = a.server.dial("edge-1", "tcp", f"127.0.0.1:{echo_server.port}", TIMEOUT)
        ok.sendall(b"via peer")
        assert recv_exactly(ok, 8) == b"via peer"
        refused = a.server.dial("edge-1", "tcp", "127.0.0.1:1", TIMEOUT)
        with pytest.raises(OSError) as info:
            recv_exactly(refused, 1)
        assert "not allowed" in str(info.value)
        ok.close()
    finally:
        a.close()
        b.close()



def test_disconnect_tells_the_peers(tmp_path: Path) -> None:
    """Disconnecting an agent on the server that holds it sends REMOVE_CLIENT:
    its peer stops routing the key there."""
    path = tmp_path / "credentials"
    write(path, 1)
    store = CredentialStore.load(str(path))
    a = TunnelServer(peer_id="a", peer_token="t")
    b = TunnelServer(peer_id="b", peer_token="t", authorizer=store.agent_authorizer)
    try:
        a.server.add_peer(b.url, "b", "t")
        b.server.add_peer(a.url, "a", "t")
        client = TunnelClient(b.url, {"X-Tunnel-ID": "edge-1", "Authorization": f"Bearer {EDGE}"}, allow_all,
                              backoff=Backoff(initial=30, maximum=30))  # it stays away once cut
        b.clients.append(client)
        client.start()
        client.wait_connected(TIMEOUT)
        wait_for(lambda: "edge-1" in a.server.peering.remote_clients().get("b", []))
        assert b.server.disconnect("edge-1", "test") == 1
        wait_for(lambda: "edge-1" not in a.server.peering.remote_clients().get("b", []))
    finally:
        a.close()
        b.close()
