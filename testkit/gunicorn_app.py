"""A tiny WSGI application for the gunicorn end-to-end tests
(``gunicorn -k gthread testkit.gunicorn_app:app``).

* ``/connect``: the tunnel endpoint (any non-empty ``X-Tunnel-ID`` is the key;
  clients may dial back to loopback targets);
* ``POST /echo?key=K&address=HOST:PORT``: dials ``address`` through client
  ``K``, sends the request body, and answers with as many bytes read back;
* ``/clients``: the connected client keys, one a line;
* ``/kick?key=K``: ends the sessions of ``K`` from the server side;
* ``/parked``: how many tunnels the process's poller holds (with
  ``TESTKIT_PARK_IDLE=1`` in the environment, idle tunnels park, see
  :mod:`remotedialer.poller`);
* ``/readers``: how many threads read for a tunnel now (a parked one has none).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, List, Tuple
from urllib.parse import parse_qs

from remotedialer import poller
from remotedialer.config import Limits
from remotedialer.server import Server
from testkit.support import server_readers


def _authorizer(request: Any) -> Tuple[str, bool]:
    key = request.headers.get("X-Tunnel-ID", "")
    return key, bool(key)


server = Server(
    _authorizer, client_connect_authorizer=lambda proto, address: address.startswith("127.0.0.1:"),
    limits=Limits(park_idle=os.environ.get("TESTKIT_PARK_IDLE") == "1"),
)


def _text(start_response: Callable[..., Any], status: str, text: str) -> List[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _echo(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    size = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(size)
    try:
        conn = server.dial(query["key"][0], "tcp", query["address"][0], timeout=10)
    except OSError as exc:
        return _text(start_response, "500 Internal Server Error", str(exc))
    with conn:
        sender = threading.Thread(target=conn.sendall, args=(body,), daemon=True)
        sender.start()
        received = bytearray()
        while len(received) < size:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        sender.join(10)
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(received)))])
    return [bytes(received)]


def app(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/connect":
        return server(environ, start_response)
    if path == "/echo":
        return _echo(environ, start_response)
    if path == "/clients":
        return _text(start_response, "200 OK", "".join(f"{key}\n" for key in server.list_clients()))
    if path == "/parked":
        return _text(start_response, "200 OK", str(len(poller.default())))
    if path == "/readers":
        return _text(start_response, "200 OK", str(server_readers()))
    if path == "/kick":
        key = parse_qs(environ.get("QUERY_STRING", ""))["key"][0]
        for session in server.sessions(key):
            session.close("kicked")
        return _text(start_response, "200 OK", "kicked")
    return _text(start_response, "404 Not Found", "not found")
