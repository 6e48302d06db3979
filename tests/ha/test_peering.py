"""Peering between servers (remotedialer.ha.peering) over real loopback WebSockets."""

from __future__ import annotations

import logging
import re
from typing import Iterator, List

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.errors import NoSessionError, RemoteError
from remotedialer.ha.peering import PeerSpec, parse_peers, peer_ssl_context

from testkit.support import TIMEOUT, EchoServer, TunnelServer, recv_up_to, wait_for

TOKEN = "s3cret-peer-token"
FAST = Backoff(initial=0.05, maximum=0.2)


def echo_through(conn_factory: object, payload: bytes = b"ping through the mesh") -> bytes:
    conn = conn_factory()  # type: ignore[operator]
    with conn:
        conn.settimeout(TIMEOUT)
        conn.sendall(payload)
        return recv_up_to(conn, len(payload))


@pytest.fixture
def mesh() -> Iterator[List[TunnelServer]]:
    """Three servers A, B, C, each peered with the other two."""
    servers = [TunnelServer(peer_id=name, peer_token=TOKEN) for name in ("A", "B", "C")]
    for server in servers:
        server.server.peering.backoff = FAST
    for server in servers:
        for other in servers:
            if other is not server:
                server.server.add_peer(other.url, other.server.peer_id, TOKEN)
    for server in servers:
        wait_for(lambda s=server: all(link.connected for link in s.server.peering.links()))
    yield servers
    for server in servers:
        server.close()


def connect_client(server: TunnelServer, key: str = "foo") -> TunnelClient:
    client = TunnelClient(server.url, {"X-Tunnel-ID": key}, lambda proto, address: True, backoff=FAST)
    client.start()
    client.wait_connected(TIMEOUT)
    return client


def test_parse_peers_keeps_colons_of_the_url() -> None:
    specs = parse_peers("b:tok:ws://127.0.0.1:8124/connect, c:tok2:wss://[::1]:9/x")
    assert specs == [
        PeerSpec("b", "tok", "ws://127.0.0.1:8124/connect"),
        PeerSpec("c", "tok2", "wss://[::1]:9/x"),
    ]
    assert "tok" not in repr(specs[0])
    with pytest.raises(ValueError):
        parse_peers("b:ws")


def test_a_request_on_any_server_reaches_a_client_held_by_another(
    mesh: List[TunnelServer], echo_server: EchoServer
) -> None:
    a, b, c = mesh
    client = connect_client(a)
    try:
        # B and C each learn of A's client by an ADD_CLIENT of their own
        wait_for(lambda: all("foo" in s.server.peering.remote_clients().get("A", []) for s in (b, c)))
        assert not c.server.has_session("foo")
        for server in (a, b, c):
            got = echo_through(lambda s=server: s.server.dial("foo", "tcp", echo_server.address, TIMEOUT))
            assert got == b"ping through the mesh"
    finally:
        client.stop()


def test_relayed_transfer_is_byte_exact_both_ways(mesh: List[TunnelServer], echo_server: EchoServer) -> None:
    a, _b, c = mesh
    client = connect_client(a)
    try:
        wait_for(lambda: c.server.peering.peers_for("foo"))
        payload = bytes(range(256)) * 12288  # 3 MiB
        dial = lambda: c.server.dial("foo", "tcp", echo_server.address, TIMEOUT)  # noqa: E731
        assert echo_through(dial, payload) == payload
    finally:
        client.stop()


def test_client_moving_to_another_server_is_followed(
    mesh: List[TunnelServer], echo_server: EchoServer
) -> None:
    a, b, c = mesh
    client = connect_client(a)
    client.stop()
    # REMOVE_CLIENT reaches the peers: no more routing to A for foo.
    wait_for(lambda: not c.server.peering.peers_for("foo"))
    with pytest.raises(NoSessionError):
        c.server.dial("foo", "tcp", echo_server.address, TIMEOUT)
    moved = connect_client(b)
    try:
        wait_for(lambda: "foo" in c.server.peering.remote_clients().get("B", []))
        assert "foo" not in c.server.peering.remote_clients().get("A", [])
        got = echo_through(lambda: c.server.dial("foo", "tcp", echo_server.address, TIMEOUT))
        assert got == b"ping through the mesh"
    finally:
        moved.stop()


def test_peer_that_dies_and_comes_back(echo_server: EchoServer) -> None:
    a = TunnelServer(peer_id="A", peer_token=TOKEN)
    c = TunnelServer(peer_id="C", peer_token=TOKEN)
    a.server.peering.backoff = c.server.peering.backoff = FAST
    try:
        a.server.add_peer(c.url, "C", TOKEN)
        c.server.add_peer(a.url, "A", TOKEN)
        client = connect_client(a)
        wait_for(lambda: c.server.peering.peers_for("foo"))
        # Kill every peer session C holds for A: the link must come back on its own.
        for session in c.server.peer_sessions.sessions("A"):
            session.close("test: peer link cut")
        wait_for(lambda: c.server.peering.peers_for("foo"))
        got = echo_through(lambda: c.server.dial("foo", "tcp", echo_server.address, TIMEOUT))
        assert got == b"ping through the mesh"
        client.stop()
    finally:
        a.close()
        c.close()


