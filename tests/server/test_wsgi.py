"""remotedialer.server.wsgi: header tokens and plain-text WSGI responses."""

from __future__ import annotations

from typing import Any, List, Tuple

from werkzeug.test import Client
from werkzeug.wrappers import Response

from remotedialer.server.wsgi import header_tokens, plain_text_response


def test_header_tokens() -> None:
    assert header_tokens("keep-alive, Upgrade") == ["keep-alive", "upgrade"]
    assert header_tokens(" Close ") == ["close"]
    assert header_tokens(",, a ,,b,") == ["a", "b"]
    assert header_tokens("") == []
    assert "close" not in header_tokens("closed, x-close-me")


def test_plain_text_response() -> None:
    started: List[Tuple[str, Any]] = []
    body = plain_text_response(lambda status, headers: started.append((status, headers)), 429, "slow down é")
    assert body == ["slow down é".encode("utf-8")]
    assert started == [("429 Too Many Requests", [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body[0]))),
    ])]


def test_plain_text_response_served_by_werkzeug() -> None:
    def app(environ: Any, start_response: Any) -> List[bytes]:
        return plain_text_response(start_response, 599, "odd\udcff")

    response = Client(app, Response).get("/")
    assert response.status == "599 Error"
    assert response.data == b"odd?"
    assert response.headers["Content-Length"] == "4"
