"""Health endpoints and graceful shutdown, with the example server's app under
the real werkzeug server on loopback, real tunnel clients and a real peer."""

from __future__ import annotations

import socket
import threading
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import requests
import websocket

from remotedialer.app import ServerApp, make_app
from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from remotedialer.client import Backoff, TunnelClient, connect_to_proxy
from remotedialer.errors import HandshakeError
from remotedialer.ha.lifecycle import GracefulShutdown, is_gunicorn_worker
from remotedialer.server import Server
from remotedialer.session import Session

from testkit.support import TIMEOUT, EchoServer, TunnelServer, allow_all, recv_exactly, wait_for

TOKEN = "lifecycle-token"
FAST = Backoff(initial=0.05, maximum=0.2)


class Instance:
    """One example-server instance on a free loopback port."""

    def __init__(self) -> None:
        self.httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, None)  # type: ignore[arg-type]
        self.port = self.httpd.port
        self.url = f"ws://127.0.0.1:{self.port}/connect"
        self.app: Optional[ServerApp] = None
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def start(self, **options: Any) -> ServerApp:
        self.app = make_app(handle_sigterm=False, **options)
        self.httpd.app = self.app
        self.thread.start()
        return self.app

    @property
    def shutdown(self) -> GracefulShutdown:
        assert self.app is not None and self.app.shutdown is not None
        return self.app.shutdown

    def get(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.port}{path}", timeout=TIMEOUT)

    def close(self) -> None:
        if self.app is not None:
            self.app.close()
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def instances() -> Iterator[List[Instance]]:
    made = [Instance(), Instance()]
    yield made
    for instance in made:
        instance.close()


