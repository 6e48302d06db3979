"""The WSGI server under werkzeug's real threaded server, with real
:class:`TunnelClient` tunnels over loopback."""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest
import requests
from werkzeug.serving import make_server

from remotedialer.client import TunnelClient
from remotedialer.config import Limits
from remotedialer.errors import (
    ConnectNotAllowedError,
    HandshakeError,
    NoSessionError,
    RemoteError,
    TunnelClosedError,
)
from remotedialer.server import Server
from remotedialer.session import Session
from remotedialer.server.sessions import SessionManager
from remotedialer.frames import OP_CLOSE, encode_frame
from remotedialer.transports.wsgi import ServerWebSocket

from testkit.support import (
    TIMEOUT,
    EchoServer,
    TunnelServer,
    echo_round_trip,
    raw_upgrade,
    recv_exactly,
    recv_until_eof,
    tunnel_id_authorizer,
    wait_for,
)
from testkit.raw_websocket import client_frame, raw_get, read_server_frame, upgrade_headers


def request_handler_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


# ------------------------------------------------------------------- dials
@pytest.mark.parametrize("websocket", ["builtin", "simple-websocket"])
def test_dial_through_client_multi_mib_byte_exact(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer, websocket: str
) -> None:
    tunnel_server = make_tunnel_server(websocket=websocket)
    tunnel_server.client("foo")
    assert tunnel_server.server.has_session("foo")
    assert tunnel_server.server.list_clients() == ["foo"]
    with tunnel_server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
        echo_round_trip(conn, 6 << 20)
        echo_round_trip(conn, 1)
    with tunnel_server.server.dialer("foo")("tcp", echo_server.address, timeout=TIMEOUT) as conn:
        echo_round_trip(conn, 100_000)


def test_concurrent_dials(tunnel_server: TunnelServer, echo_server: EchoServer) -> None:
    tunnel_server.client("foo")
    errors: List[BaseException] = []

    def one() -> None:
        try:
            with tunnel_server.server.dial("foo", "tcp", echo_server.address, TIMEOUT) as conn:
                echo_round_trip(conn, 512 * 1024)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not errors
    wait_for(lambda: not tunnel_server.server.sessions("foo")[0].connections())


