"""The kubernetes client reaching an API server through a tunnel, following
:mod:`remotedialer.integrations.kubernetes`: a local HTTPS stand-in for the API server
(certificates from trustme, bearer-token auth), a real WSGI server and a real
tunnel client, and ``kubernetes.client`` with its pool manager replaced by a
:class:`~remotedialer.integrations.requests.TunnelPoolManager` (what
``tunneled_api_client`` and ``route_through_tunnel`` do)."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import trustme
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from remotedialer.connection import TunnelConnection
from remotedialer.integrations.kubernetes import route_through_tunnel, tunneled_api_client
from remotedialer.integrations.requests import TunnelPoolManager

from testkit.support import TIMEOUT, TunnelServer

TOKEN = "stand-in-token"
POD_LIST = {
    "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
    "items": [{"metadata": {"name": "web-0", "namespace": "default"},
               "status": {"phase": "Running"}}],
}


class _APIHandler(http.server.BaseHTTPRequestHandler):
    """Just enough of the API server: version, pods, a pod's log, configmaps."""

    protocol_version = "HTTP/1.1"
    server: "StandInAPIServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        self.server.seen.append((self.command, self.path))
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._reply(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "Unauthorized", "code": 401})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?")[0]
        if path == "/version/":
            self._reply(200, {
                "major": "1", "minor": "30", "gitVersion": "v1.30.0-standin", "gitCommit": "0" * 40,
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22",
                "compiler": "gc", "platform": "linux/amd64",
            })
        elif path == "/api/v1/namespaces/default/pods":
            self._reply(200, POD_LIST)
        elif path == "/api/v1/namespaces/default/pods/web-0/log":
            self._reply(200, b"line one\nline two\n", "text/plain")
        else:
            self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": "NotFound", "code": 404})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self._authorized():
            return
        created = json.loads(body)
        created.setdefault("metadata", {})["uid"] = "uid-1"
        self._reply(201, created)


class StandInAPIServer(http.server.ThreadingHTTPServer):
    """HTTPS on a loopback port with a certificate for ``localhost``."""

    daemon_threads = True

    def __init__(self, ca: trustme.CA) -> None:
        self.seen: List[Tuple[str, str]] = []
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(self.tls)
        super().__init__(("127.0.0.1", 0), _APIHandler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def get_request(self) -> Tuple[Any, Any]:
        sock, address = self.socket.accept()
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def api_server(ca: trustme.CA) -> Iterator[StandInAPIServer]:
    server = StandInAPIServer(ca)
    yield server
    server.stop()


def configuration_for(host: str, ca_file: Optional[str], token: str = TOKEN) -> k8s.Configuration:
    """What a user configures (docs/requests.rst, "The kubernetes client")."""
    configuration = k8s.Configuration()
    configuration.host = host
    configuration.ssl_ca_cert = ca_file
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return configuration


def api_client(dial: Any, host: str, ca_file: Optional[str], token: str = TOKEN) -> k8s.ApiClient:
    return tunneled_api_client(dial, configuration_for(host, ca_file, token))


def test_kubernetes_client_through_the_tunnel(
    tunnel_server: TunnelServer, api_server: StandInAPIServer, ca: trustme.CA, tmp_path: Path
) -> None:
    tunnel_server.client("cluster-7")
    dials: List[Tuple[str, str]] = []
    dialer = tunnel_server.server.dialer("cluster-7")

    def dial(proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        dials.append((proto, address))
        return dialer(proto, address, timeout)

    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    api = api_client(dial, f"https://localhost:{api_server.port}", str(ca_file))
    with api:
        version = k8s.VersionApi(api).get_code(_request_timeout=TIMEOUT)
        assert version.git_version == "v1.30.0-standin"
        core = k8s.CoreV1Api(api)
        pods = core.list_namespaced_pod("default", _request_timeout=TIMEOUT)
        assert [pod.metadata.name for pod in pods.items] == ["web-0"]
        assert pods.items[0].status.phase == "Running"
        log = core.read_namespaced_pod_log("web-0", "default", _request_timeout=TIMEOUT)
        assert log == "line one\nline two\n"
        config_map = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="settings"), data={"mode": "tunnel"})
        created = core.create_namespaced_config_map("default", config_map, _request_timeout=TIMEOUT)
        assert created.metadata.uid == "uid-1" and created.data == {"mode": "tunnel"}
        with pytest.raises(ApiException) as missing:
            core.read_namespaced_pod("nope", "default", _request_timeout=TIMEOUT)
        assert missing.value.status == 404
    # every request went through the tunnel, on one kept-alive connection,
    # with the name resolved on the client's side
    assert dials == [("tcp", f"localhost:{api_server.port}")]
    assert len(api_server.seen) == 5


def test_kubernetes_client_checks_the_api_servers_certificate(
    tunnel_server: TunnelServer, api_server: StandInAPIServer, tmp_path: Path
) -> None:
    tunnel_server.client("cluster-7")
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    api = api_client(
        tunnel_server.server.dialer("cluster-7"), f"https://localhost:{api_server.port}", str(other_ca)
    )
    api.rest_client.pool_manager.connection_pool_kw["retries"] = 0  # fail at once
    with api, pytest.raises(Exception) as failed:
        k8s.VersionApi(api).get_code(_request_timeout=TIMEOUT)
    assert "CERTIFICATE_VERIFY_FAILED" in str(failed.value)
    assert api_server.seen == []


def test_kubernetes_client_without_a_tunnel_gets_the_servers_reason(
    tunnel_server: TunnelServer, api_server: StandInAPIServer, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    api = api_client(
        tunnel_server.server.dialer("absent"), f"https://localhost:{api_server.port}", str(ca_file)
    )
    api.rest_client.pool_manager.connection_pool_kw["retries"] = 0  # fail at once
    with api, pytest.raises(Exception) as failed:
        k8s.VersionApi(api).get_code(_request_timeout=TIMEOUT)
    assert "failed to find Session for client absent" in str(failed.value)


def test_an_existing_client_routed_through_the_tunnel(
    tunnel_server: TunnelServer, api_server: StandInAPIServer, ca: trustme.CA, tmp_path: Path
) -> None:
    tunnel_server.client("cluster-7")
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    with k8s.ApiClient(configuration_for(f"https://localhost:{api_server.port}", str(ca_file))) as api:
        route_through_tunnel(api, tunnel_server.server.dialer("cluster-7"))
        assert isinstance(api.rest_client.pool_manager, TunnelPoolManager)
        pods = k8s.CoreV1Api(api).list_namespaced_pod("default", _request_timeout=TIMEOUT)
        assert [pod.metadata.name for pod in pods.items] == ["web-0"]
    assert api_server.seen == [("GET", "/api/v1/namespaces/default/pods")]


def test_a_configured_proxy_is_refused(tunnel_server: TunnelServer) -> None:
    configuration = configuration_for("https://kubernetes.default.svc", None)
    configuration.proxy = "http://proxy.corp:3128"
    with pytest.raises(ValueError, match="does not use configuration.proxy"):
        tunneled_api_client(tunnel_server.server.dialer("cluster-7"), configuration)
