"""remotedialer.errors: socket-shaped errors (errno, ``args == (errno,
strerror)``), and how a far side's ERROR text becomes a type, for this
library's client and Go's."""

from __future__ import annotations

import errno
import pickle
import socket
import subprocess
from typing import Iterator

import pytest

from remotedialer import errors
from remotedialer.errors import (
    ConnectNotAllowedError,
    DialError,
    HandshakeError,
    LimitExceededError,
    NoSessionError,
    RemotedialerError,
    RemoteError,
    RemoteRefusedError,
    RemoteTimeoutError,
    TunnelClosedError,
    TunnelTimeoutError,
    error_text,
    remote_error,
    socket_error,
)

from testkit.support import TIMEOUT, AcceptingHandler, SessionPair, TunnelServer, go_reference, wait_for

SOCKET_ERRORS = [
    (TunnelClosedError("tunnel disconnect"), errno.ECONNRESET, ConnectionResetError),
    (RemoteError("boom"), errno.ECONNRESET, ConnectionResetError),
    (RemoteRefusedError("dial tcp 127.0.0.1:1: connect: connection refused"),
     errno.ECONNREFUSED, ConnectionRefusedError),
    (RemoteTimeoutError("dial tcp 10.0.0.1:80: i/o timeout"), errno.ETIMEDOUT, TimeoutError),
    (DialError("dial tcp x: unknown network"), errno.ECONNREFUSED, ConnectionRefusedError),
    (NoSessionError("failed to find Session for client foo"), errno.ECONNREFUSED, ConnectionRefusedError),
    (ConnectNotAllowedError("connect not allowed"), errno.ECONNREFUSED, ConnectionRefusedError),
    (HandshakeError(401, "failed authentication"), errno.ECONNREFUSED, ConnectionRefusedError),
    (LimitExceededError("too many connections"), errno.ECONNRESET, ConnectionResetError),
    (TunnelTimeoutError("timed out"), errno.ETIMEDOUT, TimeoutError),
]


def assert_socket_shaped(error: OSError, expected_errno: int) -> None:
    """Shaped like the stdlib's: a real errno, ``args == (errno, strerror)``."""
    assert error.errno == expected_errno
    assert error.args == (expected_errno, error.strerror)
    assert isinstance(error.strerror, str) and error.strerror
    assert str(error) == f"[Errno {expected_errno}] {error.strerror}"


@pytest.mark.parametrize("error, expected_errno, builtin", SOCKET_ERRORS, ids=lambda v: type(v).__name__)
def test_socket_shape(error: OSError, expected_errno: int, builtin: type) -> None:
    assert_socket_shaped(error, expected_errno)
    assert isinstance(error, builtin)
    assert isinstance(error, RemotedialerError)
    # paramiko's transport thread formats socket errors from args[0] and args[1]
    assert "{} ({:d})".format(error.args[1], error.args[0])
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.args == error.args
    assert copy.__dict__ == error.__dict__


def test_messages_and_attributes_are_kept() -> None:
    assert TunnelClosedError("tunnel disconnect").strerror == "tunnel disconnect"
    assert RemoteError("boom").remote_message == "boom"
    handshake = HandshakeError(404, "not found")
    assert (handshake.status, handshake.body) == (404, "not found")
    assert handshake.strerror.startswith("handshake refused: HTTP 404: not found - hint: ")
    folded = HandshakeError(401, "line one\n  line two\n" + "x" * 300, reason="Unauthorized")
    assert folded.reason == "Unauthorized" and folded.body.startswith("line one\n")
    head = "handshake refused: HTTP 401 Unauthorized: "
    assert folded.strerror == head + "line one line two " + "x" * 182 + "..."
    cause = OSError(errno.ECONNREFUSED, "Connection refused")
    assert DialError("dial tcp x", cause).__cause__ is cause
    # a lost tunnel is still the ConnectionAbortedError it always was
    assert isinstance(TunnelClosedError("x"), ConnectionAbortedError)


@pytest.mark.parametrize(
    "text, kind",
    [
        # Go's net package (the Go client passes err.Error() on)
        ("dial tcp 127.0.0.1:1: connect: connection refused", RemoteRefusedError),
        ("dial tcp 10.0.0.1:80: i/o timeout", RemoteTimeoutError),
        # this library's client (the OS text)
        ("dial tcp 127.0.0.1:1: Connection refused", RemoteRefusedError),
        ("dial tcp 10.0.0.1:80: timed out", RemoteTimeoutError),
        ("DIAL TCP 10.0.0.1:80: I/O TIMEOUT", RemoteTimeoutError),  # in any case
        ("dial tcp 127.0.0.1:1: No connection could be made because the target machine "
         "actively refused it", RemoteRefusedError),
        # anything else: the far side reset the connection with a reason
        ("connect not allowed", RemoteError),
        ("tunnel disconnect", RemoteError),
        ("read tcp 127.0.0.1:5->127.0.0.1:6: read: connection reset by peer", RemoteError),
    ],
)
def test_remote_error_types(text: str, kind: type) -> None:
    error = remote_error(text)
    assert type(error) is kind
    assert error.remote_message == text and error.strerror == text


