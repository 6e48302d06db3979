"""The proxy front end over real sockets: a real Server under werkzeug, a real
agent over a loopback WebSocket, and raw clients speaking CONNECT, absolute
form and SOCKS5 (allowed and refused), plus slow and hostile clients."""

from __future__ import annotations

import base64
import socket
import struct
import threading
from typing import Dict, Iterator, List, Tuple

import pytest

from remotedialer.gateway.proxy import ProxyFrontEnd, ProxyLimits
from remotedialer.observer import Observer
from remotedialer.piping import Piper
from remotedialer.server.credentials import Credentials, CredentialStore, hash_secret, new_secret
from testkit.support import TIMEOUT, EchoServer, TunnelServer, recv_exactly, wait_for

PASSWORD = new_secret()
#: alice may reach ``foo`` and ``missing`` (no agent has that key); ``foo``
#: may dial loopback's unprivileged ports and ``localhost``, nothing else.
CREDENTIALS = f"""
user alice {hash_secret(PASSWORD)} foo,missing
policy foo allow=127.0.0.1:1024-65535,[::1]:1024-65535,localhost:*
policy * allow=*
"""
#: A target the policy refuses (never dialed).
DENIED = "127.0.0.1:1"


class Env:
    """A real server with a real credential store and dial policy, an agent
    ``foo``, an echo server and the proxy front end."""

    def __init__(
        self, limits: ProxyLimits = ProxyLimits(dial_confirm_wait=0.5), credentials: str = CREDENTIALS
    ) -> None:
        self.piper = Piper("test-proxy-piper")
        self.store = CredentialStore(Credentials.parse(credentials))
        self.tunnel = TunnelServer(piper=self.piper, dial_policy=self.store.dial_policy)
        self.tunnel.client("foo")
        self.echo = EchoServer()
        self.proxy = ProxyFrontEnd(self.tunnel.server.dial, authorize=self.store.authorize_user,
                                   limits=limits, piper=self.piper)

    @property
    def echo_address(self) -> str:
        return f"127.0.0.1:{self.echo.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(self.proxy.address, timeout=TIMEOUT)

    def close(self) -> None:
        self.proxy.stop()
        self.echo.close()
        self.tunnel.close()
        self.piper.stop()


@pytest.fixture
def env() -> Iterator[Env]:
    environment = Env()
    yield environment
    environment.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def http_connect(
    env: Env, target: str, key: str = "foo", password: str = PASSWORD
) -> Tuple[socket.socket, bytes]:
    sock = env.connect()
    token = base64.b64encode(f"{key}:{password}".encode()).decode()
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                 f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
    return sock, read_head(sock)


def socks5(env: Env, host: str, port: int, key: str = "foo", password: str = PASSWORD,
           atyp: int = 3) -> Tuple[socket.socket, bytes]:
    """SOCKS5 handshake by hand; returns the socket and the reply (or auth failure)."""
    sock = env.connect()
    sock.sendall(b"\x05\x02\x00\x02")
    assert recv_exactly(sock, 2) == b"\x05\x02"
    sock.sendall(bytes((1, len(key))) + key.encode() + bytes((len(password),)) + password.encode())
    status = recv_exactly(sock, 2)
    if status != b"\x01\x00":
        return sock, status
    if atyp == 3:
        address = bytes((len(host),)) + host.encode()
    else:
        address = socket.inet_pton(socket.AF_INET if atyp == 1 else socket.AF_INET6, host)
    sock.sendall(bytes((5, 1, 0, atyp)) + address + struct.pack(">H", port))
    return sock, recv_exactly(sock, 10)


def assert_echoes(sock: socket.socket) -> None:
    sock.sendall(b"hello through the proxy")
    assert recv_exactly(sock, 23) == b"hello through the proxy"


# ------------------------------------------------------------------ CONNECT
def test_connect_pipes_both_ways(env: Env) -> None:
    sock, head = http_connect(env, env.echo_address)
    with sock:
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert_echoes(sock)
        big = bytes(range(256)) * 8192  # 2 MiB: flow control on the way
        got = bytearray()

        def reader() -> None:
            while len(got) < len(big):
                got.extend(sock.recv(65536))

        thread = threading.Thread(target=reader)
        thread.start()
        sock.sendall(big)
        thread.join(TIMEOUT)
        assert bytes(got) == big
    wait_for(lambda: env.proxy.active == 0)


@pytest.mark.parametrize("key,password,status", [
    ("foo", "wrong", b"407"),
    ("foo", "", b"407"),
    ("bar", PASSWORD, b"403"),  # a valid secret, but not for this agent
    ("missing", PASSWORD, b"502"),  # no agent with that key
])
def test_connect_refusals(env: Env, key: str, password: str, status: bytes) -> None:
    sock, head = http_connect(env, env.echo_address, key, password)
    with sock:
        assert head.startswith(b"HTTP/1.1 " + status + b" "), head
        assert (b"Proxy-Authenticate: Basic" in head) == (status == b"407")
        assert sock.recv(1024) == b"" or True


