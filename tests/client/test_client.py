"""TunnelClient / connect_to_proxy / client_connect against the real WSGI
Server on a loopback werkzeug server, over real WebSockets."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from remotedialer.client import Backoff, TunnelClient, client_connect, connect_to_proxy
from remotedialer.config import Limits
from remotedialer.errors import ConfigurationError, HandshakeError, RemoteError
from remotedialer.session import Session

from testkit.support import TIMEOUT, EchoServer, TunnelServer, recv_exactly, wait_for

FAST = Backoff(initial=0.02, maximum=0.1, factor=2.0, jitter=0.5)


@pytest.fixture
def clients() -> Iterator[List[TunnelClient]]:
    """TunnelClients made by a test; all stopped at teardown."""
    made: List[TunnelClient] = []
    yield made
    for client in made:
        client.stop(timeout=TIMEOUT)


def start_client(clients: List[TunnelClient], url: str, **kwargs: Any) -> TunnelClient:
    kwargs.setdefault("backoff", FAST)
    kwargs.setdefault("headers", {"X-Tunnel-ID": "foo"})
    client = TunnelClient(url, **kwargs)
    clients.append(client)
    client.start()
    return client


class Recorder:
    """An on_connect callback that records sessions."""

    def __init__(self) -> None:
        self.sessions: List[Session] = []
        self.threads: List[str] = []
        self._cond = threading.Condition()

    def __call__(self, session: Session) -> None:
        with self._cond:
            self.sessions.append(session)
            self.threads.append(threading.current_thread().name)
            self._cond.notify_all()

    def wait(self, count: int) -> List[Session]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.sessions) >= count, TIMEOUT)
            return list(self.sessions)


# ----------------------------------------------------------------- connect
def test_connects_sends_headers_and_calls_on_connect(
    tunnel_server: TunnelServer, clients: List[TunnelClient],
) -> None:
    recorder = Recorder()
    client = start_client(
        clients, tunnel_server.url,
        headers={"X-Tunnel-ID": "foo", "X-Custom": "custom value"},
        on_connect=recorder,
    )
    session = client.wait_connected(TIMEOUT)
    assert recorder.wait(1) == [session]
    assert recorder.threads[0] != threading.current_thread().name
    assert session.is_client and not session.closed
    wait_for(lambda: tunnel_server.server.has_session("foo"))
    headers = tunnel_server.requests[-1]
    assert headers["X-Tunnel-Id"] == "foo"
    assert headers["X-Custom"] == "custom value"
    assert headers["Upgrade"].lower() == "websocket"


def test_reverse_dial_through_client(
    tunnel_server: TunnelServer, clients: List[TunnelClient], echo_server: EchoServer,
) -> None:
    allowed: List[Tuple[str, str]] = []

    def authorizer(proto: str, address: str) -> bool:
        allowed.append((proto, address))
        return address == echo_server.address

    client = start_client(clients, tunnel_server.url, connect_authorizer=authorizer)
    client.wait_connected(TIMEOUT)
    wait_for(lambda: tunnel_server.server.has_session("foo"))
    conn = tunnel_server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    assert conn.conn_id == 2  # the first dial of a session, as in Go
    data = bytes(range(256)) * 8192  # 2 MiB
    sender = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
    sender.start()
    assert recv_exactly(conn, len(data)) == data
    sender.join(TIMEOUT)
    conn.close()
    refused = tunnel_server.server.dial("foo", "tcp", "127.0.0.1:1", timeout=TIMEOUT)
    with pytest.raises(RemoteError, match="connect not allowed"):
        refused.recv(1)
    assert allowed == [("tcp", echo_server.address), ("tcp", "127.0.0.1:1")]
    assert not client.session.closed  # type: ignore[union-attr]


def test_no_connect_authorizer_refuses_every_dial(
    tunnel_server: TunnelServer, clients: List[TunnelClient], echo_server: EchoServer,
) -> None:
    client = start_client(clients, tunnel_server.url)
    client.wait_connected(TIMEOUT)
    wait_for(lambda: tunnel_server.server.has_session("foo"))
    conn = tunnel_server.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT)
    with pytest.raises(RemoteError, match="connect not allowed"):
        conn.recv(1)
    assert echo_server.accepted == []
    assert client.session is not None and not client.session.closed


def test_keepalive_pongs_from_real_server(tunnel_server: TunnelServer, clients: List[TunnelClient]) -> None:
    limits = Limits(ping_interval=0.02, read_deadline=2.0)
    client = start_client(clients, tunnel_server.url, limits=limits)
    session = client.wait_connected(TIMEOUT)
    first = session.transport.last_keepalive
    wait_for(lambda: session.transport.last_keepalive > first)  # a pong came back
    assert not session.closed


# ------------------------------------------------------------ handshake
def test_refused_handshake_401(tunnel_server: TunnelServer) -> None:
    with pytest.raises(HandshakeError) as info:
        connect_to_proxy(tunnel_server.url, {"X-Other": "x"})
    assert info.value.status == 401
    assert info.value.body == "failed authentication"
    assert "401" in str(info.value)
    assert isinstance(info.value, ConnectionRefusedError)


def test_refused_handshake_400_carries_error_text(tunnel_server: TunnelServer) -> None:
    def authorize(request: Any) -> Tuple[str, bool]:
        raise ValueError("token expired")

    tunnel_server.authorize = authorize
    with pytest.raises(HandshakeError) as info:
        connect_to_proxy(tunnel_server.url, {"X-Tunnel-ID": "foo"})
    assert info.value.status == 400
    assert "token expired" in info.value.body


def test_connect_to_proxy_returns_when_session_ends(tunnel_server: TunnelServer) -> None:
    recorder = Recorder()
    result: List[str] = []
    thread = threading.Thread(
        target=lambda: result.append(
            connect_to_proxy(tunnel_server.url, {"X-Tunnel-ID": "foo"}, on_connect=recorder)
        ),
        daemon=True,
    )
    thread.start()
    recorder.wait(1)
    wait_for(lambda: tunnel_server.server.has_session("foo"))
    tunnel_server.server.sessions("foo")[0].close("kicked")
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert result and isinstance(result[0], str)


def test_connection_refused_is_an_os_error() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(OSError):
        connect_to_proxy(f"ws://127.0.0.1:{port}/connect", {"X-Tunnel-ID": "foo"})


# ------------------------------------------------------------ reconnecting
def test_reconnects_after_server_drops_the_websocket(
    tunnel_server: TunnelServer, clients: List[TunnelClient],
) -> None:
    recorder = Recorder()
    client = start_client(clients, tunnel_server.url, on_connect=recorder)
    first = recorder.wait(1)[0]
    for round_ in range(2, 4):
        wait_for(lambda: tunnel_server.server.has_session("foo"))
        tunnel_server.server.sessions("foo")[0].close("dropped by test")
        assert first.wait_closed(TIMEOUT)
        sessions = recorder.wait(round_)
        assert sessions[-1] is not first and not sessions[-1].closed
        first = sessions[-1]
    assert client.wait_connected(TIMEOUT) is first


def test_retries_refused_handshakes_with_backoff(
    tunnel_server: TunnelServer, clients: List[TunnelClient],
) -> None:
    attempts: List[float] = []

    def authorize(request: Any) -> Tuple[str, bool]:
        attempts.append(time.monotonic())
        return "foo", len(attempts) > 3  # refuse three times

    tunnel_server.authorize = authorize
    backoff = Backoff(initial=0.05, maximum=1.0, factor=2.0, jitter=0.0)
    client = start_client(clients, tunnel_server.url, backoff=backoff)
    client.wait_connected(TIMEOUT)
    assert len(attempts) == 4
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # Without jitter the waits are 0.05, 0.1, 0.2: each at least its delay.
    for gap, delay in zip(gaps, (0.05, 0.1, 0.2)):
        assert gap >= delay
    assert client.last_error is None or isinstance(client.last_error, HandshakeError)


def test_backoff_delays() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0, factor=2.0, jitter=0.5)
    for failures, base in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (50, 10.0)]:
        for _ in range(20):
            assert base * 0.5 <= backoff.delay(failures) <= base
    fixed = Backoff(initial=5.0, maximum=5.0, jitter=0.0)  # the Go client's fixed 5 s
    assert fixed.delay(0) == fixed.delay(7) == 5.0
    assert len({backoff.delay(3) for _ in range(20)}) > 1  # jittered


# ---------------------------------------------------------------- stopping
def test_stop_from_another_thread_while_connected(
    tunnel_server: TunnelServer, clients: List[TunnelClient],
) -> None:
    client = start_client(clients, tunnel_server.url, backoff=Backoff(initial=60.0, maximum=60.0))
    session = client.wait_connected(TIMEOUT)
    stopper = threading.Thread(target=client.stop, kwargs={"timeout": TIMEOUT}, daemon=True)
    stopper.start()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert client._thread is not None and not client._thread.is_alive()
    assert session.closed
    wait_for(lambda: not tunnel_server.server.has_session("foo"))


def test_stop_while_waiting_to_reconnect(clients: List[TunnelClient]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    # A minute of backoff: stop() must not wait for it.
    client = start_client(clients, f"ws://127.0.0.1:{port}/connect",
                          backoff=Backoff(initial=60.0, maximum=60.0))
    wait_for(lambda: client.last_error is not None)
    assert isinstance(client.last_error, OSError)
    stopper = threading.Thread(target=client.stop, kwargs={"timeout": TIMEOUT}, daemon=True)
    stopper.start()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert client._thread is not None and not client._thread.is_alive()


def test_client_connect_with_stop_event(tunnel_server: TunnelServer) -> None:
    stop = threading.Event()
    recorder = Recorder()
    thread = threading.Thread(
        target=client_connect,
        args=(tunnel_server.url, {"X-Tunnel-ID": "foo"}),
        kwargs={"on_connect": recorder, "stop_event": stop, "backoff": FAST},
        daemon=True,
    )
    thread.start()
    session = recorder.wait(1)[0]
    stop.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert session.closed


def test_context_manager(tunnel_server: TunnelServer) -> None:
    with TunnelClient(tunnel_server.url, {"X-Tunnel-ID": "ctx"}, backoff=FAST) as client:
        session = client.wait_connected(TIMEOUT)
        wait_for(lambda: tunnel_server.server.has_session("ctx"))
    assert session.closed
    wait_for(lambda: not tunnel_server.server.has_session("ctx"))


def test_on_connect_failure_closes_session_and_reconnects(
    tunnel_server: TunnelServer, clients: List[TunnelClient],
) -> None:
    calls: List[Session] = []

    def on_connect(session: Session) -> None:
        calls.append(session)
        if len(calls) == 1:
            raise RuntimeError("setup failed")

    start_client(clients, tunnel_server.url, on_connect=on_connect)
    wait_for(lambda: len(calls) >= 2)
    assert calls[0].wait_closed(TIMEOUT)
    assert "on_connect failed" in calls[0].close_reason



def test_a_tunnel_the_server_closed_is_reopened_at_once_with_jitter(
    tunnel_server: TunnelServer, clients: List[TunnelClient],
) -> None:
    """A close frame from the server (an instance shutting down) ends the
    session at once; the client reopens it after at most
    min(restart_jitter, initial), never after a backoff step."""
    assert all(0 <= Backoff(initial=1.0).restart_delay() <= 0.5 for _ in range(200))
    assert all(0 <= Backoff(initial=0.1).restart_delay() <= 0.1 for _ in range(200))
    assert Backoff(restart_jitter=0.0).restart_delay() == 0.0
    sessions: List[Session] = []
    start_client(clients, tunnel_server.url, on_connect=sessions.append)
    wait_for(lambda: tunnel_server.server.has_session("foo") and len(sessions) == 1)
    for session in tunnel_server.server.sessions("foo"):
        session.close("going away")
    assert sessions[0].wait_closed(TIMEOUT)
    assert sessions[0].close_reason == "websocket closed by the server"  # not a read deadline
    wait_for(lambda: len(sessions) == 2)


# ------------------------------------------------------------------ Ctrl-C
# Ctrl-C's handler as a terminal gives it: a runner that starts the tests in
# the background (no job control) leaves SIGINT ignored in its children.
RUN_UNTIL_INTERRUPTED = """
import logging, signal, sys
from remotedialer.client import Backoff, TunnelClient
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
TunnelClient(sys.argv[1], {"X-Tunnel-ID": sys.argv[2]}, backoff=Backoff(initial=0.05, maximum=0.1)).run()
print("run returned", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize("state", ["connected", "retrying"])
def test_run_returns_cleanly_on_ctrl_c(tunnel_server: TunnelServer, state: str) -> None:
    """``TunnelClient.run()`` on a main thread: Ctrl-C closes the tunnel and
    returns, whether it is serving (blocked in websocket-client's read) or
    waiting to retry, with no traceback."""
    key = "ctrl-c" if state == "connected" else ""  # no key: the server refuses (401)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_UNTIL_INTERRUPTED, tunnel_server.url, key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if state == "connected":
            wait_for(lambda: tunnel_server.server.has_session("ctrl-c"))
        else:
            wait_for(lambda: len(tunnel_server.requests) >= 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "run returned\n"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted: closing the tunnel" in err
    if state == "connected":
        wait_for(lambda: not tunnel_server.server.has_session("ctrl-c"))


# ------------------------------------------------ usage errors and a loop that never dies
@pytest.mark.parametrize(
    "url, needle",
    [
        ("ws://127.0.0.1:99999/connect", "port '99999'"),
        ("ws://127.0.0.1:abc/connect", "port 'abc'"),
        ("ws://[::1/connect", "IPv6"),
        ("http://127.0.0.1:8123/connect", "want ws://"),
        ("ws:///connect", "no host"),
    ],
)
def test_unusable_urls_are_refused_at_construction(url: str, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(needle)) as raised:
        TunnelClient(url, {"X-Tunnel-ID": "x"})
    assert isinstance(raised.value, ValueError) and url in str(raised.value)


def test_unusable_proxies_are_refused_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="proxy: unsupported proxy scheme 'ftp'"):
        TunnelClient("ws://127.0.0.1:8123/connect", proxy="ftp://proxy.corp")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:99999")
    with pytest.raises(ConfigurationError, match="HTTPS_PROXY: invalid proxy URL"):
        TunnelClient("wss://tunnel.example:8443/connect")
    # the variable of the other scheme, and a loopback server, do not matter
    assert TunnelClient("ws://tunnel.example:8123/connect").proxy is None
    assert TunnelClient("wss://127.0.0.1:8443/connect").proxy is None


def test_an_unexpected_error_is_one_line_and_a_backoff(
    tunnel_server: TunnelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception nobody expected from an attempt (here websocket-client's
    TypeError for a malformed socket option) must not end the connect loop:
    one ERROR line per attempt, and the client keeps trying."""
    caplog.set_level(logging.WARNING, logger="remotedialer.client")
    client = TunnelClient(tunnel_server.url, {"X-Tunnel-ID": "odd"}, allow_all_dials,
                          backoff=Backoff(initial=0.02, maximum=0.05),
                          websocket_options={"sockopt": ((1, 2),)})
    thread = client.start()
    try:
        wait_for(lambda: len(caplog.records) >= 3)
        assert thread.is_alive()
    finally:
        client.stop(TIMEOUT)
    assert not thread.is_alive()
    assert isinstance(client.last_error, TypeError)
    for record in caplog.records[:3]:
        assert record.levelno == logging.ERROR and record.exc_info is None
        line = record.getMessage()
        assert line.startswith(f"failed to connect to {tunnel_server.url}: TypeError: ") and "\n" not in line


def test_a_wrong_path_gets_a_hint_naming_connect(caplog: pytest.LogCaptureFixture) -> None:
    """``remotedialer server``'s app (werkzeug, as the CLI runs it) answers a
    wrong ``--connect`` path with 404; the client's line points at /connect."""
    from werkzeug.serving import make_server

    from remotedialer.cli.server import make_app

    app = make_app(handle_sigterm=False, drain_seconds=0)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    caplog.set_level(logging.WARNING, logger="remotedialer.client")
    url = f"ws://127.0.0.1:{httpd.server_port}/tunnel"
    client = TunnelClient(url, {"X-Tunnel-ID": "lost"}, allow_all_dials,
                          backoff=Backoff(initial=0.02, maximum=0.05))

    def client_lines() -> List[str]:  # the app logs too (its open-server warning)
        return [record.getMessage() for record in caplog.records if record.name == "remotedialer.client"]

    client.start()
    try:
        wait_for(client_lines)
    finally:
        client.stop(TIMEOUT)
        httpd.shutdown()
        app.close()
        httpd.server_close()
    assert isinstance(client.last_error, HandshakeError) and client.last_error.status == 404
    line = client_lines()[0]
    assert line.startswith(f"failed to connect to {url}: handshake refused: HTTP 404")
    assert " at /connect " in line and "Flask" not in line


def allow_all_dials(proto: str, address: str) -> bool:
    return True


def test_an_interrupt_while_connecting_closes_the_websocket_on_purpose(
    make_tunnel_server: Callable[..., TunnelServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C after the server accepted the WebSocket but before the client
    holds its session (so ``stop()`` cannot close it): the WebSocket is
    closed on purpose, and a resuming server ends its session at once
    instead of keeping it suspended for the window."""
    limits = Limits(resume_window=30.0)
    server = make_tunnel_server(limits=limits)
    client = TunnelClient(server.url, {"X-Tunnel-ID": "foo"}, limits=limits)

    def interrupted(*args: object) -> None:
        wait_for(lambda: server.server.has_session("foo"))
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "_new_session", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.connect_once()
    wait_for(lambda: not server.server.has_session("foo"))
