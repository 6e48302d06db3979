"""A socket conformance suite, in the spirit of trio's ``check_streams``.

Every test here takes a ``pair`` fixture: a :class:`Pair` of connected stream
endpoints ``a`` (the object under test) and ``b`` (its far end, always a real
socket). ``tests/core/test_conformance.py`` runs the suite against a real
``socket.socketpair()``, a loopback TCP connection, and a
:class:`~remotedialer.connection.TunnelConnection` whose far end is a real
socket reached through a session and the client's :class:`LocalDialer`.

The tests are written once, for all of them. Where a tunnel legitimately
differs from a socket (the protocol has no half-close, options are not real,
``recv`` flags are not supported), the test says so and checks each kind's own
behaviour: nothing is skipped.
"""

from __future__ import annotations

import errno
import hashlib
import io
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import pytest
from urllib3.util.wait import wait_for_read

from testkit.support import TIMEOUT, recv_exactly, recv_until_eof


@dataclass
class Pair:
    """``a`` is under test, ``b`` is its far end (a real socket)."""

    kind: str  # "socketpair", "tcp", "tunnel" or "as_socket" (a socket bridged to a tunnel)
    a: Any
    b: socket.socket
    #: Set by the tunnel pair: called with a predicate that holds once the
    #: tunnel machinery settled (used only where the kinds differ).
    settle: Optional[Callable[[Callable[[], bool]], None]] = None
    #: Set by the tunnel pairs: end the link under ``a`` as abruptly as the
    #: kind allows (the session ends). Sockets: ``b`` resets (SO_LINGER 0).
    break_link: Optional[Callable[[], None]] = None

    @property
    def is_tunnel(self) -> bool:
        return self.kind == "tunnel"


def readable(sock: Any, timeout: float) -> bool:
    return wait_for_read(sock, timeout=timeout)  # poll: any descriptor number


