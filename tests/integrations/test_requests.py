"""requests/urllib3 over a real session pair, against real loopback HTTP(S) servers."""

from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import trustme
import urllib3
from urllib3.util.wait import wait_for_read

from remotedialer.connection import TunnelConnection
from remotedialer.errors import NoSessionError, TunnelTimeoutError
from remotedialer.integrations.requests import (
    TunnelAdapter,
    TunnelPoolManager,
    dial_address,
    patch_requests,
)
from remotedialer.piping import LocalDialer

from testkit.support import TIMEOUT, SessionPair, wait_for

BLOCK = bytes(range(256)) * 4096  # 1 MiB


def pattern(size: int) -> bytes:
    blocks, rest = divmod(size, len(BLOCK))
    return BLOCK * blocks + BLOCK[:rest]


# ------------------------------------------------------------------ the server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT  # no handler thread outlives a stuck test for long
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: "LoopbackServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def _reply(self, body: bytes, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Connection" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append((url.path, self.client_address))
        if url.path == "/hello":
            self._reply(f"hello {self.client_address[1]}".encode())
        elif url.path == "/host":
            self._reply(self.headers.get("Host", "").encode())
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"alpha-", b"beta-" * 1000, b"gamma"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/close":
            # No length: the body ends when the server closes the connection.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close " * 5000)
            self.close_connection = True
        elif url.path == "/download":
            size = int(query["size"])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = 0
            while sent < size:
                chunk = BLOCK[: min(len(BLOCK), size - sent)]
                self.wfile.write(chunk)
                sent += len(chunk)
        elif url.path == "/slow":
            self.server.release.wait(TIMEOUT)
            self._reply(b"late")
        elif url.path == "/peer-cert":
            cert = self.connection.getpeercert()  # type: ignore[attr-defined]
            subject = dict(item[0] for item in cert["subject"]) if cert else {}
            self._reply(repr(sorted(subject.items())).encode())
        else:
            self._reply(b"not found", 404)

    def do_POST(self) -> None:
        body = self._read_body()
        self.server.requests.append((self.path, self.client_address))
        self._reply(f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())


