"""LocalDialer (the client's connect handler) and the Piper selector loop."""

from __future__ import annotations

import hashlib
import socket
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import DialError, RemoteError
from remotedialer import piping
from remotedialer.piping import LocalDialer, Piper, dial_socket
from remotedialer.receive_buffer import ReceiveBuffer

from testkit.support import (
    TIMEOUT,
    AcceptingHandler,
    EchoServer,
    LocalDialTunnel,
    SessionPair,
    closing_all,
    dial_and_accept,
    recv_exactly,
    wait_for,
)

KiB = 1024
LIMITS = Limits(pause_threshold=256 * KiB, resume_threshold=32 * KiB, hard_buffer_limit=8192 * KiB)


@pytest.fixture
def setup_factory(
    session_pair_factory: Callable[..., SessionPair],
) -> Iterator[Callable[..., LocalDialTunnel]]:
    """Build :class:`LocalDialTunnel` objects (with LIMITS unless told);
    all are closed at teardown."""

    def local_dial_tunnel(**kwargs: Any) -> LocalDialTunnel:
        kwargs.setdefault("limits", LIMITS)
        return LocalDialTunnel(session_pair_factory, **kwargs)

    with closing_all(local_dial_tunnel) as make:
        yield make


@pytest.fixture
def setup(setup_factory: Callable[..., LocalDialTunnel]) -> LocalDialTunnel:
    return setup_factory()


# -------------------------------------------------------------- LocalDialer
def test_echo_through_the_tunnel(setup: LocalDialTunnel, echo_server: EchoServer) -> None:
    conn = setup.dial(echo_server.address)
    data = bytes(range(256)) * 4096  # 1 MiB
    sender = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
    sender.start()
    assert hashlib.sha256(recv_exactly(conn, len(data))).digest() == hashlib.sha256(data).digest()
    sender.join(TIMEOUT)
    conn.close()
    wait_for(lambda: setup.piper.active_pipes == 0)
    wait_for(lambda: setup.pair.client.connection_ids() == [])


def test_no_authorizer_refuses_that_connection_only(
    setup_factory: Callable[..., LocalDialTunnel], echo_server: EchoServer,
) -> None:
    setup = setup_factory(authorizer=None)
    conn = setup.dial(echo_server.address)
    with pytest.raises(RemoteError, match="connect not allowed"):
        conn.recv(1)
    assert not setup.pair.client.closed and not setup.pair.server.closed
    assert setup.pair.client.connection_ids() == []
    assert echo_server.accepted == []


def test_authorizer_decides_per_target(
    setup_factory: Callable[..., LocalDialTunnel], echo_server: EchoServer
) -> None:
    seen: List[Tuple[str, str]] = []

    def authorizer(proto: str, address: str) -> bool:
        seen.append((proto, address))
        return address == echo_server.address

    setup = setup_factory(authorizer=authorizer)
    refused = setup.dial("127.0.0.1:1")
    allowed = setup.dial(echo_server.address)
    with pytest.raises(RemoteError, match="connect not allowed"):
        refused.recv(1)
    allowed.sendall(b"ok")
    assert recv_exactly(allowed, 2) == b"ok"
    assert seen == [("tcp", "127.0.0.1:1"), ("tcp", echo_server.address)]


def test_authorizer_crash_refuses(setup_factory: Callable[..., LocalDialTunnel]) -> None:
    def authorizer(proto: str, address: str) -> bool:
        raise RuntimeError("bug")

    setup = setup_factory(authorizer=authorizer)
    with pytest.raises(RemoteError, match="connect not allowed"):
        setup.dial("127.0.0.1:9").recv(1)
    assert not setup.pair.client.closed


def test_refused_local_dial_answers_error_with_its_text(setup: LocalDialTunnel) -> None:
    address = _unused_address()
    conn = setup.dial(address)
    with pytest.raises(RemoteError) as info:
        conn.recv(1)
    assert address in info.value.remote_message
    assert "refused" in info.value.remote_message.lower()
    assert not setup.pair.client.closed
    wait_for(lambda: setup.pair.client.connection_ids() == [])


def _unused_address() -> str:
    """A loopback ``host:port`` nothing listens on."""
    closed = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    return address


