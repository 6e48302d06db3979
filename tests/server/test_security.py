"""Security properties: constant-time token comparison, clients refuse every
CONNECT their authorizer does not allow, no secrets in logs (even with
CATTLE_TUNNEL_DATA_DEBUG), and wss verifies certificates by default."""

from __future__ import annotations

import ast
import hmac
import logging
import ssl
import threading
import types
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple, cast

import pytest
import trustme
import websocket

from remotedialer.client import Backoff, TunnelClient, connect_to_proxy
from remotedialer.connection import TunnelConnection
from remotedialer.errors import ConnectNotAllowedError, HandshakeError, RemoteError
from remotedialer.piping import LocalDialer

from testkit.support import TIMEOUT, EchoServer, TunnelServer, recv_exactly, wait_for

PACKAGE = Path(__file__).resolve().parents[2] / "remotedialer"
FAST = Backoff(initial=0.05, maximum=0.2)


# ------------------------------------------------ constant-time comparison
def test_no_token_is_compared_with_eq_anywhere_in_the_package() -> None:
    """Static check: no ``==``/``!=`` on anything named like a token, secret
    or password in the library (those must go through hmac.compare_digest)."""
    suspicious = ("token", "secret", "password")
    offences: List[str] = []

    def named(node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Call):
            return named(node.func)
        if isinstance(node, ast.Subscript):
            return named(node.value)
        return ""

    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                continue
            names = [named(part).lower() for part in [node.left, *node.comparators]]
            # Comparing against a literal (e.g. a header name) is not a secret comparison.
            if any(isinstance(part, ast.Constant) for part in [node.left, *node.comparators]):
                continue
            if any(word in name for name in names for word in suspicious):
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offences == []


