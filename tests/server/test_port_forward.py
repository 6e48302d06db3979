"""PortForward and forward specs, over an in-memory session pair and real
loopback TCP sockets (echo, source and sink servers on port 0)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import NoSessionError
from remotedialer.server.port_forward import (
    WARNING_BURST,
    ForwardSpec,
    PortForward,
    WarningLimiter,
    parse_forward_spec,
    start_forward,
)
from remotedialer.observer import Observer
from remotedialer.piping import LocalDialer, Piper
from remotedialer.session import Session

from testkit.support import (
    TIMEOUT,
    SelectorEchoServer,
    SessionPair,
    TunnelServer,
    echo_concurrently,
    recv_exactly,
    wait_for,
)
from testkit.streams import MiB, SourceServer, payload, recv_to_end


# --------------------------------------------------------------- servers
class SinkServer:
    """Reads every connection to EOF and keeps what it got. While ``gate`` is
    clear it does not read at all (a slow reader)."""

    def __init__(self, rcvbuf: Optional[int] = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.gate = threading.Event()
        self.gate.set()
        self.received: List[bytes] = []
        self.done = threading.Event()
        threading.Thread(target=self._run, name="test-sink", daemon=True).start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        got = bytearray()
        with sock:
            self.gate.wait(60)
            try:
                while True:
                    data = sock.recv(1 << 20)
                    if not data:
                        break
                    got += data
            except OSError:
                pass
        self.received.append(bytes(got))
        self.done.set()

    def close(self) -> None:
        self.listener.close()
        self.gate.set()


# --------------------------------------------------------------- fixtures
class FlowObserver(Observer):
    """Counts the PAUSE / RESUME a session sent."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def connection_paused(self, session: Session, conn: TunnelConnection) -> None:
        self.paused += 1

    def connection_resumed(self, session: Session, conn: TunnelConnection) -> None:
        self.resumed += 1


class Env:
    """A tunnel (server session ``foo`` <-> client session with a LocalDialer
    allowing every target), each side with its own piper as in two processes."""

    def __init__(self, make_pair: Callable[..., SessionPair], limits: Optional[Limits] = None) -> None:
        self.client_piper = Piper("test-client-piper")
        self.server_piper = Piper("test-server-piper")
        self.dialer = LocalDialer(lambda proto, address: True, piper=self.client_piper,
                                  limits=limits or Limits())
        self.pair = make_pair(connect_handler=self.dialer, limits=limits)
        self.server_observer = FlowObserver()
        self.client_observer = FlowObserver()
        self.pair.server.observer = self.server_observer
        self.pair.client.observer = self.client_observer
        self.forwards: List[PortForward] = []

    def forward(self, address: str, proto: str = "tcp", **options: object) -> PortForward:
        server = self.pair.server

        def dial() -> TunnelConnection:
            return server.dial(proto, address, timeout=TIMEOUT)

        fwd = PortForward(dial, ("127.0.0.1", 0), piper=self.server_piper, **options)  # type: ignore[arg-type]
        self.forwards.append(fwd)
        return fwd

    def close(self) -> None:
        for fwd in self.forwards:
            fwd.stop(timeout=TIMEOUT)
        self.pair.close()
        self.dialer.shutdown()
        self.client_piper.stop()
        self.server_piper.stop()


@pytest.fixture
def env(session_pair_factory: Callable[..., SessionPair]) -> Iterator[Env]:
    environment = Env(session_pair_factory)
    yield environment
    environment.close()


