"""Fixtures of the gateway's tests (the helpers behind them: testkit.gateway)."""

from __future__ import annotations

from typing import Iterator

import pytest

from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from testkit.gateway import RawTarget, serve_keepalive


@pytest.fixture()
def raw() -> Iterator[RawTarget]:
    """An upstream connection over a socket pair; the test plays the target."""
    target = RawTarget()
    yield target
    target.close()


@pytest.fixture()
def keepalive_server() -> Iterator[BoundedThreadedWSGIServer]:
    """:func:`testkit.gateway.keepalive_app` on a keep-alive front end."""
    with serve_keepalive() as server:
        yield server