class _Hello(http.server.BaseHTTPRequestHandler):
    body = os.urandom(3 << 20)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_http_through_create_connection(tunnel_server: TunnelServer) -> None:
    """http.client over the socket.create_connection-shaped dialer."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        tunnel_server.client("foo")
        create_connection = tunnel_server.server.create_connection_for("foo")

        class TunnelHTTPConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = create_connection((self.host, self.port), self.timeout)

        connection = TunnelHTTPConnection("127.0.0.1", httpd.server_port, timeout=TIMEOUT)
        connection.request("GET", "/file")
        response = connection.getresponse()
        assert response.status == 200
        assert response.read() == _Hello.body
        connection.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_refused_target_fails_the_first_read(tunnel_server: TunnelServer) -> None:
    tunnel_server.client("foo")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    conn = tunnel_server.server.dial("foo", "tcp", f"127.0.0.1:{port}", timeout=TIMEOUT)
    with pytest.raises(RemoteError, match="refused"):
        conn.recv(10)
    conn.close()


def test_target_not_allowed_by_client_fails_only_that_connection(
    tunnel_server: TunnelServer, echo_server: EchoServer
) -> None:
    tunnel_server.client("foo", connect_authorizer=lambda proto, address: False)
    conn = tunnel_server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    with pytest.raises(RemoteError, match="connect not allowed"):
        conn.recv(10)
    assert tunnel_server.server.has_session("foo")


def test_unknown_client_fails_at_once(tunnel_server: TunnelServer) -> None:
    started = time.monotonic()
    with pytest.raises(NoSessionError, match="failed to find Session for client nobody"):
        tunnel_server.server.dial("nobody", "tcp", "127.0.0.1:1", timeout=TIMEOUT)
    with pytest.raises(ConnectionRefusedError):  # a socket user's except clause works
        tunnel_server.server.create_connection_for("nobody")(("127.0.0.1", 1), TIMEOUT)
    assert time.monotonic() - started < TIMEOUT  # did not wait on a tunnel
    assert not tunnel_server.server.has_session("nobody")


def test_dial_after_client_disconnect_fails_at_once(
    tunnel_server: TunnelServer, echo_server: EchoServer
) -> None:
    client = tunnel_server.client("foo")
    session = tunnel_server.server.sessions("foo")[0]
    conn = tunnel_server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    echo_round_trip(conn, 1000)
    reader_error: List[BaseException] = []

    def blocked_reader() -> None:
        try:
            conn.recv(10)
        except BaseException as exc:  # noqa: B036 - checked below
            reader_error.append(exc)

    reader = threading.Thread(target=blocked_reader)
    reader.start()
    client.stop(TIMEOUT)
    assert session.wait_closed(TIMEOUT)
    reader.join(TIMEOUT)
    assert reader_error and isinstance(reader_error[0], TunnelClosedError)
    wait_for(lambda: not tunnel_server.server.has_session("foo"))
    with pytest.raises(NoSessionError):
        tunnel_server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    with pytest.raises(TunnelClosedError):  # the dead session itself refuses at once
        session.dial("tcp", echo_server.address)
    assert tunnel_server.server.list_clients() == []
    wait_for(lambda: not request_handler_threads())  # the WSGI handler thread ended


def test_several_sessions_per_key_first_is_used_then_the_next(
    tunnel_server: TunnelServer, echo_server: EchoServer
) -> None:
    first_client = tunnel_server.client("foo")
    tunnel_server.client("foo")
    first, second = tunnel_server.server.sessions("foo")
    conn = tunnel_server.server.dial("foo", "tcp", echo_server.address, TIMEOUT)
    assert conn.session is first
    echo_round_trip(conn, 10_000)
    # the first session dies: dials fall back to the next live one at once
    first_client.stop(TIMEOUT)
    assert first.wait_closed(TIMEOUT)
    conn = tunnel_server.server.dial("foo", "tcp", echo_server.address, TIMEOUT)
    assert conn.session is second
    echo_round_trip(conn, 10_000)
    wait_for(lambda: tunnel_server.server.sessions("foo") == [second])


def test_max_sessions_per_key(make_tunnel_server: Callable[..., TunnelServer]) -> None:
    tunnel_server = make_tunnel_server(limits=Limits(max_sessions_per_key=1))
    tunnel_server.client("foo")
    client = TunnelClient(tunnel_server.url, {"X-Tunnel-ID": "foo"})
    with pytest.raises(HandshakeError) as info:
        client.connect_once()
    assert info.value.status == 429
    tunnel_server.client("bar")  # other keys are not affected


# ------------------------------------------------------------ reverse dials
def test_reverse_dial_allowed(
    make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer
) -> None:
    asked: List[Tuple[str, str]] = []

    def allow(proto: str, address: str) -> bool:
        asked.append((proto, address))
        return True

    tunnel_server = make_tunnel_server(client_connect_authorizer=allow)
    client = tunnel_server.client("foo")
    assert client.session is not None
    conn = client.session.dial("tcp", echo_server.address, TIMEOUT)
    echo_round_trip(conn, 3 << 20)
    conn.close()
    assert asked == [("tcp", echo_server.address)]


def test_reverse_dial_refused_fails_only_that_connection(
    tunnel_server: TunnelServer, echo_server: EchoServer
) -> None:
    client = tunnel_server.client("foo")
    assert client.session is not None
    conn = client.session.dial("tcp", echo_server.address, TIMEOUT)
    with pytest.raises(RemoteError, match="connect not allowed"):
        conn.recv(10)
    # the tunnel is still fine both ways
    assert not client.session.closed
    with tunnel_server.server.dial("foo", "tcp", echo_server.address, TIMEOUT) as forward:
        echo_round_trip(forward, 1000)


# -------------------------------------------------------- refusals (no upgrade)
def test_unauthenticated_gets_401_before_upgrade(tunnel_server: TunnelServer) -> None:
    status, body, _ = raw_get(tunnel_server.port, upgrade_headers())
    assert (status, body) == (401, b"failed authentication")
    response = requests.get(f"http://127.0.0.1:{tunnel_server.port}/connect", timeout=TIMEOUT)
    assert (response.status_code, response.text) == (401, "failed authentication")
    with pytest.raises(HandshakeError) as info:
        TunnelClient(tunnel_server.url, {}).connect_once()
    assert info.value.status == 401 and info.value.body == "failed authentication"
    assert tunnel_server.server.list_clients() == []


def test_authorizer_error_gets_400_with_its_text(tunnel_server: TunnelServer) -> None:
    status, body, _ = raw_get(tunnel_server.port, upgrade_headers(**{"X-Error": "bad token format"}))
    assert (status, body) == (400, b"bad token format")


def test_plain_request_gets_400(tunnel_server: TunnelServer) -> None:
    response = requests.get(
        f"http://127.0.0.1:{tunnel_server.port}/connect", headers={"X-Tunnel-ID": "foo"}, timeout=TIMEOUT
    )
    assert response.status_code == 400
    assert "websocket" in response.text
    status, _, _ = raw_get(tunnel_server.port, upgrade_headers(**{"X-Tunnel-ID": "foo",
                                                            "Sec-WebSocket-Version": "8"}))
    assert status == 400
    assert tunnel_server.server.list_clients() == []


def test_custom_error_writer(make_tunnel_server: Callable[..., TunnelServer]) -> None:
    seen: List[Tuple[int, str]] = []

    def writer(environ: Any, start_response: Any, status: int, message: str) -> List[bytes]:
        seen.append((status, message))
        start_response(f"{status} Nope", [("Content-Type", "application/json"), ("X-Custom", "1")])
        return [b'{"error": "%s"}' % message.encode()]

    tunnel_server = make_tunnel_server(error_writer=writer)
    status, body, response = raw_get(tunnel_server.port, upgrade_headers())
    assert status == 401 and body == b'{"error": "failed authentication"}'
    assert response.getheader("X-Custom") == "1"
    assert seen == [(401, "failed authentication")]


# ----------------------------------------------- peers, listeners, keepalive
def test_peer_authentication_is_tried_first(tunnel_server: TunnelServer) -> None:
    tunnel_server.server.peering.accept_peer("peer-b", "s3cret")
    peer = TunnelClient(tunnel_server.url, {"X-API-Tunnel-ID": "peer-b", "X-API-Tunnel-Token": "s3cret"})
    tunnel_server.clients.append(peer)
    peer.start()
    peer.wait_connected(TIMEOUT)
    wait_for(lambda: tunnel_server.server.peer_sessions.sessions("peer-b"))
    # a peer session is not offered for client dials
    assert tunnel_server.server.list_clients() == []
    with pytest.raises(NoSessionError):
        tunnel_server.server.dial("peer-b", "tcp", "127.0.0.1:1")
    # a wrong token falls through to the authorizer, which refuses
    wrong = TunnelClient(tunnel_server.url, {"X-API-Tunnel-ID": "peer-b", "X-API-Tunnel-Token": "guess"})
    with pytest.raises(HandshakeError) as info:
        wrong.connect_once()
    assert info.value.status == 401


def test_peer_router_hooks(make_tunnel_server: Callable[..., TunnelServer], echo_server: EchoServer) -> None:
    """A PeerRouter gets peer sessions' CONNECTs and ADD_CLIENTs and routes
    dials for keys this server does not hold."""
    tunnel_server, other = make_tunnel_server(), make_tunnel_server()
    other.client("far")
    connects: List[Tuple[str, str]] = []
    changes: List[Tuple[bool, str, int]] = []

    class Router:
        def handle_connect(self, conn: Any) -> None:
            connects.append((conn.proto, conn.address))
            conn.abort(ConnectNotAllowedError("no route"))

        def on_client_change(self, session: Session, added: bool, key: str, session_key: int) -> None:
            changes.append((added, key, session_key))

        def dial(self, key: str, proto: str, address: str, timeout: Optional[float]) -> Any:
            return other.server.dial(key, proto, address, timeout) if other.server.has_session(key) else None

    tunnel_server.server.peer_router = Router()
    with tunnel_server.server.dial("far", "tcp", echo_server.address, TIMEOUT) as conn:
        echo_round_trip(conn, 10_000)
    with pytest.raises(NoSessionError):
        tunnel_server.server.dial("nowhere", "tcp", echo_server.address)
    tunnel_server.server.peering.accept_peer("peer-a", "token")
    peer = TunnelClient(tunnel_server.url, {"X-API-Tunnel-ID": "peer-a", "X-API-Tunnel-Token": "token"})
    tunnel_server.clients.append(peer)
    peer.start()
    session = peer.wait_connected(TIMEOUT)
    wait_for(lambda: tunnel_server.server.peer_sessions.has_session("peer-a"))
    session.send_client_added("agent", 42)
    conn = session.dial("agent::tcp", echo_server.address, TIMEOUT)
    with pytest.raises(RemoteError, match="no route"):
        conn.recv(1)
    wait_for(lambda: changes == [(True, "agent", 42)])
    assert connects == [("agent::tcp", echo_server.address)]


def test_session_listeners_see_adds_and_removes(tunnel_server: TunnelServer) -> None:
    events: List[Tuple[bool, str, Session]] = []
    tunnel_server.client("early")
    tunnel_server.server.add_session_listener(
        lambda added, key, s: events.append((added, key, s)), replay=True
    )
    assert [(added, key) for added, key, _ in events] == [(True, "early")]
    client = tunnel_server.client("late")
    client.stop(TIMEOUT)
    wait_for(lambda: len(events) == 3)
    assert [(added, key) for added, key, _ in events] == [(True, "early"), (True, "late"), (False, "late")]
    assert events[1][2] is events[2][2]


def test_session_manager_limits_and_order() -> None:
    manager = SessionManager(max_sessions_per_key=2)
    pairs = [socket.socketpair() for _ in range(3)]
    sessions = [Session(ServerWebSocket(a, 100), is_client=False) for a, _ in pairs]
    manager.add("k", sessions[0])
    manager.add("k", sessions[1])
    with pytest.raises(ConnectionResetError):  # LimitExceededError
        manager.add("k", sessions[2])
    assert manager.first("k") is sessions[0]
    sessions[0].close("test")
    assert manager.sessions("k") == [sessions[1]]
    assert manager.first("k") is sessions[1]
    sessions[1].close("test")
    assert manager.client_keys() == [] and len(manager) == 0
    sessions[2].close("test")
    for a, b in pairs:
        a.close()
        b.close()


def test_session_manager_counts_sessions_across_keys() -> None:
    manager = SessionManager(max_sessions_per_key=2)
    pairs = [socket.socketpair() for _ in range(4)]
    sessions = [Session(ServerWebSocket(a, 100), is_client=False) for a, _ in pairs]
    try:
        for key, session in zip(("a", "a", "b"), sessions):
            manager.add(key, session)
        with pytest.raises(ConnectionResetError):  # LimitExceededError: not counted
            manager.add("a", sessions[3])
        assert len(manager) == 3
        assert not manager.remove("b", sessions[0])  # not under that key: not counted
        assert manager.remove("a", sessions[0])
        assert not manager.remove("a", sessions[0])  # twice: counted once
        assert len(manager) == 2
        sessions[2].close("test")  # leaves the table through its close callback
        assert len(manager) == 1 and manager.client_keys() == ["a"]
    finally:
        for session in sessions:
            session.close("test")
        for a, b in pairs:
            a.close()
            b.close()
        b.close()


def test_session_manager_session_that_already_ended() -> None:
    """A session that ended before it was registered is announced added, then
    removed, in that order, and does not stay in the table."""
    manager = SessionManager()
    events: List[Tuple[bool, str]] = []
    manager.add_listener(lambda added, key, session: events.append((added, key)))
    a, b = socket.socketpair()
    session = Session(ServerWebSocket(a, 100), is_client=False)
    session.close("gone early")
    manager.add("k", session)
    assert events == [(True, "k"), (False, "k")]
    assert manager.sessions("k") == [] and not manager.has_session("k")
    a.close()
    b.close()


def test_ping_keeps_the_session_alive_and_silence_ends_it(
    make_tunnel_server: Callable[..., TunnelServer],
) -> None:
    tunnel_server = make_tunnel_server(limits=Limits(read_deadline=0.6))
    tunnel_server.client("pinger", limits=Limits(ping_interval=0.05))
    transport = tunnel_server.server.sessions("pinger")[0].transport
    first = transport.last_keepalive
    wait_for(lambda: transport.last_keepalive > first)
    # a raw client that never pings is cut off after the read deadline
    sock = raw_upgrade(tunnel_server.port, "silent")
    wait_for(lambda: tunnel_server.server.has_session("silent"))
    session = tunnel_server.server.sessions("silent")[0]
    assert session.wait_closed(TIMEOUT)
    assert "keepalive" in session.close_reason
    opcode, _ = read_server_frame(sock)
    assert opcode == OP_CLOSE
    assert recv_until_eof(sock) == b""
    sock.close()
    assert tunnel_server.server.has_session("pinger")  # the pinging one lived on


# --------------------------------------------------- the taken-over socket
def test_no_stray_bytes_after_client_closes(
    tunnel_server: TunnelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sock = raw_upgrade(tunnel_server.port, "raw")
    wait_for(lambda: tunnel_server.server.has_session("raw"))
    sock.sendall(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
    # exactly the close reply, then EOF: werkzeug wrote nothing after it
    assert recv_until_eof(sock) == encode_frame(OP_CLOSE, struct.pack("!H", 1000))
    sock.close()
    wait_for(lambda: not tunnel_server.server.has_session("raw"))
    wait_for(lambda: not request_handler_threads())
    # and the handler ended quietly: werkzeug saw a dropped connection, not an error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_no_stray_bytes_after_server_ends_session(tunnel_server: TunnelServer) -> None:
    sock = raw_upgrade(tunnel_server.port, "raw")
    wait_for(lambda: tunnel_server.server.has_session("raw"))
    tunnel_server.server.sessions("raw")[0].close("test ends it")
    assert recv_until_eof(sock) == encode_frame(OP_CLOSE, struct.pack("!H", 1000))
    sock.close()


def test_text_message_ends_the_session(tunnel_server: TunnelServer) -> None:
    sock = raw_upgrade(tunnel_server.port, "raw")
    wait_for(lambda: tunnel_server.server.has_session("raw"))
    session = tunnel_server.server.sessions("raw")[0]
    sock.sendall(client_frame(0x1, b"hello"))
    assert session.wait_closed(TIMEOUT)
    assert "text" in session.close_reason
    opcode, payload = read_server_frame(sock)
    assert opcode == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == 1003
    assert recv_until_eof(sock) == b""
    sock.close()


def test_server_close_ends_every_session(tunnel_server: TunnelServer) -> None:
    client = tunnel_server.client("foo")
    session = tunnel_server.server.sessions("foo")[0]
    tunnel_server.server.close()
    assert session.wait_closed(TIMEOUT)
    client.stop(TIMEOUT)
    status, body, _ = raw_get(tunnel_server.port, upgrade_headers(**{"X-Tunnel-ID": "foo"}))
    assert status == 503


# ------------------------------------------------------------- TLS, IPv6
def test_tunnel_over_tls(echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """wss:// to werkzeug with a TLS context: the taken-over socket is an
    SSLSocket and everything works the same, ending quietly."""
    import ssl

    caplog.set_level(logging.INFO)

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = Server(tunnel_id_authorizer)
    httpd = make_server("127.0.0.1", 0, server, threaded=True, ssl_context=server_context)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    client = TunnelClient(
        f"wss://127.0.0.1:{httpd.server_port}/connect", {"X-Tunnel-ID": "tls"},
        lambda proto, address: True, ssl_context=client_context,
    )
    try:
        client.start()
        client.wait_connected(TIMEOUT)
        wait_for(lambda: server.has_session("tls"))
        with server.dial("tls", "tcp", echo_server.address, TIMEOUT) as conn:
            echo_round_trip(conn, 4 << 20)
        session = server.sessions("tls")[0]
        client.stop(TIMEOUT)
        assert session.wait_closed(TIMEOUT)
        wait_for(lambda: not request_handler_threads())
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        client.stop(TIMEOUT)
        server.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def test_create_connection_to_ipv6_target(tunnel_server: TunnelServer) -> None:
    try:
        echo6 = EchoServer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        tunnel_server.client("foo")
        with tunnel_server.server.create_connection_for("foo")(("::1", echo6.port), TIMEOUT) as conn:
            assert conn.address == f"[::1]:{echo6.port}"
            echo_round_trip(conn, 10_000)
    finally:
        echo6.close()


def test_raw_client_with_fragmented_messages_like_gorilla(tunnel_server: TunnelServer) -> None:
    """A hand-driven client speaking as Go's gorilla client does: messages
    split into 4 KiB continuation frames, pings and an unsolicited pong in
    between. The server's CONNECT arrives as one binary frame; DATA sent back
    in fragments reaches the dialed connection byte for byte."""
    from remotedialer.protocol import MessageType, decode_message, encode_message

    sock = raw_upgrade(tunnel_server.port, "gorilla")
    wait_for(lambda: tunnel_server.server.has_session("gorilla"))
    conn = tunnel_server.server.dial("gorilla", "tcp", "127.0.0.1:9", timeout=TIMEOUT)
    opcode, frame = read_server_frame(sock)
    assert opcode == 0x2
    connect = decode_message(frame)
    assert connect.type == MessageType.CONNECT and connect.conn_id == conn.conn_id
    assert bytes(connect.payload) == b"tcp/127.0.0.1:9"
    payload = os.urandom(300_000)
    message = encode_message(12345, conn.conn_id, MessageType.DATA, payload)
    pieces = [message[i:i + 4096] for i in range(0, len(message), 4096)]
    stream = b""
    for index, piece in enumerate(pieces):
        opcode = 0x2 if index == 0 else 0x0
        stream += client_frame(opcode, piece, fin=index == len(pieces) - 1)
        if index % 20 == 5:
            stream += client_frame(0x9, b"") + client_frame(0xA, b"unsolicited")
    sender = threading.Thread(target=sock.sendall, args=(stream,))
    sender.start()
    assert recv_exactly(conn, len(payload)) == payload
    sender.join(TIMEOUT)
    # every ping was answered with a pong
    pongs = 0
    while pongs < sum(1 for i in range(len(pieces)) if i % 20 == 5):
        opcode, _ = read_server_frame(sock)
        assert opcode == 0xA
        pongs += 1
    sock.sendall(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
    with pytest.raises(TunnelClosedError):
        conn.recv(1)
    sock.close()