def test_peer_token_checked_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from remotedialer.ha.peering import PEER_ID_HEADER, PEER_TOKEN_HEADER
    from remotedialer.server import Server

    calls: List[Tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    server = Server(lambda request: ("", False))
    server.peering.accept_peer("peer-a", "correct-horse")

    def attempt(peer_id: str, token: str) -> Any:
        headers = {PEER_ID_HEADER: peer_id, PEER_TOKEN_HEADER: token}
        return server.peering.authenticate(Request(EnvironBuilder(headers=headers).get_environ()).headers)

    try:
        assert attempt("peer-a", "correct-horse") == "peer-a"
        assert calls == [(b"correct-horse", b"correct-horse")]
        for wrong in ("correct-hors", "correct-horsee", "", "x" * 10_000, "correct-hors\u00e9"):
            assert attempt("peer-a", wrong) is None
        assert attempt("peer-b", "correct-horse") is None  # unknown peer
        assert attempt("", "correct-horse") is None
        # Every comparison that happened went through compare_digest, on bytes.
        assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    finally:
        server.close()


def test_wrong_peer_token_falls_back_to_the_authorizer_and_is_refused(
    make_tunnel_server: Callable[..., TunnelServer],
) -> None:
    harness = make_tunnel_server(peer_id="A", peer_token="tok-A")
    harness.server.peering.accept_peer("B", "tok-B")
    with pytest.raises(HandshakeError) as info:
        connect_to_proxy(harness.url, {"X-API-Tunnel-ID": "B", "X-API-Tunnel-Token": "tok-b"})
    assert info.value.status == 401
    assert not harness.server.peer_sessions.sessions("B")


# ------------------------------------------------- connect authorization
def test_local_dialer_without_authorizer_refuses_everything() -> None:
    dialer = LocalDialer(None)
    try:
        for proto, address in [("tcp", "127.0.0.1:80"), ("unix", "/tmp/x"), ("tcp6", "[::1]:22")]:
            # what the dialer reads of a connection (a compiled TunnelConnection
            # cannot be made without its __init__)
            conn = cast(TunnelConnection, types.SimpleNamespace(proto=proto, address=address))
            with pytest.raises(ConnectNotAllowedError):
                dialer(conn)
    finally:
        dialer.shutdown()


def _dial_outcome(harness: TunnelServer, key: str, address: str, proto: str = "tcp") -> str:
    conn = harness.server.dial(key, proto, address, timeout=TIMEOUT)
    conn.settimeout(TIMEOUT)
    try:
        conn.sendall(b"hi")
        return "echoed" if recv_exactly(conn, 2) == b"hi" else "garbled"
    except RemoteError as exc:
        return exc.remote_message
    finally:
        conn.close()


@pytest.mark.parametrize(
    "authorizer",
    [None, lambda proto, address: False, lambda proto, address: 1 / 0],
    ids=["no-authorizer", "refusing", "crashing"],
)
def test_client_refuses_connects_its_authorizer_does_not_allow(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer, authorizer: Any
) -> None:
    harness = make_tunnel_server()
    client = harness.client("foo", authorizer)
    for _ in range(3):
        assert _dial_outcome(harness, "foo", echo_server.address) == "connect not allowed"
    assert echo_server.accepted == [], "a refused target was dialed anyway"
    session = client.session
    assert session is not None and not session.closed


def test_client_authorizer_allows_exactly_what_it_says(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    asked: List[Tuple[str, str]] = []

    def only_the_echo(proto: str, address: str) -> bool:
        asked.append((proto, address))
        return proto == "tcp" and address == echo_server.address

    harness = make_tunnel_server()
    harness.client("foo", only_the_echo)
    host, port = echo_server.address.rsplit(":", 1)
    assert _dial_outcome(harness, "foo", echo_server.address) == "echoed"
    for proto, address in [
        ("tcp", f"localhost:{port}"),  # same target, other spelling: not what was allowed
        ("tcp4", echo_server.address),
        ("tcp", f"{host}:{int(port) + 1}"),
        ("unix", "/var/run/docker.sock"),
        ("tcp", echo_server.address + "/"),
    ]:
        assert _dial_outcome(harness, "foo", address, proto) == "connect not allowed", (proto, address)
    assert len(echo_server.accepted) == 1
    assert asked[0] == ("tcp", echo_server.address) and len(asked) == 6


def test_server_refuses_reverse_dials_by_default(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    harness = make_tunnel_server()  # no client_connect_authorizer
    client = harness.client("foo", lambda proto, address: True)
    assert client.session is not None
    conn = client.session.dial("tcp", echo_server.address, TIMEOUT)
    conn.settimeout(TIMEOUT)
    with pytest.raises(RemoteError, match="connect not allowed"):
        conn.recv(1)
    assert echo_server.accepted == []


# ------------------------------------------------------ no secrets in logs
SECRETS = {
    "client": "Bearer client-secret-9f1c2e",
    "tunnel_token": "tunnel-token-77aa19",
    "peer": "peer-token-c0ffee42",
    "wrong_peer": "wrong-peer-token-5e5e5e",
}


@pytest.fixture
def debug_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, with per-message tracing switched on."""
    monkeypatch.setenv("CATTLE_TUNNEL_DATA_DEBUG", "true")
    caplog.set_level(logging.DEBUG)
    yield caplog


def assert_no_secrets(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    out, err = capsys.readouterr()
    texts = [caplog.text, out, err]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
    joined = "\n".join(texts)
    for name, secret in SECRETS.items():
        assert secret not in joined, f"{name} secret leaked into the logs"
        assert secret.split()[-1] not in joined, f"{name} secret leaked into the logs"


def test_no_tokens_in_logs_during_client_connect_and_traffic(
    debug_logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, echo_server: EchoServer
) -> None:
    server = TunnelServer()
    try:
        def authorize(request: Any) -> Tuple[str, bool]:
            ok = request.headers.get("Authorization") == SECRETS["client"]
            return request.headers.get("X-Tunnel-ID", ""), ok

        server.authorize = authorize
        headers = {
            "X-Tunnel-ID": "foo",
            "Authorization": SECRETS["client"],
            "X-API-Tunnel-Token": SECRETS["tunnel_token"],
        }
        client = TunnelClient(server.url, headers, lambda proto, address: True, backoff=FAST)
        client.start()
        try:
            client.wait_connected(TIMEOUT)
            wait_for(lambda: server.server.has_session("foo"))
            with server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
                conn.settimeout(TIMEOUT)
                conn.sendall(b"traced")
                assert recv_exactly(conn, 6) == b"traced"
            # A refused handshake (wrong credentials) too.
            with pytest.raises(HandshakeError):
                connect_to_proxy(server.url, {"X-Tunnel-ID": "bar", "Authorization": "Bearer nope"})
        finally:
            client.stop(TIMEOUT)
    finally:
        server.close()
    assert any(r.name == "remotedialer.trace" for r in debug_logs.records), "tracing was not on"
    assert_no_secrets(debug_logs, capsys)


def test_no_tokens_in_logs_during_peer_handshakes(
    debug_logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, echo_server: EchoServer
) -> None:
    a = TunnelServer(peer_id="A", peer_token=SECRETS["peer"])
    b = TunnelServer(peer_id="B", peer_token=SECRETS["peer"])
    c = TunnelServer(peer_id="C", peer_token=SECRETS["wrong_peer"])
    servers = [a, b, c]
    client = None
    try:
        for server in servers:
            server.server.peering.backoff = FAST
        a.server.add_peer(b.url, "B", SECRETS["peer"])
        b.server.add_peer(a.url, "A", SECRETS["peer"])
        c.server.add_peer(a.url, "A", SECRETS["peer"])  # C presents the wrong token to A
        wait_for(lambda: all(link.connected for s in (a, b) for link in s.server.peering.links()))
        c_link = c.server.peering.links()[0]
        wait_for(lambda: c_link.client.last_error is not None)
        client = TunnelClient(b.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True, backoff=FAST)
        client.start()
        client.wait_connected(TIMEOUT)
        wait_for(lambda: "foo" in str(a.server.peering.remote_clients()))
        with a.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:  # relayed by B
            conn.settimeout(TIMEOUT)
            conn.sendall(b"relay")
            assert recv_exactly(conn, 5) == b"relay"
        reprs = [repr(link) + repr(link.spec) for s in servers for link in s.server.peering.links()]
        assert not any(SECRETS["peer"] in text for text in reprs)
    finally:
        if client is not None:
            client.stop(TIMEOUT)
        for server in servers:
            server.close()
    assert_no_secrets(debug_logs, capsys)


# ------------------------------------------------------------ wss verification
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def silence_tls_handshake_errors() -> Iterator[None]:
    """werkzeug prints failed TLS handshakes to stderr; they are expected here."""
    previous = threading.excepthook
    threading.excepthook = lambda args: None
    yield
    threading.excepthook = previous


def test_wss_verifies_certificates_by_default(
    make_tunnel_server: Callable[..., TunnelServer], ca: trustme.CA, silence_tls_handshake_errors: None
) -> None:
    harness = make_tunnel_server(ssl_context=tls_server_context(ca, "127.0.0.1"))
    assert harness.url.startswith("wss://")
    with pytest.raises((ssl.SSLError, websocket.WebSocketException)) as info:
        connect_to_proxy(harness.url, {"X-Tunnel-ID": "foo"})
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate" in str(info.value).lower()
    assert not harness.server.has_session("foo")


def test_wss_with_a_context_trusting_the_ca_works(
    make_tunnel_server: Callable[..., TunnelServer], ca: trustme.CA, echo_server: EchoServer
) -> None:
    harness = make_tunnel_server(ssl_context=tls_server_context(ca, "127.0.0.1"))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    harness.client("foo", lambda proto, address: True, ssl_context=trusting)
    assert _dial_outcome(harness, "foo", echo_server.address) == "echoed"


def test_wss_hostname_is_checked(
    make_tunnel_server: Callable[..., TunnelServer], ca: trustme.CA, silence_tls_handshake_errors: None
) -> None:
    """A certificate from a trusted CA but for another name is refused."""
    harness = make_tunnel_server(ssl_context=tls_server_context(ca, "tunnel.example"))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with pytest.raises((ssl.SSLError, ssl.CertificateError, websocket.WebSocketException)):
        connect_to_proxy(harness.url, {"X-Tunnel-ID": "foo"}, ssl_context=trusting)
    assert not harness.server.has_session("foo")


def test_tunnel_client_keeps_refusing_an_untrusted_server(
    make_tunnel_server: Callable[..., TunnelServer], ca: trustme.CA, silence_tls_handshake_errors: None
) -> None:
    harness = make_tunnel_server(ssl_context=tls_server_context(ca, "127.0.0.1"))
    client = TunnelClient(harness.url, {"X-Tunnel-ID": "foo"}, backoff=FAST)
    client.start()
    try:
        wait_for(lambda: client.last_error is not None)
        assert isinstance(client.last_error, (ssl.SSLError, websocket.WebSocketException))
        assert client.session is None and not harness.server.has_session("foo")
    finally:
        client.stop(TIMEOUT)
