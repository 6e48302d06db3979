"""requests/urllib3 over a real session pair, against real loopback HTTP(S) servers."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple

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

from testkit.http_targets import LoopbackServer, Tunnel, pattern, tls_context
from testkit.support import TIMEOUT, wait_for


# ------------------------------------------------------------------- fixtures
# tunnel, server, tls_server, ca, ca_bundle, client_context, refusing_port: conftest.py
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