class RecordingClient:
    """A tunnel client that remembers each session it had."""

    def __init__(self, url: str, key: str) -> None:
        self.sessions: List[Session] = []
        self.connected = threading.Event()
        self.client = TunnelClient(url, {"X-Tunnel-ID": key}, allow_all, self._on_connect, backoff=FAST)

    def _on_connect(self, session: Session) -> None:
        self.sessions.append(session)
        self.connected.set()

    def __enter__(self) -> "RecordingClient":
        self.client.start()
        assert self.connected.wait(TIMEOUT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.stop(TIMEOUT)


def test_healthz_and_readyz(instances: List[Instance]) -> None:
    instance = instances[0]
    instance.start()
    assert (instance.get("/healthz").status_code, instance.get("/healthz").text) == (200, "ok\n")
    ready = instance.get("/readyz")
    assert (ready.status_code, ready.text) == (200, "ok\n")
    verbose = instance.get("/readyz?verbose").text
    assert "[+]shutdown serving\n" in verbose and "[+]peer-links 0/0 up" in verbose
    assert ready.headers["Cache-Control"] == "no-store"


def peer_with_each_other(a: Instance, b: Instance, drain: float) -> None:
    for (me, name), (other, other_name) in (((a, "a"), (b, "b")), ((b, "b"), (a, "a"))):
        me.start(peer_id=name, peer_token=TOKEN, peers=f"{other_name}:{TOKEN}:{other.url}",
                 drain_seconds=drain)


def test_shutdown_drains_then_closes_tunnels_and_tells_peers(
    instances: List[Instance], echo_server: EchoServer
) -> None:
    a, b = instances
    peer_with_each_other(a, b, drain=3.0)  # long enough for the checks below on a loaded machine
    assert b.app is not None
    peering = b.app.server.peering
    announced: List[Tuple[bool, str]] = []
    record = peering.on_client_change

    def recording(session: Session, added: bool, client_key: str, session_key: int) -> None:
        if not session.closed:
            announced.append((added, client_key))
        record(session, added, client_key, session_key)

    peering.on_client_change = recording  # type: ignore[method-assign]
    with RecordingClient(a.url, "foo") as foo:
        wait_for(lambda: peering.remote_clients() == {"a": ["foo"]}, TIMEOUT)
        a.shutdown.begin()
        # Readiness fails first, new client tunnels are refused...
        assert a.get("/readyz").status_code == 503
        with pytest.raises(HandshakeError) as refused:
            connect_to_proxy(a.url, {"X-Tunnel-ID": "bar"})
        assert (refused.value.status, refused.value.body) == (503, "server shutting down")
        # ...a peer may still link (a new instance learns our clients)...
        ws = websocket.create_connection(a.url, timeout=TIMEOUT, header=[
            "X-API-Tunnel-ID: b", f"X-API-Tunnel-Token: {TOKEN}"])
        ws.close()
        # ...and the existing tunnel still carries dials, also from the peer.
        with b.app.server.dial("foo", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
            conn.sendall(b"still here")
            assert recv_exactly(conn, 10) == b"still here"
        assert a.shutdown.state == "draining"

        assert a.shutdown.wait(TIMEOUT)
        first = foo.sessions[0]
        wait_for(lambda: first.closed)
        assert first.close_reason == "websocket closed by the server"  # a close frame, not a read deadline
        assert a.app is not None and len(a.app.server.session_manager) == 0
        # REMOVE_CLIENT came on the still-open link (b reads it in its own time)
        wait_for(lambda: (False, "foo") in announced)
        wait_for(lambda: peering.remote_clients() == {})  # then a's link to b closed
        # The client retries (at once, with jitter) and is refused while a stays down.
        wait_for(lambda: isinstance(foo.client.last_error, HandshakeError), TIMEOUT)


def test_second_request_skips_the_drain(instances: List[Instance]) -> None:
    instance = instances[0]
    instance.start(drain_seconds=60)
    with RecordingClient(instance.url, "foo"):
        assert instance.shutdown.begin()
        assert not instance.shutdown.wait(0.2)
        assert not instance.shutdown.begin()  # e.g. a second SIGTERM
        assert instance.shutdown.wait(TIMEOUT)
        assert instance.shutdown.state == "stopped"


def test_gunicorn_workers_are_recognised() -> None:
    from gunicorn.workers.gthread import ThreadWorker

    worker = ThreadWorker.__new__(ThreadWorker)
    assert is_gunicorn_worker(worker.handle_exit)

    class OwnWorker(ThreadWorker):  # a worker class of another package (ours)
        pass

    own = OwnWorker.__new__(OwnWorker)
    assert is_gunicorn_worker(own.handle_exit)
    assert not is_gunicorn_worker(print)
    assert not is_gunicorn_worker(None)


def test_a_new_instance_is_ready_once_its_peers_linked_with_it(instances: List[Instance]) -> None:
    """With discovery, readiness waits until every listed peer is linked both
    ways; a listed peer that never answers keeps it out only until the join
    timeout."""
    from remotedialer.ha.discovery import DnsPeerDiscovery, Endpoint

    a, b = instances
    dead_port = b.port  # b listens but never runs a server: its peer link never comes up
    server = Server(lambda request: ("", False), peer_id="127.0.0.1:1", peer_token=TOKEN)
    try:
        discovery = DnsPeerDiscovery(server, "peers.test", 8123, refresh=60,
                                     lookup=lambda name, port: [Endpoint("127.0.0.1", dead_port)])
        shutdown = GracefulShutdown(server, discovery=discovery, join_timeout=0.5)
        assert dict((name, (ok, detail)) for name, ok, detail in shutdown.checks())["joined"] == (
            False, "no peer lookup yet")
        discovery.start()
        wait_for(lambda: discovery.last_success > 0)
        joined = {name: (ok, detail) for name, ok, detail in shutdown.checks()}["joined"]
        assert joined == (False, f"waiting for 127.0.0.1:{dead_port}")
        assert not shutdown.ready()
        wait_for(shutdown.ready, TIMEOUT)
        details = {name: detail for name, _ok, detail in shutdown.checks()}
        assert "gave up waiting for peers" in details["joined"]
    finally:
        discovery.stop()
        server.close()


def test_a_new_instance_gives_its_peers_time_to_announce_their_clients() -> None:
    """Once every peer is linked both ways, readiness waits ``join_settle``
    more: the peers announce their clients over their links to us right
    after those open, with no end marker."""
    from remotedialer.ha.discovery import DnsPeerDiscovery, Endpoint

    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    me = TunnelServer(peer_id="127.0.0.1:1", peer_token=TOKEN)
    peer = TunnelServer(port=port, peer_id="127.0.0.1", peer_token=TOKEN)  # A records: id = IP
    discovery = DnsPeerDiscovery(me.server, "peers.test", port, refresh=60, token=TOKEN,
                                 lookup=lambda name, _port: [Endpoint("127.0.0.1", port)])
    waiting = GracefulShutdown(me.server, discovery=discovery, join_timeout=120, join_settle=60)
    settled = GracefulShutdown(me.server, discovery=discovery, join_timeout=120, join_settle=0)

    def joined(shutdown: GracefulShutdown) -> Tuple[bool, str]:
        return {name: (ok, detail) for name, ok, detail in shutdown.checks()}["joined"]

    try:
        discovery.start()  # we accept the peer and link to it
        wait_for(lambda: discovery.last_success > 0)
        peer.server.add_peer(me.url, "127.0.0.1:1", TOKEN)  # the peer's link to us
        wait_for(lambda: joined(settled)[0])  # linked both ways
        assert joined(waiting) == (False, "reading the peers' client lists")
        assert not waiting.ready()
    finally:
        discovery.stop()
        peer.close()
        me.close()
