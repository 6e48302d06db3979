"""The admin API: see and cut agents without a restart (JSON over HTTP).

Mounted by the example server under ``/admin/`` when its credentials file
names an admin user; every request needs ``Authorization: Bearer <secret>``
of a user with the ``admin`` role (401 without a valid secret, 403 for a
user who is not an admin)::

    GET    /admin/agents          {"agents": [AGENT, ...]}
    GET    /admin/agents/<key>    AGENT                      (404: not known here)
    DELETE /admin/agents/<key>    {"client_key": ..., "disconnected_sessions": N}
    POST   /admin/agents/<key>/disconnect   (the same, for clients without DELETE)

An AGENT is ``{"client_key", "where": "local"|"peer", "sessions": [...],
"peers": [...]}``: ``sessions`` are this server's sessions of the key
(``remote_address``, ``connected_since`` (ISO 8601 UTC), ``connected_seconds``,
``open_connections``, ``bytes_sent``, ``bytes_received``: connection data
sent to / received from the agent), ``peers`` the peer servers that hold it.

A disconnect closes every local session of the key (which sends
REMOVE_CLIENT to the peers). The agent reconnects unless its secret is
removed from the credentials file first (then reload, SIGHUP).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol

from ..errors import AccessDeniedError
from ..server.credentials import UserCredential, bearer_token
from ..server.wsgi import StartResponse, WSGIEnviron
from ..session import Session

__all__ = ["AdminAPI", "AgentDirectory", "RemoteClients", "agent_record", "session_record"]

log = logging.getLogger(__name__)

#: Where the example server mounts the admin API.
PREFIX = "/admin"


class AgentDirectory(Protocol):
    """What the admin API needs from a :class:`~remotedialer.server.Server`."""

    def list_clients(self) -> List[str]:
        """Client keys with a local session."""

    def sessions(self, client_key: str) -> List[Session]:
        """Local sessions of ``client_key``."""

    def disconnect(self, client_key: str, reason: str = ...) -> int:
        """Close every local session of ``client_key``; how many there were."""


def _iso(unix_time: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix_time, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def session_record(session: Session, now: Optional[float] = None) -> Dict[str, Any]:
    """One session as the API shows it."""
    monotonic_now = time.monotonic()
    age = max(0.0, monotonic_now - session.started_at)
    wall_now = time.time() if now is None else now
    return {
        "remote_address": session.transport.describe(),
        "connected_since": _iso(wall_now - age),
        "connected_seconds": round(age, 3),
        "open_connections": session.connection_count(),
        "bytes_sent": session.bytes_sent,
        "bytes_received": session.bytes_received,
    }


RemoteClients = Callable[[], Dict[str, List[str]]]
"""``remote_clients() -> {peer id: [client keys it holds]}`` (e.g.
:meth:`Peering.remote_clients <remotedialer.ha.peering.Peering.remote_clients>`)."""


def _no_peers() -> Dict[str, List[str]]:
    return {}


def agent_record(
    directory: AgentDirectory, client_key: str, remote_clients: RemoteClients = _no_peers
) -> Optional[Dict[str, Any]]:
    """``client_key`` as the API shows it, or ``None`` when neither this
    server nor a peer holds it."""
    sessions = [s for s in directory.sessions(client_key) if not s.closed]
    peers = sorted(peer for peer, keys in remote_clients().items() if client_key in keys)
    if not sessions and not peers:
        return None
    return {
        "client_key": client_key,
        "where": "local" if sessions else "peer",
        "sessions": [session_record(s) for s in sessions],
        "peers": peers,
    }


class AdminAPI:
    """The admin API as a WSGI app (see the module doc).

    ``authorize_admin(secret)`` returns the admin user or raises
    :class:`~remotedialer.errors.AccessDeniedError` (e.g.
    :meth:`CredentialStore.authorize_admin
    <remotedialer.server.credentials.CredentialStore.authorize_admin>`).
    ``remote_clients`` tells which peers hold which keys (none by default).
    """

    def __init__(
        self,
        directory: AgentDirectory,
        authorize_admin: Callable[[Optional[str]], UserCredential],
        remote_clients: RemoteClients = _no_peers,
        prefix: str = PREFIX,
    ) -> None:
        self.directory = directory
        self.authorize_admin = authorize_admin
        self.remote_clients = remote_clients
        self.prefix = prefix

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        remote = f"{environ.get('REMOTE_ADDR', '?')}:{environ.get('REMOTE_PORT', '?')}"
        try:
            user = self.authorize_admin(bearer_token(environ.get("HTTP_AUTHORIZATION")))
        except AccessDeniedError as exc:
            log.warning("refused admin request from %s (user %s): %s", remote, exc.claimed or "?", exc.reason)
            headers = [("WWW-Authenticate", 'Bearer realm="remotedialer admin"')] if exc.status == 401 else []
            return _json(start_response, exc.status, {"error": exc.reason}, headers)
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.prefix + "/"):
            return _json(start_response, 404, {"error": "not found"})
        parts = [urllib.parse.unquote(p) for p in path[len(self.prefix) + 1:].split("/")]
        if parts == ["agents"]:
            if method != "GET":
                return _json(start_response, 405, {"error": "use GET"}, [("Allow", "GET")])
            return _json(start_response, 200, {"agents": self._all_agents()})
        if len(parts) in (2, 3) and parts[0] == "agents" and parts[1]:
            key = parts[1]
            if len(parts) == 3:
                if parts[2] != "disconnect":
                    return _json(start_response, 404, {"error": "not found"})
                if method != "POST":
                    return _json(start_response, 405, {"error": "use POST"}, [("Allow", "POST")])
                return self._disconnect(start_response, key, user, remote)
            if method == "DELETE":
                return self._disconnect(start_response, key, user, remote)
            if method != "GET":
                return _json(start_response, 405, {"error": "use GET or DELETE"}, [("Allow", "GET, DELETE")])
            record = agent_record(self.directory, key, self.remote_clients)
            if record is None:
                return _json(start_response, 404, {"error": f"no agent {key!r}"})
            return _json(start_response, 200, record)
        return _json(start_response, 404, {"error": "not found"})

    def _all_agents(self) -> List[Dict[str, Any]]:
        remote = self.remote_clients()
        keys = set(self.directory.list_clients()).union(*remote.values())
        records = (agent_record(self.directory, key, lambda: remote) for key in sorted(keys))
        return [record for record in records if record is not None]

    def _disconnect(
        self, start_response: StartResponse, key: str, user: UserCredential, remote: str
    ) -> Iterable[bytes]:
        closed = self.directory.disconnect(key, f"disconnected by admin {user.name}")
        log.warning("admin %s (from %s) disconnected %s: %d sessions", user.name, remote, key, closed)
        if not closed:
            return _json(start_response, 404, {"error": f"no local session of {key!r}"})
        return _json(start_response, 200, {"client_key": key, "disconnected_sessions": closed})


_REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}


def _json(
    start_response: StartResponse, status: int, body: Any, headers: Optional[List[Any]] = None
) -> Iterable[bytes]:
    data = json.dumps(body, sort_keys=True).encode() + b"\n"
    start_response(f"{status} {_REASONS.get(status, '')}".rstrip(), [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *(headers or []),
    ])
    return [data]
