"""A real Flask application serving the tunnel endpoint, as docs/flask.rst
shows: the Server mounted with werkzeug's DispatcherMiddleware beside the
Flask app, under werkzeug's threaded server; and what a tunnel client logs
when the endpoint is a plain Flask route, or not mounted at all."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import BaseWSGIServer, make_server

from remotedialer.client import Backoff, TunnelClient
from remotedialer.errors import HandshakeError
from remotedialer.server import Server
from testkit.support import TIMEOUT, EchoServer, recv_exactly, tunnel_id_authorizer, wait_for


def serve(app: Any) -> Tuple[BaseWSGIServer, threading.Thread]:
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture
def running() -> Iterator[Callable[[Any], str]]:
    """Serve a WSGI app on a loopback port; returns its base URL (ws://)."""
    started: List[Tuple[BaseWSGIServer, threading.Thread]] = []

    def start(app: Any) -> str:
        httpd, thread = serve(app)
        started.append((httpd, thread))
        return f"ws://127.0.0.1:{httpd.server_port}"

    yield start
    for httpd, thread in started:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def flask_app() -> Flask:
    app = Flask("tunnel-test")

    @app.route("/healthz")
    def healthz() -> str:
        return "ok"

    return app


def test_dispatcher_middleware_serves_the_endpoint_beside_flask(
    running: Callable[[Any], str], echo_server: EchoServer
) -> None:
    app = flask_app()
    tunnel = Server(tunnel_id_authorizer)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/connect": tunnel})  # type: ignore[method-assign]
    base = running(app)
    client = TunnelClient(f"{base}/connect", {"X-Tunnel-ID": "agent-1"}, lambda proto, address: True)
    client.start()
    try:
        client.wait_connected(TIMEOUT)
        wait_for(lambda: tunnel.has_session("agent-1"))
        with tunnel.dial("agent-1", "tcp", echo_server.address, timeout=TIMEOUT) as conn:
            conn.sendall(b"through flask")
            assert recv_exactly(conn, 13) == b"through flask"
        # the Flask app's own routes still work
        assert app.test_client().get("/healthz").data == b"ok"
    finally:
        client.stop(TIMEOUT)
        tunnel.close("test over")


@pytest.mark.parametrize("mount", ["plain-route", "not-mounted"])
def test_refused_upgrade_is_one_log_line_with_a_hint(
    running: Callable[[Any], str], caplog: pytest.LogCaptureFixture, mount: str
) -> None:
    """A plain ``@app.route("/connect")`` (no ``websocket=True``): werkzeug
    answers the upgrade with its HTML 400 page before the view runs. No
    route: 404. Either way the client logs one line per attempt: status,
    reason, the start of the body on one line, and a hint."""
    app = flask_app()
    tunnel = Server(tunnel_id_authorizer)
    if mount == "plain-route":
        app.add_url_rule("/connect", "connect", lambda: tunnel)  # type: ignore[arg-type,return-value]
    base = running(app)
    caplog.set_level(logging.WARNING, logger="remotedialer.client")
    client = TunnelClient(
        f"{base}/connect", {"X-Tunnel-ID": "agent-1"}, lambda proto, address: True,
        backoff=Backoff(initial=0.05, maximum=0.05),
    )
    client.start()
    try:
        wait_for(lambda: len(caplog.records) >= 2)
    finally:
        client.stop(TIMEOUT)
        tunnel.close("test over")
    status = 400 if mount == "plain-route" else 404
    error = client.last_error
    assert isinstance(error, HandshakeError) and error.status == status
    assert error.reason.upper() == ("BAD REQUEST" if status == 400 else "NOT FOUND")
    lines = [record.getMessage() for record in caplog.records]
    for line in lines:
        assert "\n" not in line
        assert line.startswith(f"failed to connect to {base}/connect: handshake refused: HTTP {status} ")
        if status == 400:  # the route is there but does not upgrade
            assert "WebSocket upgrades allowed?" in line
        else:  # nothing at that path: the hint is about the path, not Flask
            assert "the server's tunnel endpoint? " in line and " at /connect " in line
            assert "Flask" not in line
        assert "[Errno" not in line
    preview = " ".join(error.body.split())[:200]
    assert preview and preview in lines[0]
    assert len(lines[0]) < 600