def test_connect_without_credentials_is_407(env: Env) -> None:
    with env.connect() as sock:
        sock.sendall(f"CONNECT {env.echo_address} HTTP/1.1\r\n\r\n".encode())
        assert read_head(sock).startswith(b"HTTP/1.1 407 ")


def test_connect_policy_refusal_is_403(env: Env) -> None:
    sock, head = http_connect(env, DENIED)
    sock.close()
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")


def test_the_agents_connection_cap_is_503_and_socks_0x02() -> None:
    env = Env(credentials=f"user alice {hash_secret(PASSWORD)} foo\npolicy foo allow=* max-connections=1\n")
    try:
        first, head = http_connect(env, env.echo_address)
        with first:
            assert head.startswith(b"HTTP/1.1 200 ")
            assert_echoes(first)
            second, head = http_connect(env, env.echo_address)
            second.close()
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), head
            sock, reply = socks5(env, "127.0.0.1", env.echo.port, atyp=1)
            sock.close()
            assert reply[:2] == b"\x05\x02"
        wait_for(lambda: env.proxy.active == 0)
        again, head = http_connect(env, env.echo_address)  # the cap freed
        again.close()
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        env.close()


def test_connect_to_refused_target_is_502(env: Env) -> None:
    sock, head = http_connect(env, f"localhost:{closed_port()}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"refused" in head.lower()


# ------------------------------------------------------------------ SOCKS5
@pytest.mark.parametrize("host,atyp", [("127.0.0.1", 1), ("localhost", 3)])
def test_socks5_pipes(env: Env, host: str, atyp: int) -> None:
    sock, reply = socks5(env, host, env.echo.port, atyp=atyp)
    with sock:
        assert reply[:2] == b"\x05\x00"
        assert_echoes(sock)


def test_socks5_ipv6_target(env: Env) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    with listener:
        port = listener.getsockname()[1]
        sock, reply = socks5(env, "::1", port, atyp=4)
        with sock:
            assert reply[:2] == b"\x05\x00"
            accepted, _ = listener.accept()
            with accepted:
                accepted.sendall(b"v6")
                assert recv_exactly(sock, 2) == b"v6"


@pytest.mark.parametrize("key,password,expected", [
    ("foo", "wrong", b"\x01\x01"),  # RFC 1929 failure
    ("bar", PASSWORD, b"\x05\x02"),  # not allowed by ruleset
    ("missing", PASSWORD, b"\x05\x04"),  # no agent: host unreachable
])
def test_socks5_refusals(env: Env, key: str, password: str, expected: bytes) -> None:
    sock, reply = socks5(env, "127.0.0.1", env.echo.port, key, password)
    with sock:
        assert reply[:2] == expected


def test_socks5_policy_refusal_and_refused_target(env: Env) -> None:
    sock, reply = socks5(env, "127.0.0.1", 1, atyp=1)
    sock.close()
    assert reply[:2] == b"\x05\x02"
    sock, reply = socks5(env, "localhost", closed_port(), atyp=3)
    sock.close()
    assert reply[:2] == b"\x05\x05"


def test_socks5_bad_version_is_cut(env: Env) -> None:
    with env.connect() as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01\x03foo" + bytes((len(PASSWORD),)) + PASSWORD.encode())
        assert recv_exactly(sock, 2) == b"\x01\x00"
        sock.sendall(b"\x06\x01\x00\x01" + bytes(6))
        assert sock.recv(10) == b""


# ------------------------------------------------------------- absolute form
def test_absolute_form_request(env: Env) -> None:
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    seen: List[Dict[str, str]] = []

    @Request.application
    def app(request: Request) -> Response:
        seen.append(dict(request.headers))
        return Response(f"{request.method} {request.full_path} {request.get_data().decode()}")

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        import requests

        proxy = f"http://foo:{PASSWORD}@127.0.0.1:{env.proxy.address[1]}"
        url = f"http://127.0.0.1:{httpd.server_port}/path?q=1"
        response = requests.post(url, data=b"body", proxies={"http": proxy}, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.text == "POST /path?q=1 body"
        assert "Proxy-Authorization" not in seen[0]
        assert seen[0]["Host"] == f"127.0.0.1:{httpd.server_port}"
        bad = f"http://foo:wrong@127.0.0.1:{env.proxy.address[1]}"
        assert requests.get(url, proxies={"http": bad}, timeout=TIMEOUT).status_code == 407
        refused = requests.get(f"http://127.0.0.1:{closed_port()}/", proxies={"http": proxy}, timeout=TIMEOUT)
        assert refused.status_code == 502
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------- slow and hostile clients
def test_silent_and_partial_clients_are_cut_without_a_thread_each() -> None:
    env = Env(ProxyLimits(header_timeout=1.0, dial_confirm_wait=0.5))
    try:
        threads_before = threading.active_count()
        socks: List[socket.socket] = []
        partial = [b"", b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x",
                   b"\x05\x02\x00\x02", b"\x05\x01\x02\x01\x03fo"]
        for i in range(400):
            sock = env.connect()
            if partial[i % 4]:
                sock.sendall(partial[i % 4])
            socks.append(sock)
        wait_for(lambda: env.proxy.handshaking == 400)
        # no thread per connection: only the fixed set (loop, piper, dial workers)
        fixed = threads_before + env.proxy.limits.workers + 2
        assert threading.active_count() <= fixed
        # a real client still gets through while they wait
        sock, head = http_connect(env, env.echo_address)
        with sock:
            assert head.startswith(b"HTTP/1.1 200 ")
            assert_echoes(sock)
        for i, sock in enumerate(socks):
            sock.settimeout(TIMEOUT)
            rest = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
            if i % 4 == 1:
                assert rest.startswith(b"HTTP/1.1 408 "), rest
            elif i % 4 in (2, 3):
                assert rest == b"\x05\x02"  # the method chosen, then nothing
            else:
                assert rest == b""
            sock.close()
        wait_for(lambda: env.proxy.handshaking == 0)
        assert threading.active_count() <= fixed
    finally:
        env.close()


def test_huge_head_is_refused(env: Env) -> None:
    with env.connect() as sock:
        try:
            sock.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 70000 + b"\r\n")
        except OSError:
            pass  # the proxy may cut before it all went
        assert read_head(sock).startswith(b"HTTP/1.1 431 ")


def test_idle_piped_connection_is_cut() -> None:
    env = Env(ProxyLimits(idle_timeout=0.5, dial_confirm_wait=0.1))
    try:
        sock, head = http_connect(env, env.echo_address)
        with sock:
            assert head.startswith(b"HTTP/1.1 200 ")
            assert_echoes(sock)
            assert sock.recv(10) == b""  # cut once idle (within the test timeout)
        wait_for(lambda: env.proxy.active == 0)
    finally:
        env.close()


def test_stop_closes_every_connection(env: Env) -> None:
    idle = env.connect()
    sock, head = http_connect(env, env.echo_address)
    assert head.startswith(b"HTTP/1.1 200 ")
    env.proxy.stop()
    with idle, sock:
        assert idle.recv(10) == b""
        assert sock.recv(10) == b""


def test_absolute_form_body_sent_after_the_head(env: Env) -> None:
    """The body follows the head in a later packet: it is passed on while
    the answer is awaited (the target answers only once it has the body)."""
    target = socket.create_server(("127.0.0.1", 0))
    with target:
        port = target.getsockname()[1]
        with env.connect() as sock:
            token = base64.b64encode(f"foo:{PASSWORD}".encode()).decode()
            sock.sendall(f"POST http://127.0.0.1:{port}/up HTTP/1.1\r\nHost: x\r\n"
                         f"Proxy-Authorization: Basic {token}\r\nContent-Length: 5\r\n\r\n".encode())
            accepted, _ = target.accept()
            with accepted:
                accepted.settimeout(TIMEOUT)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += accepted.recv(4096)
                assert head.startswith(b"POST /up HTTP/1.1\r\nHost: 127.0.0.1:")
                assert b"Proxy-Authorization" not in head and head.endswith(b"Connection: close\r\n\r\n")
                sock.sendall(b"12345")
                assert recv_exactly(accepted, 5) == b"12345"
                accepted.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            assert read_head(sock).startswith(b"HTTP/1.1 204 ")
            assert sock.recv(10) == b""


class RefusalCounter(Observer):
    def __init__(self) -> None:
        self.statuses: List[int] = []

    def proxy_refused(self, status: int) -> None:
        self.statuses.append(status)


def test_refusals_are_counted_by_the_observer() -> None:
    env = Env()
    counter = RefusalCounter()
    env.proxy.stop()
    env.proxy = ProxyFrontEnd(env.tunnel.server.dial, authorize=env.store.authorize_user,
                              limits=ProxyLimits(header_timeout=0.5), piper=env.piper, observer=counter)
    try:
        for key, password in (("foo", "wrong"), ("bar", PASSWORD), ("missing", PASSWORD), ("foo", PASSWORD)):
            sock, _ = http_connect(env, env.echo_address if key != "foo" or password != PASSWORD else DENIED,
                                   key, password)
            sock.close()
        sock, reply = socks5(env, "127.0.0.1", env.echo.port, "foo", "wrong")
        sock.close()
        with env.connect() as silent:
            assert silent.recv(10) == b""  # cut after the header timeout
        with env.connect() as bad:
            bad.sendall(b"\x04\x01")
            bad.recv(10)
        wait_for(lambda: len(counter.statuses) == 7)
        assert counter.statuses == [407, 403, 502, 403, 407, 408, 400]
    finally:
        env.close()