def run_in_thread(target: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``target`` on a thread; return a function joining it (with a
    timeout) that returns its result or re-raises its exception."""
    result: List[Any] = []
    error: List[BaseException] = []

    def run() -> None:
        try:
            result.append(target())
        except BaseException as exc:  # re-raised in the test thread
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "helper thread still blocked"
        if error:
            raise error[0]
        return result[0]

    return join


def check_socket_error(error: BaseException, *errnos: Optional[int]) -> None:
    """An error shaped as the stdlib shapes socket errors: an ``OSError``
    whose ``errno`` is one of ``errnos`` and, when it has an errno,
    ``args == (errno, strerror)`` (paramiko formats ``args[1]``, others read
    ``errno``). The stdlib's timeouts are the one kind without an errno."""
    assert isinstance(error, OSError), repr(error)
    assert error.errno in errnos, f"{error!r}: errno {error.errno}, want one of {errnos}"
    if error.errno is not None:
        assert error.args == (error.errno, error.strerror), repr(error)
        assert isinstance(error.strerror, str) and error.strerror


def check_timeout(pair: Pair, error: BaseException) -> None:
    """The stdlib's timeout has no errno; a tunnel's says ETIMEDOUT. Both
    are ``socket.timeout``; a tunnel's is a ``TimeoutError`` too, also
    before Python 3.10, where ``socket.timeout`` is not one yet."""
    assert isinstance(error, socket.timeout)
    if pair.is_tunnel:
        assert isinstance(error, TimeoutError)
    check_socket_error(error, errno.ETIMEDOUT if pair.is_tunnel else None)


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


# ------------------------------------------------------------------ basics
def test_send_and_recv_both_ways(pair: Pair) -> None:
    assert pair.a.send(b"hello") == 5
    assert recv_exactly(pair.b, 5) == b"hello"
    pair.b.sendall(b"world")
    assert recv_exactly(pair.a, 5) == b"world"


def test_recv_returns_what_is_there_up_to_bufsize(pair: Pair) -> None:
    pair.b.sendall(b"abcdef")
    got = recv_exactly(pair.a, 2)
    assert got == b"ab"
    assert recv_exactly(pair.a, 4) == b"cdef"


def test_recv_zero_bytes(pair: Pair) -> None:
    assert pair.a.recv(0) == b""
    with pytest.raises(ValueError):
        pair.a.recv(-1)


def test_send_empty(pair: Pair) -> None:
    assert pair.a.send(b"") == 0
    pair.a.sendall(b"")
    pair.a.sendall(b"after")
    assert recv_exactly(pair.b, 5) == b"after"


def test_send_accepts_buffers(pair: Pair) -> None:
    pair.a.sendall(bytearray(b"ab"))
    pair.a.sendall(memoryview(b"xcdx")[1:3])
    pair.a.send(memoryview(b"ef"))
    assert recv_exactly(pair.b, 6) == b"abcdef"


def test_recv_into(pair: Pair) -> None:
    pair.b.sendall(b"0123456789")
    buf = bytearray(4)
    got = pair.a.recv_into(buf)
    assert 1 <= got <= 4 and buf[:got] == b"0123"[:got]
    rest = bytearray(b"0123"[:got])
    view = memoryview(bytearray(16))
    while len(rest) < 10:
        n = pair.a.recv_into(view[2:], 3)
        assert 1 <= n <= 3
        rest += view[2 : 2 + n]
    assert bytes(rest) == b"0123456789"


def test_recv_into_argument_checks(pair: Pair) -> None:
    with pytest.raises(ValueError):
        pair.a.recv_into(bytearray(2), 5)  # nbytes larger than the buffer
    with pytest.raises(ValueError):
        pair.a.recv_into(bytearray(2), -1)
    assert pair.a.recv_into(bytearray(0)) == 0


def test_large_transfers_both_ways_at_once(pair: Pair) -> None:
    size = 6 * 1024 * 1024
    to_b, to_a = payload(size, 1), payload(size, 2)
    send_a = run_in_thread(lambda: pair.a.sendall(to_b))
    send_b = run_in_thread(lambda: pair.b.sendall(to_a))
    recv_b = run_in_thread(lambda: recv_exactly(pair.b, size))
    got_a = recv_exactly(pair.a, size)
    send_a()
    send_b()
    assert hashlib.sha256(recv_b()).digest() == hashlib.sha256(to_b).digest()
    assert hashlib.sha256(got_a).digest() == hashlib.sha256(to_a).digest()


def test_many_small_messages_keep_order(pair: Pair) -> None:
    expected = b"".join(b"%06d," % i for i in range(3000))
    send = run_in_thread(lambda: [pair.a.sendall(b"%06d," % i) for i in range(3000)])
    assert recv_exactly(pair.b, len(expected)) == expected
    send()


# ------------------------------------------------------------------ timeouts
def test_timeouts(pair: Pair) -> None:
    a = pair.a
    a.settimeout(0.05)
    assert a.gettimeout() == 0.05
    assert a.getblocking()
    with pytest.raises(socket.timeout) as timed_out:
        a.recv(1)
    check_timeout(pair, timed_out.value)
    with pytest.raises(socket.timeout) as timed_out:
        a.recv_into(bytearray(1))
    check_timeout(pair, timed_out.value)
    pair.b.sendall(b"x")
    a.settimeout(TIMEOUT)
    assert a.recv(1) == b"x"  # usable after a timeout
    a.settimeout(None)
    assert a.gettimeout() is None
    with pytest.raises(ValueError):
        a.settimeout(-1)
    a.settimeout(3)
    assert a.gettimeout() == 3.0 and isinstance(a.gettimeout(), float)


def test_send_timeout_when_far_end_does_not_read(pair: Pair) -> None:
    pair.a.settimeout(0.2)
    chunk = b"f" * (256 * 1024)
    sent = 0
    with pytest.raises(socket.timeout) as timed_out:
        for _ in range(4096):  # 1 GiB: far beyond every buffer on the way
            pair.a.sendall(chunk)
            sent += len(chunk)
    check_timeout(pair, timed_out.value)
    assert sent < 512 * 1024 * 1024


def test_setblocking(pair: Pair) -> None:
    a = pair.a
    a.setblocking(False)
    assert a.gettimeout() == 0.0 and not a.getblocking()
    with pytest.raises(BlockingIOError) as would_block:
        a.recv(1)
    check_socket_error(would_block.value, errno.EAGAIN)
    a.settimeout(0)
    with pytest.raises(BlockingIOError) as would_block:
        a.recv_into(bytearray(1))
    check_socket_error(would_block.value, errno.EAGAIN)
    pair.b.sendall(b"nb")
    assert readable(a, TIMEOUT)
    assert recv_exactly(a, 2) == b"nb"
    a.setblocking(True)
    assert a.gettimeout() is None and a.getblocking()


# ---------------------------------------------------------------- selectable
def test_fileno_is_selectable(pair: Pair) -> None:
    a = pair.a
    assert isinstance(a.fileno(), int) and a.fileno() >= 0
    assert not readable(a, 0.05)  # nothing to read: select says so
    pair.b.sendall(b"ping")
    assert readable(a, TIMEOUT)
    a.setblocking(False)
    assert a.recv(2) == b"pi"  # readable means recv does not block
    assert readable(a, 0)  # still data left
    data = b""
    while len(data) < 2:
        assert readable(a, TIMEOUT)
        data += a.recv(10)
    assert data == b"ng"
    assert not readable(a, 0.05)  # drained: not readable again
    with pytest.raises(BlockingIOError):
        a.recv(1)
    pair.b.close()
    assert readable(a, TIMEOUT)  # EOF is readable too
    assert a.recv(1) == b""


def test_selectors_module(pair: Pair) -> None:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(pair.a, selectors.EVENT_READ)
        assert sel.select(0.05) == []
        pair.b.sendall(b"s")
        events = sel.select(TIMEOUT)
        assert [key.fileobj for key, _ in events] == [pair.a]
        assert pair.a.recv(1) == b"s"
        sel.unregister(pair.a)


# ------------------------------------------------------------------ makefile
def test_makefile_read_lines(pair: Pair) -> None:
    with pair.a.makefile("rb") as f:
        pair.b.sendall(b"first line\nsecond")
        assert f.readline() == b"first line\n"
        pair.b.sendall(b" line\nthird\n")
        assert f.readline() == b"second line\n"
        assert f.readline() == b"third\n"
        pair.b.sendall(b"tail")
        pair.b.close()
        assert f.read() == b"tail"
        assert f.readline() == b""


def test_makefile_text_mode(pair: Pair) -> None:
    reader = pair.a.makefile("r", encoding="utf-8", newline="")
    writer = pair.a.makefile("w", encoding="utf-8")
    pair.b.sendall("héllo\r\nwörld\n".encode())
    assert reader.readline() == "héllo\r\n"
    assert reader.readline() == "wörld\n"
    writer.write("ünïcode\n")
    writer.flush()
    assert recv_exactly(pair.b, len("ünïcode\n".encode())) == "ünïcode\n".encode()
    assert reader.mode == "r" and writer.mode == "w"
    reader.close()
    writer.close()


def test_makefile_write_and_flush(pair: Pair) -> None:
    with pair.a.makefile("wb") as f:
        f.write(b"buffered ")
        f.write(b"write")
        f.flush()
        assert recv_exactly(pair.b, 14) == b"buffered write"
        f.write(b"!")
    assert recv_exactly(pair.b, 1) == b"!"  # close flushes


def test_makefile_read_write(pair: Pair) -> None:
    f = pair.a.makefile("rwb")
    f.write(b"question\n")
    f.flush()
    assert recv_exactly(pair.b, 9) == b"question\n"
    pair.b.sendall(b"answer\n")
    assert f.readline() == b"answer\n"
    f.close()


def test_makefile_unbuffered(pair: Pair) -> None:
    raw = pair.a.makefile("rb", buffering=0)
    assert isinstance(raw, io.RawIOBase)
    pair.b.sendall(b"raw")
    data = b""
    while len(data) < 3:
        chunk = raw.read(3 - len(data))
        assert chunk
        data += chunk
    assert data == b"raw"
    raw.close()
    with pytest.raises(ValueError):
        pair.a.makefile("r", buffering=0)


def test_makefile_deferred_close(pair: Pair) -> None:
    """socket semantics: close() while a makefile object is open keeps the
    connection usable until that object is closed too."""
    f = pair.a.makefile("rwb")
    pair.a.close()
    pair.b.sendall(b"still open\n")
    assert f.readline() == b"still open\n"
    f.write(b"and writable\n")
    f.flush()
    assert recv_exactly(pair.b, 13) == b"and writable\n"
    f.close()  # the last reference: now the connection really closes
    pair.b.settimeout(TIMEOUT)
    assert recv_until_eof(pair.b) == b""
    with pytest.raises(OSError) as closed:
        pair.a.recv(1)
    check_socket_error(closed.value, errno.EBADF)


def test_makefile_after_close_is_an_error(pair: Pair) -> None:
    pair.a.close()
    with pytest.raises(OSError):
        pair.a.makefile("rb").read(1)


# ------------------------------------------------------------- close and EOF
def test_eof_after_far_end_closes(pair: Pair) -> None:
    pair.b.sendall(b"last")
    pair.b.close()
    assert recv_until_eof(pair.a) == b"last"
    assert pair.a.recv(10) == b""  # EOF stays EOF
    assert pair.a.recv_into(bytearray(4)) == 0


def test_send_after_far_end_closed_fails(pair: Pair) -> None:
    pair.b.close()
    assert recv_until_eof(pair.a) == b""
    with pytest.raises(OSError) as failed:
        # A TCP socket may accept a write or two before the reset comes back.
        for _ in range(1000):
            pair.a.sendall(b"x" * 1024)
            time.sleep(0.001)
    check_socket_error(failed.value, errno.EPIPE, errno.ECONNRESET)


def test_errors_when_the_link_is_lost(pair: Pair) -> None:
    """The far end resets (a tunnel: its session ends). Reads and writes then
    fail with ECONNRESET or EPIPE, shaped like the stdlib's errors (a socket
    pair may first read EOF: AF_UNIX has no reset)."""
    if pair.break_link is not None:
        pair.break_link()
    else:
        pair.b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.b.close()
    with pytest.raises(OSError) as failed:
        for _ in range(1000):
            if not pair.a.recv(1024):
                pair.a.sendall(b"x" * 1024)
                time.sleep(0.001)
    check_socket_error(failed.value, errno.EPIPE, errno.ECONNRESET)
    with pytest.raises(OSError) as again:
        pair.a.sendall(b"x")
    check_socket_error(again.value, errno.EPIPE, errno.ECONNRESET)


def test_close(pair: Pair) -> None:
    pair.a.sendall(b"bye")
    pair.a.close()
    assert pair.a.fileno() == -1
    assert recv_until_eof(pair.b) == b"bye"  # far end: data, then EOF
    with pytest.raises(OSError) as closed:
        pair.a.recv(1)
    check_socket_error(closed.value, errno.EBADF)
    with pytest.raises(OSError) as closed:
        pair.a.send(b"x")
    check_socket_error(closed.value, errno.EBADF)
    pair.a.close()  # idempotent


def test_context_manager(pair: Pair) -> None:
    with pair.a as entered:
        assert entered is pair.a
        entered.sendall(b"ctx")
    assert pair.a.fileno() == -1
    assert recv_until_eof(pair.b) == b"ctx"


def test_shutdown_rdwr(pair: Pair) -> None:
    pair.a.sendall(b"before")
    pair.a.shutdown(socket.SHUT_RDWR)
    assert recv_until_eof(pair.b) == b"before"
    assert pair.a.recv(1) == b""
    with pytest.raises(OSError) as shut:
        pair.a.send(b"x")
    check_socket_error(shut.value, errno.EPIPE)
    pair.a.close()


def test_shutdown_wr(pair: Pair) -> None:
    """After SHUT_WR this side can no longer send but can still receive.

    Sockets half-close: the far end reads EOF while it can still send. The
    remotedialer protocol has no half-close (ERROR ends both directions), so
    a tunnel tells the far end nothing until the connection is closed."""
    pair.a.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError) as broken:
        pair.a.send(b"x")
    check_socket_error(broken.value, errno.EPIPE)
    if pair.kind == "as_socket":
        # The bridged socket half-closes, but the tunnel behind it cannot:
        # the end of the socket's data ends the tunneled connection.
        assert recv_until_eof(pair.b) == b""
        assert recv_until_eof(pair.a) == b""
        return
    if pair.is_tunnel:
        assert not readable(pair.b, 0.1)  # no EOF: nothing went on the wire
    else:
        assert recv_until_eof(pair.b) == b""  # half-close: EOF at the far end
    pair.b.sendall(b"reply")
    assert recv_exactly(pair.a, 5) == b"reply"  # receiving still works
    pair.a.close()
    assert recv_until_eof(pair.b) == b""  # and close ends it for everyone


