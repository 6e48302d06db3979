"""remotedialer.gateway.user_auth: the user check in front of /client/."""

from __future__ import annotations

import base64
import logging
from typing import Any, Dict, Iterable, List

import pytest
from werkzeug.test import Client

from remotedialer.gateway.user_auth import UserGuard, client_key_from_path, user_secret
from remotedialer.server.credentials import Credentials, hash_secret, new_secret

ALICE = new_secret()
CREDS = Credentials.parse(f"user alice {hash_secret(ALICE)} edge-*\n")


def basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def test_user_secret_prefers_proxy_authorization() -> None:
    assert user_secret({"HTTP_AUTHORIZATION": "Bearer a"}) == ("HTTP_AUTHORIZATION", "a")
    assert user_secret({"HTTP_AUTHORIZATION": "Bearer a", "HTTP_PROXY_AUTHORIZATION": basic("x", "b")}) == (
        "HTTP_PROXY_AUTHORIZATION", "b")
    assert user_secret({}) == (None, None)
    assert user_secret({"HTTP_AUTHORIZATION": "Digest x"}) == ("HTTP_AUTHORIZATION", None)


def test_client_key_from_path() -> None:
    key_of = client_key_from_path("/client")
    assert key_of({"PATH_INFO": "/client/edge-1/http/127.0.0.1:80/x"}) == "edge-1"
    assert key_of({"PATH_INFO": "/other"}) == ""


@pytest.fixture
def guarded() -> tuple:
    seen: List[Dict[str, Any]] = []

    def app(environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(dict(environ))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return Client(UserGuard(app, CREDS, client_key_from_path("/client"))), seen


def test_allowed_user_passes_and_the_secret_does_not(guarded: tuple) -> None:
    client, seen = guarded
    response = client.get("/client/edge-1/http/x/", headers={"Authorization": basic("alice", ALICE)})
    assert response.status_code == 200
    assert "HTTP_AUTHORIZATION" not in seen[0] and seen[0]["remotedialer.user"] == "alice"
    response = client.get("/client/edge-1/http/x/", headers={
        "Proxy-Authorization": f"Bearer {ALICE}", "Authorization": "Bearer for-the-target"})
    assert response.status_code == 200
    assert "HTTP_PROXY_AUTHORIZATION" not in seen[1]
    assert seen[1]["HTTP_AUTHORIZATION"] == "Bearer for-the-target"


def test_refusals(guarded: tuple, caplog: pytest.LogCaptureFixture) -> None:
    client, seen = guarded
    with caplog.at_level(logging.WARNING):
        missing = client.get("/client/edge-1/http/x/")
        wrong = client.get("/client/edge-1/http/x/", headers={"Authorization": basic("alice", new_secret())})
        other = client.get("/client/db-1/http/x/", headers={"Authorization": basic("alice", ALICE)})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Basic realm="remotedialer"'
    assert wrong.status_code == 401 and other.status_code == 403
    assert not seen
    assert "refused user request for agent 'db-1' from" in caplog.text and ALICE not in caplog.text