def _echo_once(setup: LocalDialTunnel, address: str, data: bytes) -> None:
    """Dial the echo server at ``address`` through the tunnel and see ``data`` come back."""
    conn = setup.dial(address)
    conn.sendall(data)
    assert recv_exactly(conn, len(data)) == data


def _count_pool_tasks(setup: LocalDialTunnel, monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The names of the tasks the dialer hands to its thread pool, from now on."""
    tasks: List[str] = []
    submit = setup.local._pool.submit

    def counting_submit(task: Callable[..., Any], *args: Any) -> None:
        tasks.append(task.__name__)
        submit(task, *args)

    monkeypatch.setattr(setup.local._pool, "submit", counting_submit)
    return tasks


def test_ip_literal_target_is_connected_without_a_pool_thread(
    setup: LocalDialTunnel, echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An IP-literal target needs no name lookup: its connect starts on the
    reader thread without blocking, and a loopback connect completes there,
    so no dial thread is involved; a host name still goes to the pool, and a
    refused IP literal is answered with the same text as before."""
    tasks = _count_pool_tasks(setup, monkeypatch)
    _echo_once(setup, echo_server.address, b"literal")
    assert tasks == []
    _echo_once(setup, f"localhost:{echo_server.address.rpartition(':')[2]}", b"named")
    assert tasks == ["_dial_and_pipe"]
    address = _unused_address()
    with pytest.raises(RemoteError) as info:
        setup.dial(address).recv(1)
    assert info.value.remote_message == f"dial tcp {address}: Connection refused"
    assert tasks == ["_dial_and_pipe"]


def test_connect_still_under_way_is_finished_on_the_pool(
    setup: LocalDialTunnel, echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connect that did not complete at once is waited for on a pool thread
    (bounded by the local dial timeout), then piped as usual."""
    tasks = _count_pool_tasks(setup, monkeypatch)
    real_start = piping.start_ip_connect

    def pending_start(proto: str, address: str) -> Optional[Tuple[socket.socket, bool]]:
        started = real_start(proto, address)
        assert started is not None
        return started[0], False  # as if it were still connecting

    monkeypatch.setattr(piping, "start_ip_connect", pending_start)
    _echo_once(setup, echo_server.address, b"pending")
    assert tasks == ["_finish_and_pipe"]
    address = _unused_address()
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", int(address.rpartition(":")[2])))
    with pytest.raises(ConnectionRefusedError):
        piping.finish_connect(sock, TIMEOUT)
    sock.close()


def test_custom_dialer_and_timeout(
    setup_factory: Callable[..., LocalDialTunnel], echo_server: EchoServer
) -> None:
    calls: List[Tuple[str, str, Optional[float]]] = []

    def dialer(proto: str, address: str, timeout: Optional[float]) -> socket.socket:
        calls.append((proto, address, timeout))
        return socket.create_connection(("127.0.0.1", echo_server.port), timeout=timeout)

    setup = setup_factory(dialer=dialer)
    conn = setup.dial("backend.internal:80")
    conn.sendall(b"via custom dialer")
    assert recv_exactly(conn, 17) == b"via custom dialer"
    assert calls == [("tcp", "backend.internal:80", LIMITS.local_dial_timeout)]


def test_dialer_raising_dial_error(setup_factory: Callable[..., LocalDialTunnel]) -> None:
    def dialer(proto: str, address: str, timeout: Optional[float]) -> socket.socket:
        raise DialError("no route to the moon")

    setup = setup_factory(dialer=dialer)
    with pytest.raises(RemoteError, match="no route to the moon"):
        setup.dial("moon:1").recv(1)


def test_local_socket_close_gives_eof_after_data(setup: LocalDialTunnel) -> None:
    conn, local = dial_and_accept(setup.dial)
    local.sendall(b"goodbye")
    local.close()
    assert recv_exactly(conn, 7) == b"goodbye"
    assert conn.recv(1) == b""
    wait_for(lambda: setup.piper.active_pipes == 0)
    wait_for(lambda: setup.pair.client.connection_ids() == [] and setup.pair.server.connection_ids() == [])


def test_tunnel_close_closes_local_socket_after_data(setup: LocalDialTunnel) -> None:
    conn, local = dial_and_accept(setup.dial)
    local.settimeout(TIMEOUT)
    conn.sendall(b"final words")
    conn.close()
    received = bytearray()
    while True:
        chunk = local.recv(100)
        if not chunk:
            break
        received += chunk
    assert bytes(received) == b"final words"
    local.close()
    wait_for(lambda: setup.piper.active_pipes == 0)


def test_data_and_close_that_arrive_during_the_local_dial_are_delivered(
    setup_factory: Callable[..., LocalDialTunnel],
) -> None:
    """The far side may send and close before our local dial completes: the
    target still gets the bytes, then EOF (the dial is not thrown away)."""
    closed_far_side = threading.Event()
    accepted: List[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def slow_dialer(proto: str, address: str, timeout: Optional[float]) -> socket.socket:
        assert closed_far_side.wait(TIMEOUT)
        sock = socket.create_connection(listener.getsockname()[:2], timeout=timeout)
        accepted.append(listener.accept()[0])
        return sock

    setup = setup_factory(dialer=slow_dialer)
    conn = setup.dial("slow.internal:80")
    wait_for(lambda: len(setup.pair.client.connections()) == 1)
    (client_side,) = setup.pair.client.connections()
    conn.sendall(b"early words")
    conn.close()
    wait_for(lambda: client_side.ended and client_side.buffered == 11)
    closed_far_side.set()
    wait_for(lambda: accepted)
    with listener, accepted[0] as target:
        target.settimeout(TIMEOUT)
        received = bytearray()
        while chunk := target.recv(100):
            received += chunk
    assert bytes(received) == b"early words"
    wait_for(lambda: setup.piper.active_pipes == 0)


def test_tunnel_error_resets_local_socket(setup: LocalDialTunnel) -> None:
    conn, local = dial_and_accept(setup.dial)
    local.settimeout(TIMEOUT)
    conn.abort(ConnectionResetError("server gave up"))
    assert local.recv(1) == b""
    local.close()
    wait_for(lambda: setup.piper.active_pipes == 0)


def test_session_end_closes_local_sockets(setup: LocalDialTunnel) -> None:
    _, local = dial_and_accept(setup.dial)
    local.settimeout(TIMEOUT)
    wait_for(lambda: setup.piper.active_pipes == 1)
    setup.pair.client_end.close()
    assert local.recv(1) == b""
    local.close()
    wait_for(lambda: setup.piper.active_pipes == 0)


def test_slow_local_reader_pauses_the_far_writer(setup: LocalDialTunnel) -> None:
    conn, local = dial_and_accept(setup.dial)
    local.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    local.settimeout(TIMEOUT)
    total = 16 * 1024 * KiB
    data = bytes(range(256)) * (total // 256)
    done = threading.Event()

    def write() -> None:
        conn.sendall(data)
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    wait_for(lambda: conn.peer_paused_us)  # the client's buffer filled: PAUSE
    client_conn = setup.pair.client.connections()[0]
    assert client_conn.buffered <= LIMITS.hard_buffer_limit
    received = bytearray()
    while len(received) < total:
        chunk = local.recv(256 * KiB)
        assert chunk
        received += chunk
        assert client_conn.buffered <= LIMITS.hard_buffer_limit
    assert done.wait(TIMEOUT)
    assert bytes(received) == data
    writer.join(TIMEOUT)
    local.close()


def test_busy_pipe_does_not_starve_another(setup: LocalDialTunnel, echo_server: EchoServer) -> None:
    busy = setup.dial(echo_server.address)
    quiet = setup.dial(echo_server.address)
    stop = threading.Event()
    chunk = b"b" * (64 * KiB)

    def pump() -> None:
        while not stop.is_set():
            try:
                busy.sendall(chunk)
            except OSError:
                return

    def drain() -> None:
        while not stop.is_set():
            try:
                busy.recv(256 * KiB)
            except OSError:
                return

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    for i in range(50):
        message = b"round trip %d" % i
        quiet.sendall(message)
        assert recv_exactly(quiet, len(message)) == message
    stop.set()
    busy.close()
    for thread in threads:
        thread.join(TIMEOUT)


# --------------------------------------------------------------------- Piper
def test_pipe_tunnels_relays_between_sessions(
    session_pair_factory: Callable[..., SessionPair], echo_server: EchoServer,
) -> None:
    """A server relaying for a peer: conn A (session 1) <-> conn B (session 2)."""
    piper = Piper("relay-piper")
    local = LocalDialer(lambda p, a: True, limits=LIMITS, piper=piper)
    inner = session_pair_factory(limits=LIMITS, connect_handler=local)
    accepting = AcceptingHandler()
    outer = session_pair_factory(limits=LIMITS, connect_handler=accepting)
    done = threading.Event()
    try:
        front = outer.server.dial("tcp", "relay:1", timeout=TIMEOUT)
        relay_end = accepting.next()
        back = inner.server.dial("tcp", echo_server.address, timeout=TIMEOUT)
        piper.pipe_tunnels(relay_end, back, on_done=done.set)
        data = b"x" * (3 * 1024 * KiB)
        sender = threading.Thread(target=front.sendall, args=(data,), daemon=True)
        sender.start()
        assert recv_exactly(front, len(data)) == data
        sender.join(TIMEOUT)
        front.close()
        assert done.wait(TIMEOUT)
        wait_for(lambda: inner.server.connection_ids() == [] and outer.client.connection_ids() == [])
    finally:
        piper.stop()
        local.shutdown()


def test_pipe_tunnels_forwards_remote_error(session_pair_factory: Callable[..., SessionPair]) -> None:
    piper = Piper("relay-piper")
    a_handler, b_handler = AcceptingHandler(), AcceptingHandler()
    one = session_pair_factory(connect_handler=a_handler)
    two = session_pair_factory(connect_handler=b_handler)
    try:
        front = one.server.dial("tcp", "x:1", timeout=TIMEOUT)
        relay_front = a_handler.next()
        back = two.server.dial("tcp", "y:2", timeout=TIMEOUT)
        target = b_handler.next()
        piper.pipe_tunnels(relay_front, back)
        target.abort(ConnectionRefusedError("dial tcp y:2: connection refused"))
        with pytest.raises(RemoteError, match="connection refused"):
            front.recv(1)
    finally:
        piper.stop()


def _tunnel_and_socketpair(
    session_pair_factory: Callable[..., SessionPair],
) -> Tuple[TunnelConnection, TunnelConnection, socket.socket, socket.socket]:
    """A tunneled connection (the dialing end, the accepted far end) and a
    socket pair (the end to pipe, the end the test reads, with a timeout)."""
    handler = AcceptingHandler()
    pair = session_pair_factory(connect_handler=handler)
    conn = pair.server.dial("tcp", "x:1", timeout=TIMEOUT)
    left, right = socket.socketpair()
    right.settimeout(TIMEOUT)
    return conn, handler.next(), left, right


def test_pipe_socket_on_done_and_stop(session_pair_factory: Callable[..., SessionPair]) -> None:
    piper = Piper("stop-piper")
    conn, far, left, right = _tunnel_and_socketpair(session_pair_factory)
    done = threading.Event()
    piper.pipe_socket(left, far, on_done=done.set)
    assert piper.active_pipes == 1  # counted (and closed by stop()) from the start
    conn.sendall(b"through")
    assert recv_exactly(right, 7) == b"through"
    assert piper.active_pipes == 1
    piper.stop()  # closes what is still open
    assert done.wait(TIMEOUT)
    assert right.recv(1) == b""
    assert conn.recv(1) == b""
    right.close()
    with pytest.raises(RuntimeError):
        piper.pipe_socket(socket.socket(), far)


def test_pipe_socket_idle_timeout(session_pair_factory: Callable[..., SessionPair]) -> None:
    """A pipe with no byte either way for ``idle_timeout`` is cut (the far
    side gets the reason); one that keeps moving bytes, and one without a
    timeout, are not."""
    piper = Piper("idle-piper")
    try:
        busy_conn, busy_far, busy_left, busy_right = _tunnel_and_socketpair(session_pair_factory)
        idle_conn, idle_far, idle_left, idle_right = _tunnel_and_socketpair(session_pair_factory)
        free_conn, free_far, free_left, free_right = _tunnel_and_socketpair(session_pair_factory)
        cut = threading.Event()
        piper.pipe_socket(busy_left, busy_far, idle_timeout=0.6)
        piper.pipe_socket(idle_left, idle_far, on_done=cut.set, idle_timeout=0.6)
        piper.pipe_socket(free_left, free_far)
        idle_conn.sendall(b"one")
        assert recv_exactly(idle_right, 3) == b"one"
        while not cut.wait(0.2):  # the busy pipe moves a byte every 0.2 s meanwhile
            busy_conn.sendall(b".")
            assert recv_exactly(busy_right, 1) == b"."
        assert idle_right.recv(1) == b""
        with pytest.raises(RemoteError, match="idle"):
            idle_conn.recv(1)
        busy_conn.sendall(b"still")
        assert recv_exactly(busy_right, 5) == b"still"
        free_conn.sendall(b"free")
        assert recv_exactly(free_right, 4) == b"free"
        assert piper.active_pipes == 2
    finally:
        piper.stop()
        for sock in (busy_right, idle_right, free_right):
            sock.close()


def _piper_idle(piper: Piper) -> threading.Event:
    """An event set while the piper thread is blocked in its selector with no
    pipe to service (a wait without timeout), cleared when it wakes."""
    idle = threading.Event()
    selector = piper._selector
    real_select = selector.select

    def select(timeout: Optional[float] = None) -> Any:
        if timeout is None:
            idle.set()
        try:
            return real_select(timeout)
        finally:
            idle.clear()

    selector.select = select  # type: ignore[method-assign]
    piper._wake()  # come round the loop once, through the wrapper
    return idle


def test_reader_thread_delivers_to_the_socket_without_a_piper_turn(
    session_pair_factory: Callable[..., SessionPair], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tunnel bytes for a socket that can take them go out on the session's
    reader thread: the piper thread is not woken for them, and a payload
    that arrives with nothing buffered or pending is written by the
    connection's sink, never buffered. The bytes arrive in order, also when
    the socket fills and later payloads queue behind a rest the sink kept."""
    piper = Piper("deliver-piper")
    conn, far, left, right = _tunnel_and_socketpair(session_pair_factory)
    try:
        piper.pipe_socket(left, far)
        conn.sendall(b"first")
        assert recv_exactly(right, 5) == b"first"
        # The piper's own turns (the first one, and any that met the lock
        # taken) must be over: wait until it blocks with nothing to do.
        assert _piper_idle(piper).wait(TIMEOUT)
        marks: List[object] = []
        original = piper._mark

        def counting_mark(pipe: object) -> None:
            marks.append(pipe)
            original(pipe)  # type: ignore[arg-type]

        monkeypatch.setattr(piper, "_mark", counting_mark)
        appended: List[int] = []
        original_append = ReceiveBuffer.append

        def counting_append(buffer: ReceiveBuffer, payload: Any) -> Any:
            if buffer is far._buffer:
                appended.append(len(payload))
            return original_append(buffer, payload)

        monkeypatch.setattr(ReceiveBuffer, "append", counting_append)
        for number in range(20):
            conn.sendall(b"%04d" % number)
            assert recv_exactly(right, 4) == b"%04d" % number
        assert marks == []
        assert appended == []
        right.sendall(b"back")  # the other direction still goes through the piper
        assert recv_exactly(conn, 4) == b"back"
        data = bytes(range(256)) * 4096  # 1 MiB, far more than the socketpair holds
        sender = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
        sender.start()
        wait_for(lambda: far.buffered > 0)  # unread, the socket filled up
        assert recv_exactly(right, len(data)) == data
        sender.join(TIMEOUT)
    finally:
        piper.stop()
        right.close()


class _CountingSocket(socket.socket):
    """A socket that counts its ``recv`` calls."""

    recv_calls = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recv_calls += 1
        return super().recv(bufsize, flags)


def test_short_read_is_sent_without_a_second_recv(
    session_pair_factory: Callable[..., SessionPair],
) -> None:
    """A read shorter than a chunk drained the socket: the pipe sends it and
    waits for the selector, without a ``recv`` that would only fail with
    EAGAIN; a later message and the EOF still come through."""
    piper = Piper("short-read-piper")
    conn, far, left, right = _tunnel_and_socketpair(session_pair_factory)
    counting = _CountingSocket(fileno=left.detach())
    try:
        piper.pipe_socket(counting, far)
        idle = _piper_idle(piper)
        assert idle.wait(TIMEOUT)
        before = counting.recv_calls
        right.sendall(b"ping")
        assert recv_exactly(conn, 4) == b"ping"
        wait_for(idle.is_set)
        assert counting.recv_calls - before == 1
        right.sendall(b"pong")
        assert recv_exactly(conn, 4) == b"pong"
        right.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""
    finally:
        piper.stop()
        right.close()


def test_dial_socket_forms(echo_server: EchoServer, tmp_path: Any) -> None:
    sock = dial_socket("tcp", echo_server.address, TIMEOUT)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    sock.close()
    with pytest.raises(DialError, match="unknown network"):
        dial_socket("udp", echo_server.address, TIMEOUT)
    with pytest.raises(DialError, match="missing port"):
        dial_socket("tcp", "127.0.0.1", TIMEOUT)
    path = str(tmp_path / "s.sock")
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(path)
    unix_server.listen(1)
    unix = dial_socket("unix", path, TIMEOUT)
    unix.close()
    unix_server.close()
    with pytest.raises(OSError):
        dial_socket("unix", str(tmp_path / "missing.sock"), TIMEOUT)


# --------------------------------------------------- the recorded Go session
def _trace_messages() -> List[Any]:
    import json

    from testkit.support import go_vectors

    with open(go_vectors("go-session-trace.json"), encoding="utf-8") as f:
        events = json.load(f)["events"]
    return [e for e in events if e["kind"] == "message"]


def test_replay_go_servers_refused_dial_into_our_client() -> None:
    """Feed the Go server's recorded messages for conn 3 (a dial to the closed
    port 127.0.0.1:1, then the HTTP request DATA) to our client session, and
    compare what it answers to what the Go client answered."""
    from remotedialer.heartbeat import Heartbeat
    from remotedialer.protocol import MessageType, decode_message
    from remotedialer.session import Session
    from remotedialer.testing import memory_pair

    conn3 = [e for e in _trace_messages() if e["conn_id"] == 3]
    server_said = [e for e in conn3 if e["dir"] == "s2c"]
    go_client_said = [e for e in conn3 if e["dir"] == "c2s"]
    far, near = memory_pair()
    piper = Piper("replay-piper")
    local = LocalDialer(lambda proto, address: True, piper=piper)
    # Go's client session is keyed "client" with session key 0.
    session = Session(near, is_client=True, client_key="client", session_key=0,
                      connect_handler=local, heartbeat=Heartbeat("replay-heartbeat"))
    thread = session.start()
    try:
        connect, data = server_said[0], server_said[1]
        assert (connect["type_name"], data["type_name"]) == ("CONNECT", "DATA")
        far.send(bytes.fromhex(connect["header_hex"] + connect["payload_hex"]))
        refused = decode_message(far.receive(timeout=TIMEOUT))
        assert (refused.type, refused.conn_id) == (MessageType.ERROR, 3)
        go_refused = go_client_said[0]["payload_text"]
        assert go_refused == "dial tcp 127.0.0.1:1: connect: connection refused"
        assert refused.text.startswith("dial tcp 127.0.0.1:1: ")
        assert "refused" in refused.text.lower()
        # Go then sends a redundant ERROR EOF; we send one ERROR only. The
        # request DATA that crossed it is answered exactly as Go did.
        request = bytes.fromhex(data["payload_head_hex"]).ljust(data["payload_len"], b"\0")
        far.send(bytes.fromhex(data["header_hex"]) + request)
        not_found = decode_message(far.receive(timeout=TIMEOUT))
        assert not_found.type == MessageType.ERROR
        assert bytes(not_found.payload).hex() == go_client_said[-1]["payload_hex"]
        assert not_found.text == "connection not found client/0/3"
        # The Go server echoes the ERROR back: ignored, the session lives on.
        echo = server_said[-1]
        far.send(bytes.fromhex(echo["header_hex"] + echo["payload_hex"]))
        assert not session.closed and session.connection_ids() == []
    finally:
        session.close("test over")
        thread.join(TIMEOUT)
        piper.stop()
        local.shutdown()
