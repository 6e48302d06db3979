"""PrometheusObserver: counters and gauges follow sessions and connections;
/metrics is scraped over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
import websocket
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from remotedialer.errors import DialRefusedError, HandshakeError
from remotedialer.server.policy import DialPolicy, KeyPolicy, parse_targets
from werkzeug.serving import make_server

from remotedialer import metrics
from remotedialer.config import Limits
from remotedialer.heartbeat import Heartbeat
from remotedialer.metrics import METRICS, PrometheusObserver, with_metrics_endpoint
from remotedialer.resumable import ResumableSession
from remotedialer.session import Session
from remotedialer.testing import MemoryTransport, memory_pair

from testkit.support import (
    TIMEOUT,
    AcceptingHandler,
    EchoServer,
    recv_exactly,
    tunnel_id_authorizer,
    wait_for,
)


class ObservedPair:
    """A client and a server session over an in-memory pair, each side with its
    own observer and registry (as two processes would have)."""

    def __init__(self, limits: Optional[Limits] = None, client_key: str = "foo") -> None:
        self.client_registry, self.server_registry = CollectorRegistry(), CollectorRegistry()
        self.client_observer = PrometheusObserver(self.client_registry)
        self.server_observer = PrometheusObserver(self.server_registry)
        self.handler = AcceptingHandler()
        client_end, server_end = memory_pair()
        heartbeat = Heartbeat("test-metrics-heartbeat")
        limits = limits or Limits()
        self.client = Session(client_end, is_client=True, client_key=client_key, connect_handler=self.handler,
                              limits=limits, observer=self.client_observer, heartbeat=heartbeat)
        self.server = Session(server_end, is_client=False, client_key=client_key, limits=limits,
                              observer=self.server_observer, heartbeat=heartbeat)
        self.threads = [self.client.start(), self.server.start()]

    def close(self) -> None:
        self.client.close("test over")
        self.server.close("test over")
        for thread in self.threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()


@pytest.fixture
def pair() -> Iterator[ObservedPair]:
    made = ObservedPair()
    yield made
    made.close()


def observed_session(
    observer: PrometheusObserver, key: str, **kwargs: Any
) -> Tuple[Session, MemoryTransport]:
    """A server session for ``key`` reporting to ``observer`` (not started),
    and the far end of its in-memory transport."""
    client_end, server_end = memory_pair()
    session = Session(server_end, is_client=False, client_key=key, observer=observer,
                      heartbeat=Heartbeat("test-metrics-heartbeat"), **kwargs)
    return session, client_end


def end_by_a_failed_write(observer: PrometheusObserver, key: str) -> None:
    """A session for ``key``, started as serve() would (nobody reads it),
    whose socket is gone: its next write fails and ends it."""
    doomed, far = observed_session(observer, key)
    observer.session_started(doomed)
    far.close()
    with pytest.raises(ConnectionError):
        doomed.dial("tcp", "127.0.0.1:1")


def suspend_resume_refuse(observer: PrometheusObserver, session: Session) -> None:
    """The resumption hooks: ``session`` suspended and resumed (3 bytes sent
    again), and a reattach refused."""
    observer.session_suspended(session, "websocket closed")
    observer.session_resumed(session, 3)
    observer.resume_refused("unknown token")


def peer_link_up_and_down(observer: PrometheusObserver, peer: str) -> None:
    """The peering layer's hooks for one link that came up and went down."""
    observer.peer_connecting(peer)
    observer.peer_connected(peer)
    observer.peer_disconnected(peer)


Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Parse what a scrape of ``registry`` shows: {(sample name, labels): value}."""
    return scrape_text(generate_latest(registry).decode())


def scrape_text(text: str) -> Samples:
    """Parse the Prometheus text format: {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metric_list_matches_go_names() -> None:
    go = {spec.name for spec in METRICS if spec.from_go}
    assert go == {
        "session_server_total_add_websocket_session",
        "session_server_total_remove_websocket_session",
        "session_server_total_add_connections",
        "session_server_total_remove_connections",
        "session_server_total_transmit_bytes",
        "session_server_total_transmit_error_bytes",
        "session_server_total_receive_bytes",
        "session_server_total_peer_ws_attempt",
        "session_server_total_peer_ws_connected",
        "session_server_total_peer_ws_disconnected",
    }
    gauges = {spec.name for spec in METRICS if spec.kind == "gauge"}
    assert gauges == {
        "remotedialer_sessions",
        "remotedialer_connections",
        "remotedialer_paused_connections",
        "remotedialer_buffered_bytes",
        "remotedialer_dials_in_flight",
    }
    assert len({spec.name for spec in METRICS}) == len(METRICS)


def test_sessions_counted_while_live(pair: ObservedPair) -> None:
    obs = pair.server_observer
    wait_for(lambda: obs.value(metrics.SESSIONS, clientkey="foo", peer="false") == 1)
    assert obs.value(metrics.ADD_SESSION, clientkey="foo", peer="false") == 1
    assert obs.value(metrics.REMOVE_SESSION, clientkey="foo", peer="false") == 0
    pair.server.close("bye")
    wait_for(lambda: obs.value(metrics.REMOVE_SESSION, clientkey="foo", peer="false") == 1)
    assert obs.value(metrics.SESSIONS, clientkey="foo", peer="false") == 0
    assert obs.value(metrics.ADD_SESSION, clientkey="foo", peer="false") == 1
    # the client side saw its own session end too
    wait_for(lambda: pair.client_observer.value(metrics.REMOVE_SESSION, clientkey="foo", peer="false") == 1)


def test_peer_label_for_server_sessions_with_a_client_listener() -> None:
    """A server session that listens for ADD_CLIENT/REMOVE_CLIENT is a peer link."""
    registry = CollectorRegistry()
    obs = PrometheusObserver(registry)
    session, client_end = observed_session(obs, "peer-a", client_listener=lambda *args: None)
    thread = session.start()
    try:
        wait_for(lambda: obs.value(metrics.SESSIONS, clientkey="peer-a", peer="true") == 1)
    finally:
        client_end.close()
        thread.join(TIMEOUT)
    assert obs.value(metrics.REMOVE_SESSION, clientkey="peer-a", peer="true") == 1


def test_peer_label_follows_is_peer_attribute() -> None:
    registry = CollectorRegistry()
    obs = PrometheusObserver(registry)
    session, client_end = observed_session(obs, "peer-b")
    session.is_peer = True  # type: ignore[attr-defined]
    thread = session.start()
    try:
        wait_for(lambda: obs.value(metrics.SESSIONS, clientkey="peer-b", peer="true") == 1)
        assert obs.value(metrics.ADD_SESSION, clientkey="peer-b", peer="true") == 1
    finally:
        client_end.close()
        thread.join(TIMEOUT)
    assert obs.value(metrics.REMOVE_SESSION, clientkey="peer-b", peer="true") == 1


def test_connections_and_bytes(pair: ObservedPair) -> None:
    server_obs, client_obs = pair.server_observer, pair.client_observer
    labels = {"clientkey": "foo", "proto": "tcp", "addr": "127.0.0.1:9"}
    conn = pair.server.dial("tcp", "127.0.0.1:9", timeout=TIMEOUT)
    far = pair.handler.next()
    assert server_obs.value(metrics.ADD_CONNECTIONS, **labels) == 1
    wait_for(lambda: client_obs.value(metrics.ADD_CONNECTIONS, **labels) == 1)
    assert server_obs.value(metrics.CONNECTIONS, clientkey="foo") == 1
    assert client_obs.value(metrics.CONNECTIONS, clientkey="foo") == 1

    conn.sendall(b"x" * 1000)
    assert server_obs.value(metrics.TRANSMIT_BYTES, clientkey="foo") == 1000
    wait_for(lambda: client_obs.value(metrics.RECEIVE_BYTES, clientkey="foo") == 1000)
    assert client_obs.value(metrics.BUFFERED_BYTES, clientkey="foo") == 1000
    far.settimeout(TIMEOUT)
    received = 0
    while received < 1000:
        received += len(far.recv(4096))
    assert client_obs.value(metrics.BUFFERED_BYTES, clientkey="foo") == 0

    far.sendall(b"y" * 10)
    wait_for(lambda: server_obs.value(metrics.RECEIVE_BYTES, clientkey="foo") == 10)
    assert client_obs.value(metrics.TRANSMIT_BYTES, clientkey="foo") == 10

    conn.close()  # sends ERROR "EOF"
    assert server_obs.value(metrics.TRANSMIT_ERROR_BYTES, clientkey="foo") == len(b"EOF")
    assert server_obs.value(metrics.REMOVE_CONNECTIONS, **labels) == 1
    wait_for(lambda: client_obs.value(metrics.REMOVE_CONNECTIONS, **labels) == 1)
    assert server_obs.value(metrics.CONNECTIONS, clientkey="foo") == 0
    wait_for(lambda: client_obs.value(metrics.CONNECTIONS, clientkey="foo") == 0)


def test_session_end_removes_every_connection(pair: ObservedPair) -> None:
    obs = pair.server_observer
    for port in (1, 2, 3):
        pair.server.dial("tcp", f"127.0.0.1:{port}")
    assert obs.value(metrics.CONNECTIONS, clientkey="foo") == 3
    pair.client.close("gone")
    pair.server.wait_closed(TIMEOUT)
    removed = sum(obs.value(metrics.REMOVE_CONNECTIONS, clientkey="foo", proto="tcp",
                            addr=f"127.0.0.1:{port}") for port in (1, 2, 3))
    assert removed == 3
    assert obs.value(metrics.CONNECTIONS, clientkey="foo") == 0


def test_paused_connections_both_ways() -> None:
    limits = Limits(pause_threshold=4096, resume_threshold=1024, hard_buffer_limit=1 << 20)
    made = ObservedPair(limits)
    try:
        conn = made.server.dial("tcp", "127.0.0.1:9", timeout=TIMEOUT)
        far = made.handler.next()
        conn.sendall(b"z" * 8192)
        client_obs, server_obs = made.client_observer, made.server_observer
        # the receiving client asked the server to pause ...
        wait_for(lambda: client_obs.value(metrics.PAUSED_CONNECTIONS, clientkey="foo", paused_by="us") == 1)
        assert client_obs.value(metrics.PAUSED_CONNECTIONS, clientkey="foo", paused_by="peer") == 0
        # ... and the server knows it was paused
        wait_for(lambda: server_obs.value(metrics.PAUSED_CONNECTIONS, clientkey="foo", paused_by="peer") == 1)
        assert server_obs.value(metrics.PAUSED_CONNECTIONS, clientkey="foo", paused_by="us") == 0
        far.settimeout(TIMEOUT)
        received = 0
        while received < 8192:
            received += len(far.recv(65536))
        assert client_obs.value(metrics.PAUSED_CONNECTIONS, clientkey="foo", paused_by="us") == 0
        wait_for(lambda: server_obs.value(metrics.PAUSED_CONNECTIONS, clientkey="foo", paused_by="peer") == 0)
    finally:
        made.close()


def test_peer_hooks() -> None:
    registry = CollectorRegistry()
    obs = PrometheusObserver(registry)
    obs.peer_connecting("b")
    obs.peer_connecting("b")
    obs.peer_connected("b")
    obs.peer_disconnected("b")
    assert obs.value(metrics.PEER_ATTEMPT, peer="b") == 2
    assert obs.value(metrics.PEER_CONNECTED, peer="b") == 1
    assert obs.value(metrics.PEER_DISCONNECTED, peer="b") == 1
    samples = scrape(registry)
    assert samples[("session_server_total_peer_ws_attempt", (("peer", "b"),))] == 2


def test_send_failure_counted() -> None:
    registry = CollectorRegistry()
    obs = PrometheusObserver(registry)
    session, client_end = observed_session(obs, "k")
    client_end.close()  # the next write fails
    with pytest.raises(ConnectionError):
        session.dial("tcp", "127.0.0.1:1")
    assert obs.value(metrics.SEND_FAILURES, clientkey="k") == 1
    assert scrape(registry)[("remotedialer_send_failures_total", (("clientkey", "k"),))] == 1
    session.close()


def test_registries_are_separate_and_duplicates_refused() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    a, b = PrometheusObserver(first), PrometheusObserver(second)
    a.peer_connected("x")
    assert ("session_server_total_peer_ws_connected", (("peer", "x"),)) in scrape(first)
    assert ("session_server_total_peer_ws_connected", (("peer", "x"),)) not in scrape(second)
    with pytest.raises(ValueError):
        PrometheusObserver(first)
    a.unregister()
    PrometheusObserver(first)  # the names are free again
    assert b.registry is second


def test_go_names_false_gives_standard_counters() -> None:
    registry = CollectorRegistry()
    obs = PrometheusObserver(registry, go_names=False)
    obs.peer_connected("x")
    text = generate_latest(registry).decode()
    assert "# TYPE session_server_total_peer_ws_connected_total counter" in text
    assert 'session_server_total_peer_ws_connected_total{peer="x"} 1.0' in text
    for spec in METRICS:
        assert f"# TYPE {spec.exposed_name(go_names=False)} " in text


def test_observer_with_registry_adds_process_metrics() -> None:
    observer = metrics.observer_with_registry()
    text = generate_latest(observer.registry).decode()
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text
    assert "# TYPE remotedialer_sessions gauge" in text
    bare = metrics.observer_with_registry(process_metrics=False)
    assert "python_info" not in generate_latest(bare.registry).decode()


def test_go_names_are_exact_by_default() -> None:
    registry = CollectorRegistry()
    PrometheusObserver(registry).peer_connected("x")
    text = generate_latest(registry).decode()
    assert 'session_server_total_peer_ws_connected{peer="x"} 1.0' in text
    assert "session_server_total_peer_ws_connected_total" not in text


def test_package_imports_without_prometheus_client() -> None:
    """``import remotedialer`` must not need the extra; ``remotedialer.metrics``
    says how to get it."""
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import remotedialer\n"
        "try:\n"
        "    import remotedialer.metrics\n"
        "except ImportError as exc:\n"
        "    print('IMPORT-ERROR', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR" in result.stdout
    assert "pip install prometheus_client" in result.stdout


# ---------------------------------------------------------------- over HTTP
class Served:
    """A WSGI app on a real werkzeug server bound to a free loopback port."""

    def __init__(self, app: Callable[..., object]) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)  # type: ignore[arg-type]
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


