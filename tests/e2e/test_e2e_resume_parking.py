"""Resumption with idle tunnels parked on the poller (``--park-idle``,
issue 24): a real werkzeug server and client with a cut proxy
(testkit.cut_proxy) between them. A parked session whose WebSocket drops
(a reset, or a silent drop noticed by the client's missed pongs) suspends
and resumes as the same session, parks again over its new WebSocket, and
serves dials."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from remotedialer import poller
from remotedialer.client import Backoff, TunnelClient
from remotedialer.config import Limits
from remotedialer.resumable import ATTACHED, ResumableSession
from testkit.cut_proxy import CutProxy
from testkit.support import TIMEOUT, EchoServer, ResumeEvents, TunnelServer, allow_all, recv_exactly, wait_for

LIMITS = Limits(resume_window=30.0, park_idle=True, ping_interval=0.2)


class ParkedSetup:
    """A parking, resuming server; a client reaching it through a cut proxy."""

    def __init__(self) -> None:
        self.server_events = ResumeEvents()
        self.client_events = ResumeEvents()
        self.tunnel = TunnelServer(limits=LIMITS, observer=self.server_events)
        self.proxy = CutProxy(("127.0.0.1", self.tunnel.port))
        self.client = TunnelClient(
            f"ws://127.0.0.1:{self.proxy.port}/connect", {"X-Tunnel-ID": "foo"}, allow_all,
            limits=LIMITS.replace(park_idle=False), backoff=Backoff(initial=0.05, maximum=0.2),
            observer=self.client_events,
        )
        self.client.start()
        self.client.wait_connected(TIMEOUT)
        wait_for(lambda: self.tunnel.server.has_session("foo"), TIMEOUT)

    def session(self) -> ResumableSession:
        (session,) = self.tunnel.server.sessions("foo")
        assert isinstance(session, ResumableSession)
        return session

    def echo(self, echo: EchoServer, body: bytes) -> bytes:
        with self.tunnel.server.dial("foo", "tcp", echo.address, timeout=TIMEOUT) as conn:
            conn.sendall(body)
            return recv_exactly(conn, len(body))

    def close(self) -> None:
        self.client.stop(TIMEOUT)
        self.proxy.close()
        self.tunnel.close()


@pytest.fixture
def parked_setup() -> Iterator[ParkedSetup]:
    made = ParkedSetup()
    yield made
    made.close()


def _reset(setup: ParkedSetup) -> None:
    setup.proxy.reset()


def _silent_drop(setup: ParkedSetup) -> None:
    setup.proxy.blackhole()
    wait_for(lambda: setup.client_events.suspended, TIMEOUT)  # two missed pongs
    setup.proxy.restore()


@pytest.mark.parametrize("cut", [_reset, _silent_drop], ids=["reset", "silent-drop"])
def test_a_parked_session_suspends_resumes_and_parks_again(
    parked_setup: ParkedSetup, echo_server: EchoServer, cut: Callable[[ParkedSetup], None]
) -> None:
    setup = parked_setup
    wait_for(lambda: len(poller.default()) == 1, TIMEOUT)  # idle: parked
    session = setup.session()
    cut(setup)
    wait_for(lambda: setup.server_events.resumed, TIMEOUT)
    assert setup.client_events.suspended
    assert setup.client_events.refused == setup.server_events.refused == []
    assert setup.session() is session and session.resume_state == ATTACHED
    # idle again over the new WebSocket: parked again, and dials are served
    wait_for(lambda: len(poller.default()) == 1, TIMEOUT)
    assert setup.echo(echo_server, b"after the cut") == b"after the cut"
    wait_for(lambda: len(poller.default()) == 1, TIMEOUT)
