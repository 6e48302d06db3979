"""Small HTTP and WSGI pieces shared by the server, the forwarder, the
metrics endpoint and the example server: the WSGI type aliases, reading
comma-separated header tokens (``Connection``, ``Upgrade``; defined beside
the WebSocket handshake that reads them, :mod:`remotedialer.transports.wsgi`)
and answering a WSGI request with a plain-text body."""

from __future__ import annotations

import http
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

from ..transports.wsgi import header_tokens

__all__ = ["WSGIEnviron", "StartResponse", "WSGIApp", "header_tokens", "plain_text_response"]

WSGIEnviron = Dict[str, Any]
"""The ``environ`` of a WSGI call."""
StartResponse = Callable[..., Any]
"""The ``start_response`` of a WSGI call."""
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
"""A WSGI application."""


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