class LoopbackServer(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 keep-alive server on 127.0.0.1 port 0, optionally TLS (the
    handshake runs on the handler thread, so a failing client cannot stall
    the accept loop)."""

    daemon_threads = True

    def __init__(self, tls: Optional[ssl.SSLContext] = None) -> None:
        self.tls = tls
        self.requests: List[Tuple[str, Any]] = []
        self.connections: List[socket.socket] = []
        self.errors: List[BaseException] = []
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def get_request(self) -> Tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def track(self, sock: socket.socket) -> None:
        self.connections.append(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        self.errors.append(sys.exc_info()[1])  # type: ignore[arg-type]

    def drop_idle_connections(self) -> None:
        """Close every accepted connection from the server side, unannounced."""
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self.drop_idle_connections()
        self.thread.join(TIMEOUT)


# ------------------------------------------------------------------- fixtures
class Tunnel:
    """A session pair whose client side dials local targets, and a dial
    function on the server side that counts its calls."""

    def __init__(self) -> None:
        self.local = LocalDialer(lambda proto, address: True)
        self.pair = SessionPair(connect_handler=self.local)
        self.dialed: List[Tuple[str, str, Optional[float]]] = []

    def dial(self, proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        self.dialed.append((proto, address, timeout))
        return self.pair.server.dial(proto, address, timeout)

    def idle(self) -> bool:
        """No tunneled connection is left on either side."""
        return not self.pair.server.connections() and not self.pair.client.connections()

    def close(self) -> None:
        self.pair.close()
        self.local.shutdown()


@pytest.fixture
def tunnel() -> Iterator[Tunnel]:
    t = Tunnel()
    yield t
    t.close()


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client TLS context trusting the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tls_context(ca: trustme.CA, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[LoopbackServer]:
    srv = LoopbackServer(tls_context(ca))
    yield srv
    srv.stop()


@pytest.fixture
def http(tunnel: Tunnel) -> Iterator[requests.Session]:
    """A requests session whose http and https go through the tunnel."""
    with requests.Session() as session:
        session.trust_env = False
        adapter = TunnelAdapter(tunnel.dial)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        yield session


# ---------------------------------------------------------------------- http
def test_keep_alive_reuses_one_tunneled_connection(
    tunnel: Tunnel, server: LoopbackServer, http: requests.Session
) -> None:
    bodies = [http.get(server.url("/hello"), timeout=TIMEOUT).text for _ in range(5)]
    assert len(set(bodies)) == 1 and bodies[0].startswith("hello ")
    assert len(tunnel.dialed) == 1
    assert len(server.connections) == 1
    assert len(tunnel.pair.server.connections()) == 1  # pooled, still open


def test_names_are_resolved_on_the_far_side(
    tunnel: Tunnel, server: LoopbackServer, http: requests.Session
) -> None:
    response = http.get(server.url("/host", host="localhost"), timeout=TIMEOUT)
    assert response.text == f"localhost:{server.port}"
    assert tunnel.dialed == [("tcp", f"localhost:{server.port}", TIMEOUT)]


def test_dial_address_keeps_names_and_brackets_ipv6() -> None:
    assert dial_address("example.internal", 8080) == "example.internal:8080"
    assert dial_address("::1", 443) == "[::1]:443"
    assert dial_address("[fe80::1]", 80) == "[fe80::1]:80"
    seen: List[str] = []

    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        seen.append(address)
        raise NoSessionError("no session for key")

    with requests.Session() as session:
        session.mount("http://", TunnelAdapter(dial))
        for url in ("http://[::1]:8080/", "http://only-there.internal:81/x", "http://Mixed.Case/"):
            with pytest.raises(requests.ConnectionError, match="no session for key"):
                session.get(url, timeout=TIMEOUT)
    assert seen == ["[::1]:8080", "only-there.internal:81", "mixed.case:80"]


def test_chunked_response(server: LoopbackServer, http: requests.Session) -> None:
    response = http.get(server.url("/chunked"), timeout=TIMEOUT)
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.content == b"alpha-" + b"beta-" * 1000 + b"gamma"


def test_connection_close_body_and_the_connection_is_not_reused(
    tunnel: Tunnel, server: LoopbackServer, http: requests.Session
) -> None:
    for _ in range(2):
        response = http.get(server.url("/close"), timeout=TIMEOUT)
        assert response.content == b"until-close " * 5000
    assert len(tunnel.dialed) == 2
    wait_for(tunnel.idle)


def test_multi_mib_post(server: LoopbackServer, http: requests.Session) -> None:
    body = pattern(6 * 1024 * 1024 + 123)
    response = http.post(server.url("/upload"), data=body, timeout=TIMEOUT)
    assert response.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"


def test_chunked_upload(server: LoopbackServer, http: requests.Session) -> None:
    parts = [pattern(100_000), b"x" * 7, pattern(300_001)]
    response = http.post(server.url("/upload"), data=iter(parts), timeout=TIMEOUT)
    body = b"".join(parts)
    assert response.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"


def test_streamed_download(tunnel: Tunnel, server: LoopbackServer, http: requests.Session) -> None:
    size = 12 * 1024 * 1024 + 5
    digest = hashlib.sha256()
    received = 0
    with http.get(server.url(f"/download?size={size}"), stream=True, timeout=TIMEOUT) as response:
        for chunk in response.iter_content(64 * 1024):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    # The connection went back to the pool and still works.
    assert http.get(server.url("/hello"), timeout=TIMEOUT).ok
    assert len(tunnel.dialed) == 1


def test_read_timeout(server: LoopbackServer, http: requests.Session) -> None:
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(server.url("/slow"), timeout=(TIMEOUT, 0.2))


def test_connect_timeout_bounds_the_dial() -> None:
    blocked = threading.Event()
    seen: List[Optional[float]] = []

    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        seen.append(timeout)
        blocked.wait(timeout)
        raise TunnelTimeoutError("timed out")

    with requests.Session() as session:
        session.mount("http://", TunnelAdapter(dial))
        with pytest.raises(requests.exceptions.ConnectTimeout):
            session.get("http://unreachable.internal/", timeout=(0.05, TIMEOUT))
    assert seen == [0.05]


def test_no_session_is_a_connection_error() -> None:
    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        raise NoSessionError("no session for client key 'gone'")

    with requests.Session() as session:
        session.mount("http://", TunnelAdapter(dial))
        with pytest.raises(requests.ConnectionError, match="no session for client key") as info:
            session.get("http://target.internal/", timeout=TIMEOUT)
    assert not isinstance(info.value, requests.exceptions.ConnectTimeout)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def test_far_side_dial_failure_is_a_connection_error(
    tunnel: Tunnel, http: requests.Session, refusing_port: int
) -> None:
    with pytest.raises(requests.ConnectionError, match="refused"):
        http.get(f"http://127.0.0.1:{refusing_port}/", timeout=TIMEOUT)
    wait_for(tunnel.idle)


def wait_until_pooled_connections_poll_dropped(session: requests.Session) -> None:
    """Wait until every idle pooled connection of ``session`` polls readable,
    which is what urllib3's liveness check looks at (the far side's close
    reaches the pooled socket a moment after the sessions forgot it)."""
    socks = []
    for adapter in set(session.adapters.values()):
        pools = adapter.poolmanager.pools  # type: ignore[attr-defined]
        for key in pools.keys():
            idle = [conn for conn in list(pools[key].pool.queue) if conn is not None]
            socks += [conn.sock for conn in idle if conn.sock is not None]
    assert socks, "no idle pooled connection"
    wait_for(lambda: all(wait_for_read(sock, timeout=0.0) for sock in socks))


def test_pooled_connection_closed_by_the_far_side_is_replaced(
    tunnel: Tunnel, server: LoopbackServer, http: requests.Session
) -> None:
    first = http.get(server.url("/hello"), timeout=TIMEOUT).text
    assert len(tunnel.dialed) == 1
    server.drop_idle_connections()
    wait_for(tunnel.idle)  # the far side's close reached us; the pool does not know yet
    wait_until_pooled_connections_poll_dropped(http)
    second = http.get(server.url("/hello"), timeout=TIMEOUT).text
    assert second != first  # a new TCP connection on the far side
    assert len(tunnel.dialed) == 2


def test_environment_proxies_are_ignored(
    tunnel: Tunnel, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    proxy = f"http://127.0.0.1:{trap.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        with requests.Session() as session:
            assert session.trust_env
            session.mount("http://", TunnelAdapter(tunnel.dial))
            assert session.get(server.url("/hello"), timeout=TIMEOUT).ok
            assert session.get(server.url("/hello"), proxies={"http": proxy}, timeout=TIMEOUT).ok
        # The proxy settings were live: an unmounted session would use the trap.
        assert requests.utils.get_environ_proxies(server.url("/")) == {
            "http": proxy, "https": proxy, "all": proxy,
        }
        with pytest.raises(BlockingIOError):
            trap.accept()  # nothing ever connected to the proxy
        assert len(tunnel.dialed) == 1
    finally:
        trap.close()


def test_urllib3_pool_manager(tunnel: Tunnel, server: LoopbackServer) -> None:
    manager = TunnelPoolManager(tunnel.dial)
    statuses = []
    for _ in range(3):
        response = manager.request("GET", server.url("/hello"), timeout=TIMEOUT)
        assert response.data.startswith(b"hello ")
        statuses.append(response.status)
    assert statuses == [200, 200, 200]
    assert len(tunnel.dialed) == 1
    manager.clear()  # closes idle connections even while a response refers to the pool
    wait_for(tunnel.idle)
    assert response.status == 200


def test_closing_the_session_closes_tunneled_connections(
    tunnel: Tunnel, server: LoopbackServer
) -> None:
    with requests.Session() as session:
        session.mount("http://", TunnelAdapter(tunnel.dial))
        assert session.get(server.url("/hello"), timeout=TIMEOUT).ok
        assert not tunnel.idle()
    wait_for(tunnel.idle)


def test_adapter_survives_pickling(tunnel: Tunnel) -> None:
    import pickle

    adapter = TunnelAdapter(dial_address)  # any picklable callable
    clone = pickle.loads(pickle.dumps(adapter))
    assert clone.dial is dial_address
    assert clone.poolmanager.dial is dial_address


# --------------------------------------------------------------------- https
def test_https_verifies_with_a_ca_bundle_and_keeps_alive(
    tunnel: Tunnel, tls_server: LoopbackServer, http: requests.Session, ca_bundle: str
) -> None:
    url = tls_server.url("/hello", host="localhost")
    bodies = [http.get(url, verify=ca_bundle, timeout=TIMEOUT).text for _ in range(3)]
    assert len(set(bodies)) == 1
    assert len(tunnel.dialed) == 1
    assert tunnel.dialed[0][1] == f"localhost:{tls_server.port}"


def test_https_large_transfers(tls_server: LoopbackServer, http: requests.Session, ca_bundle: str) -> None:
    body = pattern(3 * 1024 * 1024 + 1)
    response = http.post(tls_server.url("/upload", host="localhost"), data=body, verify=ca_bundle,
                         timeout=TIMEOUT)
    assert response.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    size = 5 * 1024 * 1024 + 3
    response = http.get(tls_server.url(f"/download?size={size}", host="localhost"), verify=ca_bundle,
                        timeout=TIMEOUT)
    assert response.content == pattern(size)


def test_https_wrong_ca_fails_and_closes_the_tunneled_connection(
    tunnel: Tunnel, tls_server: LoopbackServer, http: requests.Session, tmp_path: Any
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        http.get(tls_server.url("/hello", host="localhost"), verify=str(other), timeout=TIMEOUT)
    assert len(tunnel.dialed) == 1
    wait_for(tunnel.idle)


def test_https_default_trust_store_rejects_a_private_ca(
    tunnel: Tunnel, tls_server: LoopbackServer, http: requests.Session
) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        http.get(tls_server.url("/hello", host="localhost"), timeout=TIMEOUT)
    wait_for(tunnel.idle)


def test_https_hostname_mismatch_fails(
    tunnel: Tunnel, tls_server: LoopbackServer, http: requests.Session, ca_bundle: str
) -> None:
    # The certificate names "localhost" only.
    with pytest.raises(requests.exceptions.SSLError, match="(?i)mismatch|doesn't match|not valid"):
        http.get(tls_server.url("/hello", host="127.0.0.1"), verify=ca_bundle, timeout=TIMEOUT)
    wait_for(tunnel.idle)


def test_https_verify_false(tls_server: LoopbackServer, http: requests.Session) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        response = http.get(tls_server.url("/hello", host="127.0.0.1"), verify=False, timeout=TIMEOUT)
    assert response.text.startswith("hello ")


def test_https_client_certificate(
    tunnel: Tunnel, ca: trustme.CA, ca_bundle: str, http: requests.Session, tmp_path: Any
) -> None:
    srv = LoopbackServer(tls_context(ca, require_client_cert=True))
    try:
        client = ca.issue_cert("client@example.test", common_name="tunnel-client")
        cert, key = tmp_path / "client.pem", tmp_path / "client.key"
        for blob in client.cert_chain_pems:
            blob.write_to_path(str(cert), append=True)
        client.private_key_pem.write_to_path(str(key))
        url = srv.url("/peer-cert", host="localhost")
        response = http.get(url, verify=ca_bundle, cert=(str(cert), str(key)), timeout=TIMEOUT)
        assert "tunnel-client" in response.text
        with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
            http.get(srv.url("/peer-cert", host="localhost"), verify=ca_bundle, timeout=TIMEOUT)
    finally:
        srv.stop()
    wait_for(tunnel.idle)


def test_https_far_side_dial_failure_is_a_connection_error_not_tls(
    tunnel: Tunnel, http: requests.Session, refusing_port: int, ca_bundle: str
) -> None:
    with pytest.raises(requests.ConnectionError, match="refused") as info:
        http.get(f"https://localhost:{refusing_port}/", verify=ca_bundle, timeout=TIMEOUT)
    assert not isinstance(info.value, requests.exceptions.SSLError)
    wait_for(tunnel.idle)


def test_https_pooled_connection_closed_by_the_far_side_is_replaced(
    tunnel: Tunnel, tls_server: LoopbackServer, http: requests.Session, ca_bundle: str
) -> None:
    url = tls_server.url("/hello", host="localhost")
    first = http.get(url, verify=ca_bundle, timeout=TIMEOUT).text
    tls_server.drop_idle_connections()
    wait_for(tunnel.idle)
    wait_until_pooled_connections_poll_dropped(http)
    second = http.get(url, verify=ca_bundle, timeout=TIMEOUT).text
    assert second != first
    assert len(tunnel.dialed) == 2


def test_https_read_timeout(tls_server: LoopbackServer, http: requests.Session, ca_bundle: str) -> None:
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(tls_server.url("/slow", host="localhost"), verify=ca_bundle, timeout=(TIMEOUT, 0.2))


# --------------------------------------------------------------------- patch
def counting(tunnel: Tunnel) -> Tuple[Callable[..., TunnelConnection], List[str]]:
    seen: List[str] = []

    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        seen.append(address)
        return tunnel.dial(proto, address, timeout)

    return dial, seen


def test_patch_as_context_manager_and_full_undo(tunnel: Tunnel, server: LoopbackServer) -> None:
    original = requests.Session.__init__
    with patch_requests(tunnel.dial):
        assert requests.Session.__init__ is not original
        assert requests.get(server.url("/hello"), timeout=TIMEOUT).ok
        assert requests.post(server.url("/upload"), data=b"abc", timeout=TIMEOUT).ok
    assert requests.Session.__init__ is original
    assert len(tunnel.dialed) == 2  # requests.get makes a new session each call
    assert requests.get(server.url("/hello"), timeout=TIMEOUT).ok  # direct again
    assert len(tunnel.dialed) == 2
    assert len(server.requests) == 3
    wait_for(tunnel.idle)  # the per-call sessions closed their connections


def test_patch_as_function_sessions_made_while_patched_keep_the_tunnel(
    tunnel: Tunnel, server: LoopbackServer
) -> None:
    original = requests.Session.__init__
    handle = patch_requests(tunnel.dial)
    try:
        patched = requests.Session()
    finally:
        handle.undo()
    handle.undo()  # idempotent
    assert requests.Session.__init__ is original
    with patched, requests.Session() as plain:
        assert patched.get(server.url("/hello"), timeout=TIMEOUT).ok
        assert len(tunnel.dialed) == 1
        assert plain.get(server.url("/hello"), timeout=TIMEOUT).ok
        assert len(tunnel.dialed) == 1
        assert not any(isinstance(a, TunnelAdapter) for a in plain.adapters.values())


def test_patch_only_chosen_hosts(tunnel: Tunnel, server: LoopbackServer) -> None:
    with patch_requests(tunnel.dial, hosts=["LocalHost"]):
        assert requests.get(server.url("/hello", host="localhost"), timeout=TIMEOUT).ok
        assert len(tunnel.dialed) == 1
        assert requests.get(server.url("/hello", host="127.0.0.1"), timeout=TIMEOUT).ok
        assert len(tunnel.dialed) == 1
    with patch_requests(tunnel.dial, hosts=[f"127.0.0.1:{server.port}"]):
        assert requests.get(server.url("/hello"), timeout=TIMEOUT).ok
        assert len(tunnel.dialed) == 2
        with pytest.raises(requests.ConnectionError):  # another port: direct, and nothing listens
            requests.get("http://127.0.0.1:9/", timeout=TIMEOUT)
        assert len(tunnel.dialed) == 2


def test_patch_host_matching_is_exact(tunnel: Tunnel) -> None:
    seen: List[str] = []

    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        seen.append(address)
        raise NoSessionError("tunneled")

    with patch_requests(dial, hosts=["api.internal", "[::1]:8443"]), requests.Session() as session:
        router = session.get_adapter("http://api.internal/")
        assert router.routes_through_tunnel("http://api.internal/x")  # type: ignore[attr-defined]
        assert router.routes_through_tunnel("https://API.internal:9443/")  # type: ignore[attr-defined]
        assert router.routes_through_tunnel("https://[::1]:8443/")  # type: ignore[attr-defined]
        assert not router.routes_through_tunnel("https://[::1]/")  # type: ignore[attr-defined]
        assert not router.routes_through_tunnel("http://api.internal.evil.test/")  # type: ignore[attr-defined]
        assert not router.routes_through_tunnel("http://x.api.internal/")  # type: ignore[attr-defined]
        with pytest.raises(requests.ConnectionError, match="tunneled"):
            session.get("http://api.internal/", timeout=TIMEOUT)
    assert seen == ["api.internal:80"]


def test_patches_nest_and_undo_in_any_order(tunnel: Tunnel, server: LoopbackServer) -> None:
    original = requests.Session.__init__
    first_dial, first_seen = counting(tunnel)
    second_dial, second_seen = counting(tunnel)
    first = patch_requests(first_dial, hosts=["localhost"])
    second = patch_requests(second_dial, hosts=["127.0.0.1"])
    try:
        assert requests.get(server.url("/hello", host="localhost"), timeout=TIMEOUT).ok
        assert requests.get(server.url("/hello", host="127.0.0.1"), timeout=TIMEOUT).ok
        assert (len(first_seen), len(second_seen)) == (1, 1)
        first.undo()
        assert requests.get(server.url("/hello", host="localhost"), timeout=TIMEOUT).ok
        assert requests.get(server.url("/hello", host="127.0.0.1"), timeout=TIMEOUT).ok
        assert (len(first_seen), len(second_seen)) == (1, 2)
    finally:
        first.undo()
        second.undo()
    assert requests.Session.__init__ is original


def test_patch_ignores_environment_proxies_for_tunneled_hosts(
    tunnel: Tunnel, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with patch_requests(tunnel.dial):
        assert requests.get(server.url("/hello"), timeout=TIMEOUT).ok
    assert len(tunnel.dialed) == 1