def _not_found(environ: Dict[str, object], start_response: Callable[..., object]) -> List[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not here"]


def test_metrics_endpoint_over_http(pair: ObservedPair) -> None:
    """Every documented metric is on a real /metrics endpoint, with samples
    carrying exactly its documented labels."""
    observer = pair.server_observer
    conn = pair.server.dial("tcp", "127.0.0.1:9", timeout=TIMEOUT)
    far = pair.handler.next()
    conn.sendall(b"hello")
    far.sendall(b"back")
    wait_for(lambda: observer.value(metrics.RECEIVE_BYTES, clientkey="foo") == 4)
    pair.server.dial("tcp", "127.0.0.1:10", timeout=TIMEOUT).close()  # an ERROR EOF goes out
    end_by_a_failed_write(observer, "bar")  # a second session
    peer_link_up_and_down(observer, "b")
    suspend_resume_refuse(observer, pair.server)
    observer.handshake_refused(401)
    observer.dial_refused("foo", "target")
    observer.proxy_refused(407)
    observer.credentials_reloaded(True)

    served = Served(with_metrics_endpoint(_not_found, pair.server_registry))
    try:
        response = requests.get(served.url + "/metrics", timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        other = requests.get(served.url + "/other", timeout=TIMEOUT)
        assert other.status_code == 404
    finally:
        served.close()
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for spec in METRICS:
        name = spec.exposed_name()
        # the parser names a counter family without its _total suffix
        family = families.get(name) or families.get(name[: -len("_total")])
        assert family is not None, f"{name} missing from /metrics"
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert set(sample.labels) == set(spec.labels), (name, sample.labels)
    assert 'session_server_total_transmit_bytes{clientkey="foo"} 5.0' in response.text
    assert 'session_server_total_remove_websocket_session{clientkey="bar",peer="false"} 1.0' in response.text


def test_metrics_scraped_from_a_running_server(echo_server: EchoServer) -> None:
    """A real Server under werkzeug with real tunnel clients (one of them a
    peer): /metrics shows every documented metric with its labels."""
    from remotedialer.client import Backoff, TunnelClient
    from remotedialer.server import Server

    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    resumable = Limits(resume_window=30.0)
    policy = DialPolicy((KeyPolicy("foo", parse_targets(echo_server.address)),))
    server = Server(tunnel_id_authorizer, observer=observer, limits=resumable, dial_policy=lambda: policy)
    server.peering.accept_peer("peer-b", "s3cret")
    served = Served(with_metrics_endpoint(server, registry))
    url = served.url.replace("http://", "ws://") + "/connect"
    clients = [
        TunnelClient(url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
                     backoff=Backoff(initial=0.05, maximum=0.2), limits=resumable),
        TunnelClient(url, {"X-API-Tunnel-ID": "peer-b", "X-API-Tunnel-Token": "s3cret"},
                     backoff=Backoff(initial=0.05, maximum=0.2)),
    ]
    try:
        for client in clients:
            client.start()
            client.wait_connected(TIMEOUT)
        wait_for(lambda: observer.value(metrics.SESSIONS, clientkey="peer-b", peer="true") == 1)
        wait_for(lambda: server.has_session("foo"))
        with server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
            conn.sendall(b"ping" * 100)
            recv_exactly(conn, 400)
        wait_for(lambda: observer.value(metrics.REMOVE_CONNECTIONS, clientkey="foo", proto="tcp",
                                        addr=echo_server.address) == 1)
        with pytest.raises(DialRefusedError):
            server.dial("foo", "tcp", "127.0.0.1:1", timeout=TIMEOUT)
        with pytest.raises(HandshakeError):
            TunnelClient(url, {}).connect_once()  # no X-Tunnel-ID: 401
        observer.credentials_reloaded(False)
        observer.proxy_refused(403)  # the proxy front end's own test counts real refusals
        end_by_a_failed_write(observer, "gone")
        peer_link_up_and_down(observer, "peer-b")
        # resumption: foo's WebSocket dropped and resumed; a reattach with a bogus token
        session = clients[0].session
        assert isinstance(session, ResumableSession) and session.suspend("test")
        wait_for(lambda: observer.value(metrics.RESUMES, clientkey="foo") == 1)
        bogus = websocket.create_connection(url, header=[
            "X-Tunnel-ID: bar", "X-Remotedialer-Resume: 1", "X-Remotedialer-Resume-Token: bogus",
        ], timeout=TIMEOUT)
        bogus.close()
        assert observer.value(metrics.RESUMES_REFUSED, reason="unknown token") == 1

        response = requests.get(served.url + "/metrics", timeout=TIMEOUT)
        assert response.status_code == 200
    finally:
        for client in clients:
            client.stop(TIMEOUT)
        server.close()
        served.close()
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for spec in METRICS:
        name = spec.exposed_name()
        family = families.get(name) or families.get(name[: -len("_total")])
        assert family is not None and family.samples, f"{name} missing from /metrics"
        for sample in family.samples:
            assert set(sample.labels) == set(spec.labels), (name, sample.labels)
    text = response.text
    assert 'session_server_total_add_websocket_session{clientkey="foo",peer="false"} 1.0' in text
    assert 'session_server_total_add_websocket_session{clientkey="peer-b",peer="true"} 1.0' in text
    assert 'session_server_total_transmit_bytes{clientkey="foo"} 400.0' in text
    assert 'session_server_total_receive_bytes{clientkey="foo"} 400.0' in text
    assert 'remotedialer_sessions{clientkey="foo",peer="false"} 1.0' in text
    assert 'remotedialer_refused_handshakes_total{status="401"} 1.0' in text
    assert 'remotedialer_refused_dials_total{clientkey="foo",reason="target"} 1.0' in text
    assert 'remotedialer_dials_in_flight{clientkey="foo"} 0.0' in text


def test_metrics_from_the_remotedialer_server_command(tmp_path: Path) -> None:
    """``remotedialer server`` (a real process, with a real client process and
    file server) serves every documented metric at /metrics."""
    from testkit.cli import CliStack

    (tmp_path / "small.txt").write_bytes(b"hello, metrics\n")
    stack = CliStack(tmp_path)  # waits until a request through the tunnel works
    try:
        assert stack.http.get(stack.url("/small.txt"), timeout=TIMEOUT).status_code == 200
        response = stack.http.get(f"http://127.0.0.1:{stack.server_port}/metrics", timeout=TIMEOUT)
    finally:
        codes = stack.close()
    assert codes == [0, 0, 0]
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for spec in METRICS:
        name = spec.exposed_name()
        assert name in families or name[: -len("_total")] in families, f"{name} missing from /metrics"
    samples = scrape_text(response.text)
    client_foo = (("clientkey", "foo"), ("peer", "false"))
    assert samples[("session_server_total_add_websocket_session", client_foo)] == 1
    assert samples[("remotedialer_sessions", client_foo)] == 1
    assert samples[("session_server_total_transmit_bytes", (("clientkey", "foo"),))] > 0
    assert samples[("session_server_total_receive_bytes", (("clientkey", "foo"),))] > 0
    assert "process_resident_memory_bytes" in families


def test_access_counters_and_dials_in_flight() -> None:
    """The issue-20 hooks: refused handshakes by status, refused dials by
    reason, reloads by result; the in-flight gauge reads its source per scrape."""
    obs = metrics.PrometheusObserver(CollectorRegistry())
    obs.handshake_refused(401)
    obs.handshake_refused(401)
    obs.handshake_refused(403)
    obs.dial_refused("edge-1", "target")
    obs.credentials_reloaded(True)
    obs.credentials_reloaded(False)
    obs.proxy_refused(407)
    assert obs.value(metrics.PROXY_REFUSED, status="407") == 1
    assert obs.value(metrics.REFUSED_HANDSHAKES, status="401") == 2
    assert obs.value(metrics.REFUSED_HANDSHAKES, status="403") == 1
    assert obs.value(metrics.REFUSED_DIALS, clientkey="edge-1", reason="target") == 1
    assert obs.value(metrics.CREDENTIALS_RELOADS, result="ok") == 1
    assert obs.value(metrics.CREDENTIALS_RELOADS, result="failed") == 1
    assert obs.value(metrics.DIALS_IN_FLIGHT, clientkey="edge-1") == 0
    in_flight = {"edge-1": 3}
    obs.dials_in_flight = lambda: in_flight
    assert obs.value(metrics.DIALS_IN_FLIGHT, clientkey="edge-1") == 3