def test_relay_to_a_client_the_peer_no_longer_has_fails_cleanly(mesh: List[TunnelServer]) -> None:
    a, _b, c = mesh
    client = connect_client(a)
    try:
        wait_for(lambda: c.server.peering.peers_for("foo"))
        # Pretend A still advertises a key it does not hold.
        peer_session = c.server.peering.peers_for("foo")[0]
        c.server.peering.on_client_change(peer_session, True, "ghost", 1)
        conn = c.server.dial("ghost", "tcp", "127.0.0.1:9", TIMEOUT)
        with pytest.raises(RemoteError, match="failed to find Session for client ghost"):
            conn.recv(10)
    finally:
        client.stop()


def test_wrong_token_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    a = TunnelServer(peer_id="A", peer_token=TOKEN)
    b = TunnelServer(peer_id="B", peer_token="other-token")
    a.server.peering.backoff = FAST
    try:
        with caplog.at_level(logging.DEBUG):
            # Each link presents its own server's token: A's link shows TOKEN,
            # which B expects of A; B's link shows "other-token", but A expects TOKEN.
            # A knows B before B's link starts (else that link may first meet
            # "unknown peer id").
            a.server.peering.accept_peer("B", TOKEN)
            b.server.add_peer(a.url, "A", TOKEN)
            a.server.add_peer(b.url, "B", TOKEN)
            a_link, b_link = a.server.peering.links()[0], b.server.peering.links()[0]
            wait_for(lambda: a_link.connected)
            wait_for(lambda: b_link.client.last_error is not None)
        assert getattr(b_link.client.last_error, "status", None) == 401
        # the dialing side (B) says which peer refused it and why, in one line
        dialing = [r.getMessage() for r in caplog.records if r.name == "remotedialer.client"
                   and r.getMessage().startswith(f"failed to connect to {a.url}")]
        assert dialing and all(
            "peer A refused our peer link as B: handshake refused: HTTP 401" in line
            and "its --token differs from ours, or it does not list B among its peers" in line
            and "\n" not in line for line in dialing
        ), dialing
        assert not a.server.peer_sessions.sessions("B")
        assert TOKEN not in caplog.text and "other-token" not in caplog.text
        refusals = [r.getMessage() for r in caplog.records if r.name == "remotedialer.server.tunnel_server"
                    and r.getMessage().startswith("refused")]
        assert refusals and all(
            re.fullmatch(r"refused peer link from 127\.0\.0\.1:\d+: peer B: token mismatch", line)
            for line in refusals
        ), refusals
    finally:
        a.close()
        b.close()


def test_unknown_peer_id_is_named(caplog: pytest.LogCaptureFixture) -> None:
    a = TunnelServer(peer_id="A", peer_token=TOKEN)
    stranger = TunnelServer(peer_id="Z", peer_token=TOKEN)
    stranger.server.peering.backoff = FAST
    try:
        with caplog.at_level(logging.INFO, logger="remotedialer.server"):
            stranger.server.add_peer(a.url, "A", TOKEN)  # A does not know Z
            link = stranger.server.peering.links()[0]
            wait_for(lambda: link.client.last_error is not None)
            wait_for(lambda: any("peer Z" in r.getMessage() for r in caplog.records))
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert re.fullmatch(r"refused peer link from 127\.0\.0\.1:\d+: peer Z: unknown peer id", lines[0])
        assert a.server.peering.refusal({"X-API-Tunnel-ID": "Z"}) == "peer Z: no token"
        assert a.server.peering.refusal({"X-Tunnel-ID": "client"}) is None
    finally:
        a.close()
        stranger.close()


def test_peering_needs_an_identity() -> None:
    server = TunnelServer()
    try:
        with pytest.raises(ValueError):
            server.server.add_peer("ws://127.0.0.1:1/connect", "B", TOKEN)
    finally:
        server.close()


def test_peer_links_ignore_the_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Go's peer dialer has no Proxy: peers inside a cluster connect directly
    even where the agents' HTTP_PROXY/HTTPS_PROXY are set for the server pods."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    server = TunnelServer(peer_id="A", peer_token=TOKEN)
    try:
        assert TunnelClient("ws://peer-b.cluster.test:8123/connect").proxy is not None  # agents use them
        server.server.add_peer("ws://peer-b.cluster.test:8123/connect", "B", TOKEN)
        link = server.server.peering.links()[0]
        assert link.client.proxy is None
    finally:
        server.close()


def test_peer_tls_verifies_by_default() -> None:
    assert peer_ssl_context() is None  # websocket-client's default: verify
    insecure = peer_ssl_context(verify=False)
    assert insecure is not None and not insecure.check_hostname