def connect(fwd: PortForward, rcvbuf: Optional[int] = None) -> socket.socket:
    """A client socket connected to the forward's port, with a timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(TIMEOUT)
    sock.connect(fwd.address)
    return sock


def wait_stalled(counter: Callable[[], int], polls: int = 20, interval: float = 0.02) -> int:
    """Poll until ``counter()`` stayed unchanged for ``polls`` polls in a row
    (bounded by TIMEOUT); return its value."""
    deadline = time.monotonic() + TIMEOUT
    last, same = counter(), 0
    while same < polls:
        if time.monotonic() > deadline:
            raise AssertionError("the sender never stalled")
        time.sleep(interval)
        value = counter()
        same = same + 1 if value == last else 0
        last = value
    return last


# ------------------------------------------------------------------ specs
@pytest.mark.parametrize(
    "text, spec",
    [
        ("127.0.0.1:9125=foo:tcp:127.0.0.1:8125",
         ForwardSpec(("127.0.0.1", 9125), "foo", "tcp", "127.0.0.1:8125")),
        ("9125=foo:tcp:127.0.0.1:8125",
         ForwardSpec(("127.0.0.1", 9125), "foo", "tcp", "127.0.0.1:8125")),
        ("[::1]:0=a-b.c:tcp6:[::1]:22", ForwardSpec(("::1", 0), "a-b.c", "tcp6", "[::1]:22")),
        ("0.0.0.0:80=k:unix:/run/app.sock", ForwardSpec(("0.0.0.0", 80), "k", "unix", "/run/app.sock")),
        ("localhost:1=k:tcp:db.internal:5432", ForwardSpec(("localhost", 1), "k", "tcp", "db.internal:5432")),
        (":9125=k:tcp:127.0.0.1:1", ForwardSpec(("0.0.0.0", 9125), "k", "tcp", "127.0.0.1:1")),
    ],
)
def test_parse_forward_spec(text: str, spec: ForwardSpec) -> None:
    assert parse_forward_spec(text) == spec
    assert parse_forward_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "", "9125", "9125=foo", "9125=foo:tcp", "9125=foo:tcp:", "9125=:tcp:x:1", "9125=foo::x:1",
        "host=foo:tcp:x:1", "70000=foo:tcp:x:1", "::1:80=foo:tcp:x:1",
        "9125=foo:tc/p:x:1", "a:b=foo:tcp:x:1",
    ],
)
def test_parse_forward_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_forward_spec(text)


@pytest.mark.parametrize("proto", ["udp", "udp4", "foo", "ip", "unixgram", "TCP"])
def test_only_stream_protocols_can_be_forwarded(proto: str) -> None:
    with pytest.raises(ValueError, match=f"cannot forward proto '{proto}'.*tcp, tcp4, tcp6, unix"):
        parse_forward_spec(f"9125=foo:{proto}:127.0.0.1:53")
    spec = ForwardSpec(("127.0.0.1", 0), "foo", proto, "127.0.0.1:53")
    with pytest.raises(ValueError, match="cannot forward proto"):
        start_forward(FakeServer({}), spec)


# ---------------------------------------------------------------- listener
def test_binds_free_port_and_stops(env: Env, echo: SelectorEchoServer) -> None:
    with env.forward(echo.address) as fwd:
        host, port = fwd.address
        assert host == "127.0.0.1" and port > 0
        assert "127.0.0.1" in repr(fwd)
        with connect(fwd) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        assert fwd.accepted == 1
    assert fwd.stopped
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    assert fwd.stop() is True  # idempotent


def test_ipv6_listener(env: Env, echo: SelectorEchoServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = env.pair.server
    try:
        fwd = PortForward(lambda: server.dial("tcp", echo.address), ("::1", 0), piper=env.server_piper)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with fwd, socket.create_connection(fwd.address[:2], timeout=TIMEOUT) as sock:
        assert sock.family == socket.AF_INET6
        sock.sendall(b"six")
        assert recv_exactly(sock, 3) == b"six"


def test_accepted_sockets_get_nodelay(env: Env, echo: SelectorEchoServer) -> None:
    fwd = env.forward(echo.address)
    with connect(fwd) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        pipes = list(env.server_piper._pipes)
        assert len(pipes) == 1
        accepted = pipes[0].sock  # type: ignore[attr-defined]
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_bind_failure_raises() -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    with holder, pytest.raises(OSError):
        PortForward(lambda: None, holder.getsockname()[:2])  # type: ignore[arg-type,return-value]


# -------------------------------------------------------------------- data
def test_bytes_both_ways_byte_exact(env: Env, echo: SelectorEchoServer) -> None:
    fwd = env.forward(echo.address)
    data = payload(8 * MiB, 1)
    with connect(fwd) as sock:
        assert echo_concurrently(sock, data) == data
    wait_for(lambda: fwd.active == 0)


def test_far_side_close_delivers_everything_then_eof(env: Env) -> None:
    data = payload(5 * MiB + 3, 2)
    source = SourceServer(data)
    try:
        fwd = env.forward(source.address)
        with connect(fwd) as sock:
            got, error = recv_to_end(sock)
        assert error is None
        assert got == data
        wait_for(lambda: fwd.active == 0)
    finally:
        source.close()


def test_local_fin_delivers_upload_then_closes(env: Env) -> None:
    """Half-close from the TCP side: what was sent before FIN reaches the
    target followed by EOF, and the local client sees EOF at once (there is
    no half-open state to keep)."""
    sink = SinkServer()
    try:
        fwd = env.forward(sink.address)
        data = payload(3 * MiB, 3)
        with connect(fwd) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got, _error = recv_to_end(sock)  # returns: the forward closed us
            assert got == b""
        assert sink.done.wait(TIMEOUT)
        assert sink.received == [data]
        wait_for(lambda: fwd.active == 0)
    finally:
        sink.close()


def test_local_fin_cuts_the_reply(env: Env) -> None:
    """A target that keeps sending after our FIN: the forwarded connection
    ends anyway (the reply is cut, not held open), and the target is closed."""
    source = SourceServer(payload(1 * MiB, 4), hold=True)  # sends forever
    try:
        fwd = env.forward(source.address)
        with connect(fwd) as sock:
            assert len(recv_exactly(sock, 1000)) == 1000
            sock.shutdown(socket.SHUT_WR)
            _got, _error = recv_to_end(sock)  # ends: no half-open forwarding
        assert source.peer_closed.wait(TIMEOUT)
        wait_for(lambda: fwd.active == 0)
    finally:
        source.close()


def test_remote_dial_failure_closes_promptly(env: Env) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now
    fwd = env.forward(address)
    with connect(fwd) as sock:
        got, _error = recv_to_end(sock)
        assert got == b""
    wait_for(lambda: fwd.active == 0)


def test_remote_dial_failure_is_logged_once(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A dial the far side could not make: one WARNING naming the forward,
    the client key, the target and the far side's reason."""
    closed = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now
    caplog.set_level(logging.WARNING, logger="remotedialer")
    fwd = env.forward(address)
    with connect(fwd) as sock:
        assert recv_to_end(sock)[0] == b""
    def warned() -> List[str]:
        # (only this forward's: a thread of an earlier test may still log)
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and fwd.name in r.getMessage()]

    # The count goes up just before the warning is logged: wait for both.
    wait_for(lambda: fwd.failed == 1 and warned())
    warnings = warned()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{fwd.name}: connection from 127.0.0.1:")
    assert f"failed at client foo, target tcp/{address}: dial tcp {address}:" in warnings[0]
    assert "refused" in warnings[0].lower()


