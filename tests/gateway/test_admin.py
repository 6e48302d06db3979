"""remotedialer.gateway.admin: the admin API over a directory of real sessions."""

from __future__ import annotations

import logging
from typing import Callable, Dict, List

import pytest
from werkzeug.test import Client

from remotedialer.gateway.admin import AdminAPI
from remotedialer.server.credentials import Credentials, hash_secret, new_secret
from remotedialer.session import Session

from testkit.support import SessionPair, recv_exactly

OPS = new_secret()
ALICE = new_secret()
CREDS = Credentials.parse(f"user ops {hash_secret(OPS)} - admin\nuser alice {hash_secret(ALICE)} *\n")


class Directory:
    def __init__(self) -> None:
        self.table: Dict[str, List[Session]] = {}

    def list_clients(self) -> List[str]:
        return sorted(self.table)

    def sessions(self, client_key: str) -> List[Session]:
        return list(self.table.get(client_key, ()))

    def disconnect(self, client_key: str, reason: str = "disconnected") -> int:
        sessions = self.table.pop(client_key, [])
        for session in sessions:
            session.close(reason)
        return len(sessions)


@pytest.fixture
def api(session_pair_factory: Callable[..., SessionPair]) -> tuple:
    from testkit.support import AcceptingHandler

    handler = AcceptingHandler()
    pair = session_pair_factory(connect_handler=handler)
    directory = Directory()
    directory.table["edge-1"] = [pair.server]
    admin = AdminAPI(directory, CREDS.authorize_admin, lambda: {"peer-b": ["db-1", "edge-1"]})
    return Client(admin), directory, pair, handler


def auth(secret: str) -> Dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_needs_an_admin_secret(api: tuple, caplog: pytest.LogCaptureFixture) -> None:
    client = api[0]
    with caplog.at_level(logging.WARNING):
        missing = client.get("/admin/agents")
        wrong = client.get("/admin/agents", headers=auth(new_secret()))
        not_admin = client.get("/admin/agents", headers=auth(ALICE))
    assert missing.status_code == 401 and "Bearer" in missing.headers["WWW-Authenticate"]
    assert wrong.status_code == 401 and not_admin.status_code == 403
    assert not_admin.json == {"error": "user 'alice' is not an admin"}
    assert ALICE not in caplog.text and "refused admin request from" in caplog.text


def test_lists_and_shows_agents_with_traffic(api: tuple) -> None:
    client, _directory, pair, handler = api
    conn = pair.server.dial("tcp", "127.0.0.1:9", 5)
    far = handler.next()
    conn.sendall(b"abc")
    assert recv_exactly(far, 3) == b"abc"
    far.sendall(b"hello")
    assert recv_exactly(conn, 5) == b"hello"
    listing = client.get("/admin/agents", headers=auth(OPS))
    assert listing.status_code == 200 and listing.headers["Content-Type"] == "application/json"
    agents = {a["client_key"]: a for a in listing.json["agents"]}
    assert set(agents) == {"db-1", "edge-1"}
    assert agents["db-1"] == {"client_key": "db-1", "where": "peer", "sessions": [], "peers": ["peer-b"]}
    edge = agents["edge-1"]
    assert (edge["where"], edge["peers"]) == ("local", ["peer-b"])
    (session,) = edge["sessions"]
    assert session["open_connections"] == 1
    assert (session["bytes_sent"], session["bytes_received"]) == (3, 5)
    assert session["remote_address"] and session["connected_since"].endswith("Z")
    shown = client.get("/admin/agents/edge-1", headers=auth(OPS))
    assert shown.json["sessions"][0]["bytes_sent"] == 3
    assert client.get("/admin/agents/nobody", headers=auth(OPS)).status_code == 404
    conn.close()


def test_disconnect_by_delete_or_post(api: tuple) -> None:
    client, directory, pair, _handler = api
    assert client.put("/admin/agents/edge-1", headers=auth(OPS)).status_code == 405
    assert client.post("/admin/agents", headers=auth(OPS)).status_code == 405
    assert client.get("/admin/agents/edge-1/disconnect", headers=auth(OPS)).status_code == 405
    gone = client.delete("/admin/agents/edge-1", headers=auth(OPS))
    assert gone.status_code == 200 and gone.json == {"client_key": "edge-1", "disconnected_sessions": 1}
    assert pair.server.wait_closed(5) and pair.server.close_reason == "disconnected by admin ops"
    assert client.post("/admin/agents/edge-1/disconnect", headers=auth(OPS)).status_code == 404
    directory.table["x y"] = []
    assert client.get("/admin/agents/x%20y", headers=auth(OPS)).status_code == 404
    assert client.get("/admin/other", headers=auth(OPS)).status_code == 404
    assert client.get("/admin/agents/edge-1/other", headers=auth(OPS)).status_code == 404