def test_error_text_drops_the_errno_prefix() -> None:
    text = "dial tcp x: connection refused"
    assert error_text(RemoteRefusedError(text)) == text
    assert error_text(ValueError("plain")) == "plain"
    assert error_text(OSError("no errno")) == "no errno"


def test_socket_error_is_what_a_plain_socket_raises() -> None:
    with socket.socket() as sock:
        sock.close()
        with pytest.raises(OSError) as real:
            sock.send(b"x")
    made = socket_error(errno.EBADF)
    assert (type(made), made.args) == (type(real.value), real.value.args)
    pipe = socket_error(errno.EPIPE)
    assert isinstance(pipe, BrokenPipeError) and pipe.errno == errno.EPIPE
    assert isinstance(socket_error(errno.EAGAIN), BlockingIOError)


def test_everything_exported_is_in_the_tree() -> None:
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type):
            assert issubclass(value, RemotedialerError), name


# ------------------------------------------------------ through real tunnels
@pytest.fixture
def refused_address() -> Iterator[str]:
    """A loopback address that refuses connections: bound, never listening,
    and held for the test so no one else takes the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def check_refused(conn: socket.socket) -> None:
    """The first read of a dial the target refused: a ConnectionRefusedError
    shaped like the stdlib's, with the far side's text; writes fail alike."""
    with pytest.raises(ConnectionRefusedError) as info:
        conn.recv(1)
    error = info.value
    assert isinstance(error, RemoteRefusedError)
    assert_socket_shaped(error, errno.ECONNREFUSED)
    assert "refused" in error.strerror.lower() and "dial tcp 127.0.0.1:" in error.strerror
    assert "[Errno" not in error.remote_message  # the wire carries the text alone
    with pytest.raises(ConnectionRefusedError):
        conn.sendall(b"x")


def test_refused_target_through_our_client(tunnel_server: TunnelServer, refused_address: str) -> None:
    tunnel_server.client("foo")
    with tunnel_server.server.dial("foo", "tcp", refused_address, timeout=TIMEOUT) as conn:
        check_refused(conn)


def test_refused_target_through_the_go_client(make_tunnel_server: object, refused_address: str) -> None:
    program = go_reference("client")
    if program is None:
        pytest.skip("Go reference client not built (see shared/goref/build.sh; REMOTEDIALER_GOREF)")
    server = make_tunnel_server()  # type: ignore[operator]
    proc = subprocess.Popen(
        [str(program), "-connect", server.url, "-id", "gofoo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: server.server.sessions("gofoo"))
        with server.server.dial("gofoo", "tcp", refused_address, timeout=TIMEOUT) as conn:
            check_refused(conn)
            assert "connect: connection refused" in conn_error_text(conn)
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def conn_error_text(conn: socket.socket) -> str:
    try:
        conn.recv(1)
    except OSError as exc:
        return error_text(exc)
    raise AssertionError("the connection did not fail")


def test_lost_tunnel_and_timeouts(session_pair_factory: object) -> None:
    handler = AcceptingHandler()
    pair = session_pair_factory(connect_handler=handler)  # type: ignore[operator]
    conn = pair.server.dial("tcp", "127.0.0.1:1", timeout=0.05)
    handler.next()
    with pytest.raises(TimeoutError) as timed_out:
        conn.recv(1)
    assert_socket_shaped(timed_out.value, errno.ETIMEDOUT)
    conn.settimeout(TIMEOUT)
    pair.client.close("agent gone")
    for operation in (lambda: conn.recv(1), lambda: conn.sendall(b"x")):
        with pytest.raises(ConnectionResetError) as lost:
            operation()
        assert isinstance(lost.value, TunnelClosedError)
        assert_socket_shaped(lost.value, errno.ECONNRESET)
    with pytest.raises(TunnelClosedError) as dial_after:
        pair.server.dial("tcp", "127.0.0.1:1")
    assert_socket_shaped(dial_after.value, errno.ECONNRESET)
    assert isinstance(pair, SessionPair)