def test_failure_warnings_are_rate_limited(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    caplog.set_level(logging.WARNING, logger="remotedialer.server.port_forward")
    fwd = env.forward(address)
    for _ in range(WARNING_BURST + 7):
        with connect(fwd) as sock:
            recv_to_end(sock)
    def warned() -> int:
        return sum(r.levelno == logging.WARNING and fwd.name in r.getMessage() for r in caplog.records)

    wait_for(lambda: fwd.failed == WARNING_BURST + 7 and warned() >= WARNING_BURST)
    assert warned() == WARNING_BURST


def test_warning_limiter_counts_what_it_left_out() -> None:
    now = [0.0]
    limiter = WarningLimiter(burst=2, window=10.0, clock=lambda: now[0])
    assert [limiter.admit() for _ in range(5)] == [0, 0, None, None, None]
    now[0] = 9.9
    assert limiter.admit() is None
    now[0] = 10.0
    assert limiter.admit() == 4  # the next one says how many went unlogged
    assert limiter.admit() == 0
    assert limiter.admit() is None


# ---------------------------------------------------------------- failures
def test_dial_error_closes_accepted_connection_at_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = []

    def dial() -> TunnelConnection:
        attempts.append(1)
        raise NoSessionError("failed to find Session for client foo")

    caplog.set_level(logging.WARNING, logger="remotedialer.server.port_forward")
    with PortForward(dial, piper=env.server_piper) as fwd:
        for _ in range(3):
            with connect(fwd) as sock:
                got, _error = recv_to_end(sock)
                assert got == b""
        assert fwd.failed == 3 and fwd.accepted == 3 and fwd.active == 0
    assert len(attempts) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "remotedialer.server.port_forward"]
    assert sum("failed to find Session" in m and "NoSessionError" in m for m in messages) == 3


