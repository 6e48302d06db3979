"""Loopback helpers for the gateway's tests (front end and upstream client).

* :class:`RawTarget`: an :class:`~remotedialer.gateway.upstream.UpstreamConnection`
  over one end of a socket pair, the test playing the target on the other;
* :func:`keepalive_app` and :func:`serve_keepalive`: a
  :class:`~remotedialer.gateway.frontend.BoundedThreadedWSGIServer` with a
  small app that shows what the front end parsed;
* :func:`raw_exchange` and :func:`read_to_close`: raw bytes to a server and
  its answer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Callable, Dict, Iterable, Iterator

from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from remotedialer.gateway.upstream import UpstreamConnection

from .support import TIMEOUT

__all__ = ["RawTarget", "keepalive_app", "serve_keepalive", "raw_exchange", "read_to_close"]


class RawTarget:
    """An :class:`UpstreamConnection` over one end of a socket pair; the test
    plays the target on the other end."""

    def __init__(self) -> None:
        ours, self.far = socket.socketpair()
        ours.settimeout(TIMEOUT)
        self.far.settimeout(TIMEOUT)
        self.connection = UpstreamConnection(ours, "target")

    def answer(self, data: bytes, close: bool = False) -> None:
        self.far.sendall(data)
        if close:
            self.far.shutdown(socket.SHUT_WR)

    def received(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = self.far.recv(size - len(data))
            assert more, f"closed after {data!r}"
            data += more
        return data

    def body(self, method: str = "GET", limit: int = 1 << 20) -> Any:
        response = self.connection.getresponse(method)
        parts = []
        while True:
            data = response.read1(limit)
            if not data:
                return response, b"".join(parts), parts
            parts.append(data)

    def close(self) -> None:
        self.connection.close()
        self.far.close()


def keepalive_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/chunked``, ``/short``, ``/fail``, ``/body`` (echoes the request
    body), ``/env`` (what the front end parsed); any other path answers
    ``METHOD PATH`` without reading the request body."""
    path = environ["PATH_INFO"]
    if path == "/chunked":  # no Content-Length: chunked on HTTP/1.1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ab", b"", b"cde"]
    if path == "/short":  # promises more than it sends: the connection must close
        start_response("200 OK", [("Content-Length", "10")])
        return [b"abc"]
    if path == "/fail":
        raise RuntimeError("failure under test")
    if path == "/body":  # reads the request body and answers with it
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return [data]
    if path == "/env":  # what the front end parsed
        names = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "HTTP_X_A", "HTTP_X_B")
        body = "|".join(str(environ.get(name)) for name in names).encode("latin-1")
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    body = f"{environ['REQUEST_METHOD']} {path}".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]  # never reads the request body


@contextlib.contextmanager
def serve_keepalive() -> Iterator[BoundedThreadedWSGIServer]:
    """:func:`keepalive_app` on a keep-alive front end (60 s idle timeout),
    on a free loopback port while the block runs."""
    server = BoundedThreadedWSGIServer("127.0.0.1", 0, keepalive_app, max_threads=8, keepalive_timeout=60.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer to the server's close (or the
    first response, for a kept connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            assert line, f"closed after {head!r}"
            head += line
        length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        return head + (reader.read(int(length[0].split(b":")[1])) if length else b"")


def read_to_close(port: int, request: bytes) -> bytes:
    """Send ``request`` and read everything the server sends until it closes
    (a socket timeout fails the test if it never does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)  # times out (failing the test) unless the server closes
            if not chunk:
                return data
            data += chunk