def test_peer_links_report_to_the_observer() -> None:
    from remotedialer.observer import Observer

    class Recorder(Observer):
        def __init__(self) -> None:
            self.events: List[str] = []

        def peer_connecting(self, peer_id: str) -> None:
            self.events.append(f"connecting {peer_id}")

        def peer_connected(self, peer_id: str) -> None:
            self.events.append(f"connected {peer_id}")

        def peer_disconnected(self, peer_id: str) -> None:
            self.events.append(f"disconnected {peer_id}")

    recorder = Recorder()
    a = TunnelServer(peer_id="A", peer_token=TOKEN, observer=recorder)
    b = TunnelServer(peer_id="B", peer_token=TOKEN)
    try:
        b.server.add_peer(a.url, "A", TOKEN)
        a.server.add_peer(b.url, "B", TOKEN)
        wait_for(lambda: "connected B" in recorder.events)
        a.server.remove_peer("B")
        wait_for(lambda: "disconnected B" in recorder.events)
        assert recorder.events[:2] == ["connecting B", "connected B"]
    finally:
        a.close()
        b.close()


class TLSPeerServer:
    """A peering Server under werkzeug over TLS with a trustme certificate."""

    def __init__(self, ca: "object", peer_id: str, **options: object) -> None:
        import ssl
        import threading

        from werkzeug.serving import make_server

        from remotedialer.server import Server

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)  # type: ignore[attr-defined]
        self.server = Server(lambda request: ("", False), peer_id=peer_id, peer_token=TOKEN,
                             **options)  # type: ignore[arg-type]
        self.httpd = make_server("127.0.0.1", 0, self.server, threaded=True, ssl_context=context)
        self.url = f"wss://127.0.0.1:{self.httpd.server_port}/connect"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.close()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_wss_peer_links_verify_certificates(caplog: pytest.LogCaptureFixture) -> None:
    import trustme

    ca = trustme.CA()
    b = TLSPeerServer(ca, "B")
    untrusting = TunnelServer(peer_id="A", peer_token=TOKEN)
    untrusting.server.peering.backoff = FAST
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pem") as bundle:
        ca.cert_pem.write_to_path(bundle.name)
        trusting = TunnelServer(peer_id="A2", peer_token=TOKEN,
                                peer_ssl_context=peer_ssl_context(ca_file=bundle.name))
    try:
        b.server.add_peer(untrusting.url, "A", TOKEN)
        b.server.add_peer(trusting.url, "A2", TOKEN)
        with caplog.at_level(logging.WARNING):
            untrusting.server.add_peer(b.url, "B", TOKEN)
            link = untrusting.server.peering.links()[0]
            wait_for(lambda: link.client.last_error is not None)
        assert "CERTIFICATE_VERIFY_FAILED" in str(link.client.last_error)
        assert not b.server.peer_sessions.sessions("A")
        trusting.server.add_peer(b.url, "B", TOKEN)
        wait_for(lambda: b.server.peer_sessions.has_session("A2"))
    finally:
        untrusting.close()
        trusting.close()
        b.close()


def test_peering_is_built_from_what_it_uses_without_a_server() -> None:
    """``Peering`` needs two session tables and a piper, not a ``Server``."""
    from remotedialer.ha.peering import PEER_ID_HEADER, PEER_TOKEN_HEADER, Peering
    from remotedialer.piping import Piper
    from remotedialer.server.sessions import SessionManager

    peering = Peering(SessionManager(), SessionManager(), Piper(), peer_id="A", peer_token=TOKEN)
    try:
        peering.accept_peer("B", TOKEN)
        assert peering.authenticate({PEER_ID_HEADER: "B", PEER_TOKEN_HEADER: TOKEN}) == "B"
        assert peering.authenticate({PEER_ID_HEADER: "B", PEER_TOKEN_HEADER: "wrong"}) is None
        assert peering.dial("foo", "tcp", "127.0.0.1:1", TIMEOUT) is None  # no peer has foo
    finally:
        peering.close()
    with pytest.raises(ValueError, match="peer_id and peer_token"):
        Peering(SessionManager(), SessionManager(), Piper()).add_peer("ws://127.0.0.1:1/", "B", TOKEN)


def test_server_uses_the_peering_layer_it_is_given() -> None:
    """A server built with another peering layer talks to it alone; the
    default is the package's Peering, built for that server."""
    from remotedialer.ha.peering import PEER_ID_HEADER, PEER_TOKEN_HEADER, Peering
    from remotedialer.server import Server
    from remotedialer.server.tunnel_server import NoPeering

    server = Server(lambda request: ("", False), peering=lambda _server: NoPeering())
    try:
        assert isinstance(server.peering, NoPeering) and server.peer_router is server.peering
        with pytest.raises(ValueError, match="without a peering layer"):
            server.add_peer("ws://127.0.0.1:1/connect", "B", TOKEN)
        assert server.dial_via_peer("foo", "tcp", "127.0.0.1:1", TIMEOUT) is None
    finally:
        server.close()
    default = Server(lambda request: ("", False), peer_id="A", peer_token=TOKEN)
    try:
        assert isinstance(default.peering, Peering)
        assert default.peering.client_sessions is default.session_manager
        assert default.peering.peer_sessions is default.peer_sessions
        default.peering.accept_peer("B", TOKEN)
        assert default.peering.authenticate({PEER_ID_HEADER: "B", PEER_TOKEN_HEADER: TOKEN}) == "B"
    finally:
        default.close()