def test_absent_client_ends_a_connection_that_sent_first_with_eof(
    env: Env, make_tunnel_server: Callable[..., TunnelServer]
) -> None:
    """The local program connects and sends before the forward dials (the
    dial waits for it); the real server has no session for the key, so the
    dial fails. The program must read EOF (FIN), as docs/forwarding.rst
    says, not a reset: closing a socket with unread input sends RST."""
    server = make_tunnel_server().server
    sent = threading.Event()

    def dial() -> TunnelConnection:
        assert sent.wait(TIMEOUT)
        return server.dial("absent", "tcp", "127.0.0.1:9", TIMEOUT)

    with PortForward(dial, piper=env.server_piper) as fwd:
        for _ in range(5):
            with connect(fwd) as sock:
                sock.sendall(b"EHLO nobody\r\n" * 100)
                sent.set()
                got, error = recv_to_end(sock)
                sent.clear()
                assert (got, error) == (b"", None)
        assert fwd.failed == 5 and fwd.active == 0


def test_session_end_closes_forwarded_connections(env: Env) -> None:
    source = SourceServer(payload(1 * MiB, 5), hold=True)  # endless stream
    try:
        fwd = env.forward(source.address)
        socks = [connect(fwd) for _ in range(5)]
        for sock in socks:
            recv_exactly(sock, 100_000)  # mid-transfer
        wait_for(lambda: fwd.active == 5)
        env.pair.client.close("client went away")
        for sock in socks:
            with sock:
                recv_to_end(sock)  # EOF (or reset) within the timeout, not a hang
        wait_for(lambda: fwd.active == 0)
        # and new connections are refused at once while the session is gone
        with connect(fwd) as sock:
            assert recv_to_end(sock)[0] == b""
        assert fwd.failed >= 1
    finally:
        source.close()


