"""as_socket(): a real OS socket bridged to a tunneled connection.

The generic socket behaviour of the bridged socket is covered by the socket
conformance suite (tests/core/test_conformance.py, pair kind "as_socket"); these
tests cover what the bridge is for (TLS, asyncio, subprocesses), how the
tunnel's end shows through it, and readiness for urllib3's liveness check.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator, List, Tuple

import pytest
import trustme
from urllib3.util.wait import wait_for_read

from remotedialer.bridge import BridgedSocket, as_socket
from remotedialer.config import Limits
from remotedialer.errors import RemoteError, TunnelClosedError
from remotedialer.piping import Piper

from testkit.support import TIMEOUT, EchoServer, LocalDialTunnel, LoopbackListener, dial_and_accept, wait_for

KiB = 1024
SMALL_LIMITS = Limits(pause_threshold=256 * KiB, resume_threshold=32 * KiB, hard_buffer_limit=8192 * KiB)


class Bridge(LocalDialTunnel):
    """A session pair whose client dials locally, with its own piper, and
    sockets bridged to the connections it dials."""

    def bridged(self, address: str) -> BridgedSocket:
        return as_socket(self.dial(address), self.piper)


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    b = Bridge(limits=SMALL_LIMITS, name="test-bridge-piper")
    yield b
    b.close()


def test_as_socket_is_a_real_connected_socket(bridge: Bridge, echo_server: EchoServer) -> None:
    conn = bridge.dial(echo_server.address)
    conn.settimeout(3.5)
    sock = as_socket(conn, bridge.piper)
    with sock:
        assert isinstance(sock, socket.socket) and isinstance(sock, BridgedSocket)
        assert sock.tunnel is conn
        assert sock.gettimeout() == 3.5
        assert sock.fileno() >= 0 and sock.fileno() != conn.fileno()
        sock.settimeout(TIMEOUT)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        assert sock.tunnel_error is None


def test_method_on_the_connection_delegates(bridge: Bridge, echo_server: EchoServer) -> None:
    with bridge.dial(echo_server.address).as_socket() as sock:
        assert isinstance(sock, BridgedSocket)
        sock.settimeout(TIMEOUT)
        sock.sendall(b"via method")
        assert sock.recv(64) == b"via method"


def test_closing_the_socket_ends_the_tunneled_connection(bridge: Bridge, echo_server: EchoServer) -> None:
    sock = bridge.bridged(echo_server.address)
    sock.settimeout(TIMEOUT)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    conn = sock.tunnel
    assert conn is not None
    sock.close()
    wait_for(bridge.idle)
    assert conn.closed
    wait_for(lambda: bridge.piper.active_pipes == 0)


def test_data_written_before_close_is_delivered(bridge: Bridge) -> None:
    sock, far = dial_and_accept(bridge.bridged)
    with far:
        far.settimeout(TIMEOUT)
        data = bytes(range(256)) * 4096
        sock.sendall(data)
        sock.close()
        got = bytearray()
        while True:
            chunk = far.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        assert bytes(got) == data


def test_far_side_dial_failure_shows_as_eof_and_tunnel_error(bridge: Bridge) -> None:
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, not listening: refuses
    try:
        with bridge.bridged(f"127.0.0.1:{refusing.getsockname()[1]}") as sock:
            sock.settimeout(TIMEOUT)
            assert sock.recv(10) == b""
            error = sock.tunnel_error
            assert isinstance(error, RemoteError)
            assert "refused" in str(error).lower()
    finally:
        refusing.close()


def test_clean_far_close_is_eof_without_error(bridge: Bridge) -> None:
    sock, far = dial_and_accept(bridge.bridged)
    with sock:
        sock.settimeout(TIMEOUT)
        far.sendall(b"bye")
        far.close()
        assert sock.recv(10) == b"bye"
        assert sock.recv(10) == b""
        assert sock.tunnel_error is None


def test_session_end_shows_as_eof_and_tunnel_disconnect(bridge: Bridge, echo_server: EchoServer) -> None:
    with bridge.bridged(echo_server.address) as sock:
        sock.settimeout(TIMEOUT)
        bridge.pair.server.close("going away")
        assert sock.recv(10) == b""
        assert isinstance(sock.tunnel_error, TunnelClosedError)


def test_backpressure_pauses_the_far_side_while_the_socket_is_not_read(bridge: Bridge) -> None:
    sock, far = dial_and_accept(bridge.bridged)
    data = hashlib.sha256(b"seed").digest() * (6 * 1024 * 1024 // 32)  # 6 MiB
    conn = sock.tunnel
    assert conn is not None
    with sock, far:
        far.settimeout(TIMEOUT)
        writer = threading.Thread(target=far.sendall, args=(data,), daemon=True)
        writer.start()
        # Nobody reads the bridged socket: its kernel buffer fills, the piper
        # stops draining the tunnel, and the tunnel asks the far side to pause.
        wait_for(lambda: conn.we_paused_peer)
        assert conn.buffered <= SMALL_LIMITS.hard_buffer_limit
        sock.settimeout(TIMEOUT)
        got = bytearray()
        while len(got) < len(data):
            chunk = sock.recv(1 << 20)
            assert chunk
            got += chunk
        writer.join(TIMEOUT)
        assert not writer.is_alive()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_stopped_piper_refuses_and_closes_the_connection(bridge: Bridge, echo_server: EchoServer) -> None:
    piper = Piper("stopped")
    piper.stop()
    conn = bridge.dial(echo_server.address)
    with pytest.raises(RuntimeError):
        as_socket(conn, piper)
    assert conn.closed
    wait_for(bridge.idle)


# --------------------------------------------------------- what it is for
class TLSEchoServer(LoopbackListener):
    """A loopback TLS echo server whose certificate for "localhost" comes
    from a CA of its own (``ca``)."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("localhost").configure_cert(self.context)
        super().__init__(name="test-tls-echo")

    def handle(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        self.serve_on_thread(self._echo, sock)

    def _echo(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(TIMEOUT)
                while True:
                    data = tls.recv(65536)
                    if not data:
                        return
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            return


@pytest.fixture(scope="module")
def tls_echo() -> Iterator[Tuple[str, str]]:
    """A loopback TLS echo server for "localhost": yields (address, CA PEM)."""
    server = TLSEchoServer()
    yield f"localhost:{server.port}", server.ca.cert_pem.bytes().decode()
    server.close()


def test_ssl_wrap_socket_with_verification(bridge: Bridge, tls_echo: Tuple[str, str]) -> None:
    address, ca_pem = tls_echo
    context = ssl.create_default_context(cadata=ca_pem)
    sock = bridge.bridged(address)
    sock.settimeout(TIMEOUT)
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        assert tls.version() is not None
        payload = b"secret" * 50000
        tls.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            got += tls.recv(65536)
        assert bytes(got) == payload


def test_ssl_wrong_hostname_fails_and_frees_the_tunnel(bridge: Bridge, tls_echo: Tuple[str, str]) -> None:
    address, ca_pem = tls_echo
    context = ssl.create_default_context(cadata=ca_pem)
    sock = bridge.bridged(address)
    sock.settimeout(TIMEOUT)
    with pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(sock, server_hostname="not-localhost")
    sock.close()
    wait_for(bridge.idle)


def test_asyncio_streams(bridge: Bridge, echo_server: EchoServer) -> None:
    sock = bridge.bridged(echo_server.address)
    sock.setblocking(False)

    async def talk() -> bytes:
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"from asyncio\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        await writer.wait_closed()
        return line

    assert asyncio.run(talk()) == b"from asyncio\n"
    wait_for(bridge.idle)


def test_descriptor_handed_to_a_subprocess(bridge: Bridge, echo_server: EchoServer) -> None:
    sock = bridge.bridged(echo_server.address)
    child = (
        "import socket, sys\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "s.settimeout(10)\n"
        "s.sendall(b'from child')\n"
        "got = b''\n"
        "while len(got) < 10:\n"
        "    got += s.recv(64)\n"
        "sys.stdout.write(got.decode())\n"
    )
    fd = sock.fileno()
    result = subprocess.run([sys.executable, "-c", child, str(fd)], pass_fds=[fd],
                            capture_output=True, timeout=TIMEOUT, check=True)
    assert result.stdout == b"from child"
    sock.close()
    wait_for(bridge.idle)


# -------------------------------------------------- readiness and liveness
def tunneled(bridge: Bridge, address: str) -> Any:
    return bridge.dial(address)


def bridged(bridge: Bridge, address: str) -> Any:
    return bridge.bridged(address)


@pytest.mark.parametrize("make", [tunneled, bridged], ids=["TunnelConnection", "as_socket"])
def test_urllib3_liveness_check(bridge: Bridge, make: Callable[[Bridge, str], Any]) -> None:
    """urllib3 treats a pooled connection as dropped when it polls readable:
    neither kind may poll readable while idle, both must once the far side
    closed."""
    sock, far = dial_and_accept(lambda address: make(bridge, address))
    with sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(b"request")
        far.settimeout(TIMEOUT)
        assert far.recv(7) == b"request"
        assert not wait_for_read(sock, timeout=0.0)  # idle: alive
        far.sendall(b"response")
        assert wait_for_read(sock, timeout=TIMEOUT)
        got = b""
        while len(got) < 8:
            got += sock.recv(8)
        assert not wait_for_read(sock, timeout=0.0)  # drained: alive again
        far.close()
        assert wait_for_read(sock, timeout=TIMEOUT)  # far side gone: dropped
        assert sock.recv(1) == b""


def test_tunnel_connection_readiness_follows_the_buffer(bridge: Bridge, echo_server: EchoServer) -> None:
    import selectors

    conn = bridge.dial(echo_server.address)
    conn.settimeout(TIMEOUT)
    events: List[int] = []
    with selectors.DefaultSelector() as selector, conn:
        selector.register(conn, selectors.EVENT_READ)
        assert selector.select(0) == []
        conn.sendall(b"abc")
        events = [mask for _, mask in selector.select(TIMEOUT)]
        assert events == [selectors.EVENT_READ]
        assert conn.recv(1) == b"a"
        assert selector.select(0)  # two bytes still buffered
        got = b""
        while len(got) < 2:
            got += conn.recv(2)
        assert selector.select(0) == []
