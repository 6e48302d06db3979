"""Resumption end to end: a real werkzeug server and a TunnelClient with a
TCP proxy between them (testkit.cut_proxy) that resets or silently drops
the connection mid-transfer. With resumption on, a download through
``Server.dial`` completes byte-exact (sha256) and an interactive echo stream
carries on; with an unknown token the connections fail as today
(``ECONNRESET``) and a new session comes up."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from typing import Callable, Iterator, List, Tuple

import pytest

from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import NoSessionError
from remotedialer.resumable import ResumableSession
from remotedialer.server.sessions import ResumeTokens
from testkit.cut_proxy import CutProxy
from testkit.support import EchoServer, LoopbackListener, ResumeEvents, TunnelServer, allow_all, wait_for

MiB = 1024 * 1024
TIMEOUT = 60.0
LIMITS = Limits(resume_window=30.0, ping_interval=0.2)


def pattern_block(index: int) -> bytes:
    """The ``index``-th 64 KiB block of the download."""
    return hashlib.sha256(b"%d" % index).digest() * 2048


class DownloadServer(LoopbackListener):
    """Sends ``size`` bytes of :func:`pattern_block` to each connection, then closes."""

    def __init__(self, size: int) -> None:
        self.size = size
        super().__init__(name="download-server")

    def handle(self, sock: socket.socket) -> None:
        def send(sock: socket.socket) -> None:
            with sock:
                try:
                    for index in range(self.size // (64 * 1024)):
                        sock.sendall(pattern_block(index))
                except OSError:
                    pass

        self.serve_on_thread(send, sock)

    def digest(self) -> str:
        digest = hashlib.sha256()
        for index in range(self.size // (64 * 1024)):
            digest.update(pattern_block(index))
        return digest.hexdigest()


class Setup:
    def __init__(self, limits: Limits = LIMITS) -> None:
        self.server_events = ResumeEvents()
        self.client_events = ResumeEvents()
        self.tunnel = TunnelServer(limits=limits, observer=self.server_events)
        self.proxy = CutProxy(("127.0.0.1", self.tunnel.port))
        self.client = TunnelClient(
            f"ws://127.0.0.1:{self.proxy.port}/connect", {"X-Tunnel-ID": "foo"}, allow_all,
            limits=limits, backoff=Backoff(initial=0.05, maximum=0.2), observer=self.client_events,
        )
        self.client.start()
        self.client.wait_connected(TIMEOUT)
        wait_for(lambda: self.tunnel.server.has_session("foo"), TIMEOUT)

    def dial(self, address: str) -> TunnelConnection:
        return self.tunnel.server.dial("foo", "tcp", address, timeout=TIMEOUT)

    def close(self) -> None:
        self.client.stop(TIMEOUT)
        self.proxy.close()
        self.tunnel.close()


@pytest.fixture
def setup() -> Iterator[Setup]:
    made = Setup()
    yield made
    made.close()


def download(
    read: Callable[[int], bytes], size: int, cut_at: List[int], cut: Callable[[], None]
) -> Tuple[int, str]:
    """Read with ``read(n)`` until ``size`` bytes or EOF, calling ``cut()`` as
    the count passes each of ``cut_at``; the count and the sha256 read."""
    digest = hashlib.sha256()
    got = 0
    pending = sorted(cut_at)
    while got < size:
        data = read(1 << 20)
        if not data:
            break
        digest.update(data)
        got += len(data)
        while pending and got >= pending[0]:
            pending.pop(0)
            cut()
    return got, digest.hexdigest()


def test_download_survives_resets(setup: Setup) -> None:
    size = 64 * MiB
    target = DownloadServer(size)
    try:
        conn = setup.dial(target.address)
        got, digest = download(conn.recv, size, [8 * MiB, 24 * MiB, 40 * MiB], setup.proxy.reset)
        assert got == size
        assert digest == target.digest()
        assert conn.recv(1) == b""  # then the target's clean close
    finally:
        target.close()
    assert len(setup.client_events.suspended) >= 3
    assert len(setup.server_events.resumed) >= 3
    assert setup.proxy.accepted >= 4  # one WebSocket per cut, plus the first
    assert setup.client_events.refused == setup.server_events.refused == []


@pytest.mark.slow
def test_one_gib_download_survives_a_reset_every_few_seconds(setup: Setup) -> None:
    """1 GiB through ``dial()`` while a timer resets the tunnel's TCP
    connection every 3 s (the issue's "cut every 10 s over a long
    transfer", faster): the sha256 is right."""
    size = 1024 * MiB
    target = DownloadServer(size)
    stop = threading.Event()
    cuts: List[float] = []

    def cutter() -> None:
        while not stop.wait(3.0):
            setup.proxy.reset()
            cuts.append(time.monotonic())

    thread = threading.Thread(target=cutter, daemon=True)
    try:
        conn = setup.dial(target.address)
        thread.start()
        got, digest = download(conn.recv, size, [], lambda: None)
    finally:
        stop.set()
        thread.join(TIMEOUT)
        target.close()
    assert got == size and digest == target.digest()
    assert len(cuts) >= 2, "the transfer was over before the cuts began"


def test_download_survives_a_silent_drop(setup: Setup) -> None:
    size = 32 * MiB
    target = DownloadServer(size)
    outage: List[float] = []

    def drop() -> None:
        setup.proxy.blackhole()
        # the client notices two missed pongs (0.4 s here), then retries; the
        # network comes back a little later
        wait_for(lambda: setup.client_events.suspended, TIMEOUT)
        time.sleep(0.3)  # the outage itself, not a synchronisation
        outage.append(time.monotonic())
        setup.proxy.restore()

    try:
        conn = setup.dial(target.address)
        got, digest = download(conn.recv, size, [8 * MiB], drop)
        assert got == size and digest == target.digest()
    finally:
        target.close()
    assert setup.server_events.resumed


def test_echo_stream_carries_on(setup: Setup) -> None:
    echo = EchoServer()
    try:
        conn = setup.dial(echo.address)
        for round_ in range(6):
            line = b"line %d\n" % round_
            conn.sendall(line)
            if round_ % 2:
                resumed = len(setup.server_events.resumed)
                setup.proxy.reset()
                wait_for(lambda: len(setup.server_events.resumed) > resumed, TIMEOUT)  # noqa: B023
            got = b""
            while len(got) < len(line):
                got += conn.recv(100)
            assert got == line
    finally:
        echo.close()
    assert len(setup.server_events.resumed) >= 3


def _suspend_both_ends(setup: Setup) -> ResumableSession:
    """Cut the tunnel and refuse reconnects; the server's session, suspended."""
    (session,) = setup.tunnel.server.sessions("foo")
    assert isinstance(session, ResumableSession)
    setup.proxy.blackhole()  # no reconnect until restore()
    setup.proxy.reset()
    wait_for(lambda: session.resume_state == "suspended", TIMEOUT)
    return session


def test_dial_during_a_suspension_waits_for_the_resume(setup: Setup) -> None:
    """A dial while the key's only session is suspended waits for it to
    resume (the code before failed at once with NoSessionError)."""
    echo = EchoServer()
    try:
        session = _suspend_both_ends(setup)
        outcome: List[object] = []
        dialer = threading.Thread(target=lambda: outcome.append(_dial_or_error(setup, echo.address)))
        dialer.start()
        dialer.join(0.5)
        assert dialer.is_alive() and not outcome, outcome  # waiting, not failed
        setup.proxy.restore()
        dialer.join(TIMEOUT)
        (conn,) = outcome
        assert isinstance(conn, TunnelConnection), conn
        conn.settimeout(TIMEOUT)
        conn.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        assert setup.tunnel.server.sessions("foo") == [session]  # the same session, resumed
        conn.close()
    finally:
        echo.close()


def test_dial_during_a_suspension_fails_when_its_timeout_passes(setup: Setup) -> None:
    echo = EchoServer()
    try:
        _suspend_both_ends(setup)
        started = time.monotonic()
        with pytest.raises(NoSessionError):
            setup.tunnel.server.dial("foo", "tcp", echo.address, timeout=0.5)
        assert time.monotonic() - started >= 0.5  # it waited for the resume
        setup.proxy.restore()
        wait_for(lambda: setup.server_events.resumed, TIMEOUT)
        conn = setup.dial(echo.address)  # the resumed session takes dials again
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
    finally:
        echo.close()


def _dial_or_error(setup: Setup, address: str) -> object:
    try:
        return setup.dial(address)
    except Exception as exc:  # the test reports it
        return exc


def test_unknown_token_fails_connections_as_today() -> None:
    # a short window: the server's copy of the session ends with it
    setup = Setup(LIMITS.replace(resume_window=2.0))
    echo = EchoServer()
    try:
        conn = setup.dial(echo.address)
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
        setup.tunnel.server.resume_tokens = ResumeTokens()  # as after a server restart
        setup.proxy.reset()
        with pytest.raises(ConnectionResetError):
            conn.settimeout(TIMEOUT)
            conn.recv(1)
        wait_for(lambda: setup.client_events.refused, TIMEOUT)
        assert setup.client_events.refused == ["unknown token"]
        # a new session is up and works
        wait_for(lambda: any(s.accepting_dials for s in setup.tunnel.server.sessions("foo")), TIMEOUT)
        again = setup.dial(echo.address)
        again.sendall(b"y")
        assert again.recv(1) == b"y"
    finally:
        echo.close()
        setup.close()


def test_resumption_off_is_todays_behaviour() -> None:
    made = Setup(Limits(resume_window=0))
    echo = EchoServer()
    try:
        conn = made.dial(echo.address)
        assert not any(isinstance(s, ResumableSession) for s in made.tunnel.server.sessions("foo"))
        assert "X-Remotedialer-Resume" not in made.tunnel.requests[-1]
        made.proxy.reset()
        with pytest.raises(ConnectionResetError):
            conn.settimeout(TIMEOUT)
            conn.recv(1)
    finally:
        echo.close()
        made.close()


def test_cli_download_through_the_client_route_survives_resets() -> None:
    """``remotedialer server`` and ``remotedialer client`` with
    ``--resume-window``: a download through ``/client/`` is byte-exact
    across two resets of the TCP connection under the tunnel."""
    import http.client

    from remotedialer.examples.file_server import DummyServer, generated_bytes

    from testkit.cli import LISTENING, Proc

    web = DummyServer(("127.0.0.1", 0))
    web.start()
    server = Proc.cli("server", "--listen", "127.0.0.1:0", "--timeout", "30", "--resume-window", "30")
    procs = [server]
    proxy = None
    try:
        port = int(server.wait_for(LISTENING).group(1))
        proxy = CutProxy(("127.0.0.1", port))
        client = Proc.cli("client", "--connect", f"ws://127.0.0.1:{proxy.port}/connect", "--id", "foo",
                          "--resume-window", "30")
        procs.append(client)
        server.wait_for(re.compile(r"client session started for foo "))
        size = 48 * MiB
        http_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        http_conn.request("GET", f"/client/foo/http/127.0.0.1:{web.port}/bytes/{size}")
        response = http_conn.getresponse()
        assert response.status == 200
        got, digest = download(response.read, size, [8 * MiB, 24 * MiB], proxy.reset)
        assert response.read() == b""  # nothing after the body
        http_conn.close()
        assert got == size
        assert digest == hashlib.sha256(generated_bytes(size)).hexdigest()
        wait_for(lambda: client.output.count("resumed the tunnel") >= 2, TIMEOUT)
        assert server.output.count("reattached from") >= 2
    finally:
        for proc in reversed(procs):
            proc.stop()
        if proxy is not None:
            proxy.close()
        web.stop()
