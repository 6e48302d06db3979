"""Shared fixtures: in-memory session pairs, sessions driven by hand, loopback
servers, the real WSGI server. The classes and helpers behind them live in
``testkit/support.py``."""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Tuple

import pytest

from testkit.support import (
    AcceptingHandler,
    EchoServer,
    Raw,
    SelectorEchoServer,
    SessionPair,
    TunnelServer,
    closing_all,
)


@pytest.fixture
def session_pair_factory() -> Iterator[Callable[..., SessionPair]]:
    """Build :class:`SessionPair` objects; all are closed at teardown."""
    with closing_all(SessionPair) as make:
        yield make


@pytest.fixture
def tunnel(session_pair_factory: Callable[..., SessionPair]) -> Tuple[SessionPair, AcceptingHandler]:
    """A session pair whose client side accepts every dial into a queue."""
    handler = AcceptingHandler()
    pair = session_pair_factory(connect_handler=handler)
    return pair, handler


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    """A thread-per-connection echo server on a free loopback port."""
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def echo() -> Iterator[SelectorEchoServer]:
    """A one-thread (selector) echo server on a free loopback port."""
    server = SelectorEchoServer()
    yield server
    server.close()


@pytest.fixture
def make_tunnel_server() -> Iterator[Callable[..., TunnelServer]]:
    """Build :class:`TunnelServer` objects (arguments as its constructor);
    all are closed at teardown."""
    with closing_all(TunnelServer) as make:
        yield make


@pytest.fixture
def tunnel_server(make_tunnel_server: Callable[..., TunnelServer]) -> TunnelServer:
    """The real WSGI server on werkzeug with default options."""
    return make_tunnel_server()


@pytest.fixture
def raw_factory() -> Iterator[Callable[..., Raw]]:
    """Build :class:`Raw` sessions; all are closed at teardown."""
    made: List[Raw] = []

    def make(**kwargs: Any) -> Raw:
        raw = Raw(**kwargs)
        made.append(raw)
        return raw

    yield make
    for raw in made:
        raw.close()


@pytest.fixture
def raw(raw_factory: Callable[..., Raw]) -> Raw:
    """A server-side session whose far end the test drives message by message."""
    return raw_factory()
