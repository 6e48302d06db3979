"""Small HTTP and WSGI pieces shared by the server, the forwarder, the
metrics endpoint and the example server: the WSGI type aliases, reading
comma-separated header tokens (``Connection``, ``Upgrade``; defined beside
the WebSocket handshake that reads them, :mod:`remotedialer.transports.wsgi`)
and answering a WSGI request with a plain-text body."""

from __future__ import annotations

import http
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..transports.wsgi import TAKEN_SOCKET, header_tokens

__all__ = [
    "WSGIEnviron", "StartResponse", "WSGIApp", "Handshake", "TAKEN_SOCKET", "header_tokens",
    "plain_text_response",
]

WSGIEnviron = Dict[str, Any]
"""The ``environ`` of a WSGI call."""
StartResponse = Callable[..., Any]
"""The ``start_response`` of a WSGI call."""
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
"""A WSGI application."""


class Handshake(NamedTuple):
    """What an app's ``handshake(environ, start_response)`` did with an
    upgrade request read by the front end itself (no WSGI call, no request
    thread): ``serve`` is set when a tunnel is up (the front end runs it on
    a thread of its own; it blocks until the tunnel ends and leaves the
    socket shut down); otherwise the request was answered through
    ``start_response`` and ``body`` is the answer's body."""

    body: Iterable[bytes]
    serve: Optional[Callable[[], None]]


def plain_text_response(
    start_response: StartResponse, status: int, text: str, headers: Sequence[Tuple[str, str]] = ()
) -> List[bytes]:
    """Start a WSGI response ``status`` whose body is ``text`` (UTF-8 plain
    text, with its length, then ``headers``) and return the body to hand back
    to the server."""
    body = text.encode("utf-8", "replace")
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    start_response(
        f"{status} {reason}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]