def test_shutdown_rd(pair: Pair) -> None:
    pair.a.shutdown(socket.SHUT_RD)
    assert pair.a.recv(1) == b""
    pair.a.sendall(b"send still works")
    assert recv_exactly(pair.b, 16) == b"send still works"


def test_shutdown_bad_argument(pair: Pair) -> None:
    with pytest.raises((ValueError, OSError)):
        pair.a.shutdown(17)


# ---------------------------------------------------------------- addresses
def test_getpeername_matches_far_end(pair: Pair) -> None:
    peer = pair.a.getpeername()
    # A bridged socket's peer is the unnamed end of its socketpair.
    assert peer == ("" if pair.kind == "as_socket" else pair.b.getsockname())
    own = pair.a.getsockname()
    assert type(own) is type(peer)
    if isinstance(peer, tuple):
        host, port = peer[:2]
        assert isinstance(host, str) and isinstance(port, int)
        assert len(own) == len(peer)


def test_family_and_type(pair: Pair) -> None:
    assert pair.a.type == socket.SOCK_STREAM
    if pair.kind in ("socketpair", "as_socket"):
        assert pair.a.family == socket.AF_UNIX
    else:
        assert pair.a.family == socket.AF_INET


# ----------------------------------------------------- documented differences
def test_socket_options(pair: Pair) -> None:
    """Options are accepted everywhere; on a tunnel they are remembered only
    (there is no socket on this side to apply them to)."""
    pair.a.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    assert pair.a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_recv_flags(pair: Pair) -> None:
    """Sockets support ``MSG_PEEK``; a tunnel refuses every flag with ValueError."""
    pair.b.sendall(b"peek")
    if pair.is_tunnel:
        with pytest.raises(ValueError):
            pair.a.recv(4, socket.MSG_PEEK)
    else:
        assert readable(pair.a, TIMEOUT)
        assert pair.a.recv(4, socket.MSG_PEEK) == b"peek"
    assert recv_exactly(pair.a, 4) == b"peek"

