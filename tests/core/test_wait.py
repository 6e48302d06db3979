"""remotedialer.wait: one wait for a writable socket, tested on both of its
paths: ``poll`` and the ``select`` fallback (forced by hiding ``select.poll``,
as on Windows)."""

from __future__ import annotations

import select
import socket
from typing import Any, Iterator, List, Tuple

import pytest

from remotedialer import piping
from remotedialer.wait import wait_for_write
from testkit.support import TIMEOUT


@pytest.fixture(params=["poll", "select"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test once with ``poll`` and once with the ``select`` fallback."""
    if request.param == "select":
        monkeypatch.delattr(select, "poll", raising=False)
        calls: List[Any] = []
        real_select = select.select

        def counted(*args: Any) -> Any:
            calls.append(args)
            return real_select(*args)

        monkeypatch.setattr(select, "select", counted)
        yield "select"
        assert calls, "the select fallback was not taken"
    else:
        assert hasattr(select, "poll")  # the platforms the suite runs on have it
        yield "poll"


def _filled_pair() -> Tuple[socket.socket, socket.socket]:
    """A socket pair whose first end's send buffer is full."""
    left, right = socket.socketpair()
    left.setblocking(False)
    try:
        while True:
            left.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return left, right


def test_a_socket_with_room_is_writable(path: str) -> None:
    left, right = socket.socketpair()
    with left, right:
        assert wait_for_write(left, 0) is True
        assert wait_for_write(left, None) is True


def test_a_full_send_buffer_is_not_writable_until_read(path: str) -> None:
    left, right = _filled_pair()
    with left, right:
        assert wait_for_write(left, 0) is False
        assert wait_for_write(left, 0.05) is False
        assert wait_for_write(left, -1) is False  # a deadline already past: look only
        right.setblocking(False)
        try:
            while True:
                right.recv(1 << 20)
        except BlockingIOError:
            pass
        assert wait_for_write(left, TIMEOUT) is True


def test_a_closed_socket_raises(path: str) -> None:
    sock = socket.socket()
    sock.close()
    with pytest.raises((OSError, ValueError)):
        wait_for_write(sock, 0)


def test_finish_connect_reports_a_refused_connect(path: str) -> None:
    """A non-blocking connect to a port nobody listens on: the wait
    returns (failed counts as ready) and the connect's error is raised."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = socket.socket()
    with sock:
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        with pytest.raises(ConnectionRefusedError):
            piping.finish_connect(sock, TIMEOUT)


def test_finish_connect_completes_a_connect(path: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = socket.socket()
        with sock:
            sock.setblocking(False)
            sock.connect_ex(server.getsockname())
            piping.finish_connect(sock, TIMEOUT)
            assert sock.getpeername() == server.getsockname()
