"""End to end: requests through a real WebSocket tunnel (werkzeug server,
TunnelClient over loopback) to real HTTP(S) servers on the client's side."""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import requests
import trustme
from werkzeug.serving import make_server

from remotedialer.client import Backoff, TunnelClient
from remotedialer.connection import TunnelConnection
from remotedialer.integrations.requests import TunnelAdapter, patch_requests
from remotedialer.server import Server

from testkit.http_targets import LoopbackServer, pattern, tls_context
from testkit.support import TIMEOUT, wait_for


def authorizer(request: Any) -> Tuple[str, bool]:
    key = request.headers.get("X-Tunnel-ID", "")
    return key, bool(key)


class Deployment:
    """A tunnel server on werkzeug and one client "foo" connected to it."""

    def __init__(self) -> None:
        self.server = Server(authorizer)
        self.httpd = make_server("127.0.0.1", 0, self.server, threaded=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        url = f"ws://127.0.0.1:{self.httpd.server_port}/connect"
        self.client = TunnelClient(url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
                                   backoff=Backoff(initial=0.05, maximum=0.2))
        self.client.start()
        self.client.wait_connected(TIMEOUT)
        wait_for(lambda: self.server.has_session("foo"))
        self.dials: List[str] = []
        self._dial = self.server.dialer("foo")

    def dial(self, proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        self.dials.append(address)
        return self._dial(proto, address, timeout)

    def open_connections(self) -> int:
        return sum(len(s.connections()) for s in self.server.sessions("foo"))

    def close(self) -> None:
        self.client.stop(TIMEOUT)
        self.server.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    d = Deployment()
    yield d
    d.close()


@pytest.fixture
def web() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    yield srv
    srv.stop()


def test_requests_through_a_websocket_tunnel(deployment: Deployment, web: LoopbackServer) -> None:
    with requests.Session() as http:
        http.mount("http://", TunnelAdapter(deployment.dial))
        bodies = {http.get(web.url("/hello"), timeout=TIMEOUT).text for _ in range(4)}
        assert len(bodies) == 1  # one far-side TCP connection, kept alive
        body = pattern(4 * 1024 * 1024 + 11)
        reply = http.post(web.url("/upload"), data=body, timeout=TIMEOUT).text
        assert reply == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
        size = 8 * 1024 * 1024
        with http.get(web.url(f"/download?size={size}"), stream=True, timeout=TIMEOUT) as response:
            digest = hashlib.sha256()
            for chunk in response.iter_content(1 << 16):
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
        assert deployment.dials == [f"127.0.0.1:{web.port}"]
    wait_for(lambda: deployment.open_connections() == 0)


def test_https_through_a_websocket_tunnel(deployment: Deployment, tmp_path: Any) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    srv = LoopbackServer(tls_context(ca))
    try:
        with patch_requests(deployment.dial, hosts=["localhost"]):
            response = requests.get(srv.url("/host", host="localhost"), verify=str(bundle), timeout=TIMEOUT)
            assert response.text == f"localhost:{srv.port}"
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(srv.url("/hello", host="localhost"), timeout=TIMEOUT)  # system CAs only
        assert deployment.dials == [f"localhost:{srv.port}"] * 2
    finally:
        srv.stop()
    wait_for(lambda: deployment.open_connections() == 0)


def test_unknown_client_key_and_lost_tunnel(deployment: Deployment, web: LoopbackServer) -> None:
    with requests.Session() as http:
        http.mount("http://nobody/", TunnelAdapter(deployment.server.dialer("nobody")))
        with pytest.raises(requests.ConnectionError, match="(?i)session"):
            http.get("http://nobody/", timeout=TIMEOUT)
        http.mount("http://", TunnelAdapter(deployment.dial))
        assert http.get(web.url("/hello"), timeout=TIMEOUT).ok
        deployment.client.stop(TIMEOUT)
        wait_for(lambda: not deployment.server.has_session("foo"))
        with pytest.raises(requests.ConnectionError):
            http.get(web.url("/hello"), timeout=TIMEOUT)
