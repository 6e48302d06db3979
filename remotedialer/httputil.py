"""Small HTTP and WSGI pieces shared by the server, the forwarder, the
metrics endpoint and the example server: the WSGI type aliases, reading
comma-separated header tokens (``Connection``, ``Upgrade``) and answering a
WSGI request with a plain-text body."""

from __future__ import annotations

import http
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

__all__ = ["WSGIEnviron", "StartResponse", "WSGIApp", "header_tokens", "plain_text_response"]

WSGIEnviron = Dict[str, Any]
"""The ``environ`` of a WSGI call."""
StartResponse = Callable[..., Any]
"""The ``start_response`` of a WSGI call."""
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
"""A WSGI application."""


def header_tokens(value: str) -> List[str]:
    """The lower-cased tokens of a comma-separated header value such as
    ``Connection: keep-alive, Upgrade`` (empty items dropped). Join repeated
    headers with ``","`` first."""
    return [token for token in (item.strip().lower() for item in value.split(",")) if token]


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