def test_stop_closes_live_connections(env: Env, echo: SelectorEchoServer) -> None:
    fwd = env.forward(echo.address)
    socks = [connect(fwd) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    conns = fwd.connections()
    assert len(conns) == 3
    assert fwd.stop(close_connections=True, timeout=TIMEOUT)
    for sock in socks:
        with sock:
            assert recv_to_end(sock)[0] == b""
    assert all(conn.closed for conn in conns)
    wait_for(lambda: not env.pair.server.connections() and not env.pair.client.connections())


def test_stop_can_keep_live_connections(env: Env, echo: SelectorEchoServer) -> None:
    fwd = env.forward(echo.address)
    with connect(fwd) as sock:
        sock.sendall(b"one")
        assert recv_exactly(sock, 3) == b"one"
        assert fwd.stop(close_connections=False, timeout=TIMEOUT)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(fwd.address, timeout=TIMEOUT).close()
        sock.sendall(b"two")
        assert recv_exactly(sock, 3) == b"two"
    assert fwd.wait_idle(TIMEOUT)


# ------------------------------------------------------------ backpressure
SMALL_WINDOW = Limits(pause_threshold=256 * 1024, resume_threshold=32 * 1024)
# What may sit in a buffer past its pause threshold: the bytes in flight
# before the PAUSE reached the sender (the loopback socket buffers, which the
# kernel grows to several MiB, plus what it wrote meanwhile; more on a loaded
# machine). A sender that ignored PAUSE would fill it with all 48 MiB.
IN_FLIGHT = 8 * MiB


@pytest.fixture
def small_window_env(session_pair_factory: Callable[..., SessionPair]) -> Iterator[Env]:
    environment = Env(session_pair_factory, limits=SMALL_WINDOW)
    yield environment
    environment.close()


def test_slow_local_reader_pauses_far_side(small_window_env: Env) -> None:
    env = small_window_env
    data = payload(48 * MiB, 6)
    source = SourceServer(data, sndbuf=64 * 1024)
    try:
        fwd = env.forward(source.address)
        with connect(fwd, rcvbuf=64 * 1024) as sock:
            # Nobody reads: the source must stall with a bounded amount in between.
            wait_for(lambda: env.server_observer.paused >= 1)
            stalled_at = wait_stalled(lambda: source.sent)
            assert stalled_at < len(data) // 2
            far = env.pair.client.connections()
            assert len(far) == 1
            wait_for(lambda: far[0].peer_paused_us)  # stable once everything is full
            near = env.pair.server.connections()[0]
            assert near.buffered <= SMALL_WINDOW.pause_threshold + IN_FLIGHT
            got = recv_exactly(sock, len(data))
        assert got == data
        assert env.server_observer.resumed >= 1
        wait_for(lambda: fwd.active == 0)
    finally:
        source.close()


def test_slow_far_reader_stops_local_writer(small_window_env: Env) -> None:
    env = small_window_env
    sink = SinkServer(rcvbuf=64 * 1024)
    sink.gate.clear()  # the target does not read for now
    data = payload(48 * MiB, 7)
    try:
        fwd = env.forward(sink.address)
        sock = connect(fwd)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sent = [0]
        errors: List[BaseException] = []

        def write() -> None:
            try:
                view = memoryview(data)
                for start in range(0, len(view), 64 * 1024):
                    sock.sendall(view[start : start + 64 * 1024])
                    sent[0] += len(view[start : start + 64 * 1024])
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        wait_for(lambda: env.client_observer.paused >= 1)
        stalled_at = wait_stalled(lambda: sent[0])
        assert stalled_at < len(data) // 2
        near = env.pair.server.connections()
        assert len(near) == 1
        wait_for(lambda: near[0].peer_paused_us)
        far = env.pair.client.connections()[0]
        assert far.buffered <= SMALL_WINDOW.pause_threshold + IN_FLIGHT
        sink.gate.set()
        writer.join(TIMEOUT)
        assert not writer.is_alive() and not errors
        assert sink.done.wait(TIMEOUT)
        assert sink.received == [data]
        sock.close()
        wait_for(lambda: fwd.active == 0)
    finally:
        sink.close()


# ------------------------------------------------------------------- scale
def test_many_concurrent_connections_bounded_threads(env: Env, echo: SelectorEchoServer) -> None:
    count = 200
    fwd = env.forward(echo.address)
    baseline = threading.active_count()
    peak = baseline
    socks = []
    try:
        for _ in range(count):
            socks.append(connect(fwd))
        messages = [payload(4096, 100 + i) for i in range(count)]
        for sock, message in zip(socks, messages):
            sock.sendall(message)
        for sock, message in zip(socks, messages):
            assert recv_exactly(sock, len(message)) == message
            peak = max(peak, threading.active_count())
        wait_for(lambda: fwd.active == count)
        assert len(env.pair.server.connections()) == count
        assert echo.accepted == count
        peak = max(peak, threading.active_count())
        # the local dial pool (Limits.dial_workers) is the only pool that grows
        assert peak - baseline <= Limits().dial_workers + 2, (baseline, peak)
        # a second round over the same connections, all still open together
        for sock, message in zip(socks, messages):
            sock.sendall(message[::-1])
        for sock, message in zip(socks, messages):
            assert recv_exactly(sock, len(message)) == message[::-1]
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: fwd.active == 0)
    wait_for(lambda: not env.pair.server.connections())


# ------------------------------------------------------------- start_forward
class FakeServer:
    """Stands in for the server: dials through a session by client key."""

    def __init__(self, sessions: Dict[str, Session]) -> None:
        self.sessions = sessions
        self.calls: List[Tuple[str, str, str, Optional[float]]] = []

    def dial(
        self, client_key: str, proto: str, address: str, timeout: Optional[float] = None
    ) -> TunnelConnection:
        self.calls.append((client_key, proto, address, timeout))
        session = self.sessions.get(client_key)
        if session is None:
            raise NoSessionError(f"failed to find Session for client {client_key}")
        return session.dial(proto, address, timeout)


def test_start_forward_dials_by_key(env: Env, echo: SelectorEchoServer) -> None:
    server = FakeServer({"foo": env.pair.server})
    spec = parse_forward_spec(f"127.0.0.1:0=foo:tcp:{echo.address}")
    with start_forward(server, spec, dial_timeout=3.0, piper=env.server_piper) as fwd:
        assert fwd.name == f"forward 127.0.0.1:{fwd.address[1]}=foo:tcp:{echo.address}"
        with connect(fwd) as sock:
            sock.sendall(b"keyed")
            assert recv_exactly(sock, 5) == b"keyed"
    assert server.calls == [("foo", "tcp", echo.address, 3.0)]
    absent = parse_forward_spec(f"0=bar:tcp:{echo.address}")
    with start_forward(server, absent, piper=env.server_piper) as fwd:
        with connect(fwd) as sock:
            assert recv_to_end(sock)[0] == b""
        assert fwd.failed == 1
