"""The example server's assembly (:mod:`remotedialer.app`): the example
authorizer, routing, the app factory and peering from settings."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from remotedialer.app import ServerApp, make_app, tunnel_id_authorizer, wire_peers
from remotedialer.ha.peering import parse_peers

# ------------------------------------------------------ the example server


def _request(**kwargs: Any) -> Request:
    return Request(EnvironBuilder(**kwargs).get_environ())


def test_tunnel_id_authorizer() -> None:
    assert tunnel_id_authorizer(_request(headers={"X-Tunnel-ID": "foo"})) == ("foo", True)
    assert tunnel_id_authorizer(_request(headers={"x-tunnel-id": "bar"})) == ("bar", True)
    assert tunnel_id_authorizer(_request()) == ("", False)
    assert tunnel_id_authorizer(_request(headers={"X-Tunnel-ID": ""})) == ("", False)


def _call(app: Callable[..., Iterable[bytes]], path: str) -> str:
    statuses: List[str] = []
    body = b"".join(app(EnvironBuilder(path=path).get_environ(),
                        lambda status, headers: statuses.append(status)))
    return f"{statuses[0]} {body.decode()}"


def test_server_app_routes() -> None:
    def named(name: str) -> Callable[..., Iterable[bytes]]:
        def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            start_response("200 OK", [])
            return [name.encode()]
        return app

    class FakeForwarder:
        prefix = "/client"
        __call__ = staticmethod(named("forwarder"))

    app = ServerApp(named("connect"), FakeForwarder())  # type: ignore[arg-type]
    app.mount("/metrics", named("metrics"))
    assert _call(app, "/connect") == "200 OK connect"
    assert _call(app, "/client/foo/http/h:1/x") == "200 OK forwarder"
    assert _call(app, "/metrics") == "200 OK metrics"
    assert _call(app, "/metrics/more").startswith("404")
    assert _call(app, "/clientele").startswith("404")
    assert _call(app, "/").startswith("404")


def test_make_app_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTEDIALER_ID", "a")
    monkeypatch.setenv("REMOTEDIALER_TOKEN", "s3cret")
    monkeypatch.setenv("REMOTEDIALER_TIMEOUT", "7.5")
    monkeypatch.setenv("REMOTEDIALER_ALLOW_CLIENT_CONNECT", "true")
    monkeypatch.delenv("REMOTEDIALER_PEERS", raising=False)
    app = make_app()
    try:
        assert (app.server.peer_id, app.server.peer_token) == ("a", "s3cret")
        assert app.forwarder.default_timeout == 7.5
        assert app.server.client_connect_authorizer("tcp", "10.0.0.1:22") is True
    finally:
        app.close()
    explicit = make_app(peer_id="b", peer_token="t", timeout=3, allow_client_connect=False)
    try:
        assert (explicit.server.peer_id, explicit.server.peer_token) == ("b", "t")
        assert explicit.forwarder.default_timeout == 3
        assert explicit.server.client_connect_authorizer is None
    finally:
        explicit.close()


def test_make_app_rejects_malformed_peers() -> None:
    with pytest.raises(ValueError):
        make_app(peers="just-an-id")


def test_wire_peers_calls_add_peer() -> None:
    calls: List[Any] = []

    class WithPeering:
        def add_peer(self, url: str, peer_id: str, token: str) -> None:
            calls.append((url, peer_id, token))

    wire_peers(WithPeering(), parse_peers("b:t:ws://b:1/connect,c:t:ws://c:1/connect"))
    assert calls == [("ws://b:1/connect", "b", "t"), ("ws://c:1/connect", "c", "t")]
