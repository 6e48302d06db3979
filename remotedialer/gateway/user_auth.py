"""User authentication for the HTTP ways in (the ``/client/`` route).

:class:`UserGuard` wraps a WSGI app whose requests address an agent (a
client key): each request needs the secret of a user allowed to reach that
agent (a ``user`` line of the credentials file, see
:mod:`remotedialer.server.credentials`). The secret comes in
``Proxy-Authorization`` or, failing that, ``Authorization``, as ``Basic``
(any user name; the password is the secret, so ``curl -u alice:SECRET``
works) or ``Bearer``. The header used is removed before the request goes on,
so the target behind the agent never sees the secret; the user's name is
left in ``environ["remotedialer.user"]``.

A missing, unknown or expired secret is answered 401 (with
``WWW-Authenticate: Basic``), a user who may not reach the agent 403; each
refusal is one log line with the agent, the caller's address and the
reason, never the secret.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional, Protocol, Tuple

from ..errors import AccessDeniedError
from ..server.credentials import UserCredential, basic_credentials, bearer_token
from ..server.wsgi import StartResponse, WSGIApp, WSGIEnviron, plain_text_response

__all__ = ["UserGuard", "UserAuthority", "user_secret", "client_key_from_path", "USER_ENVIRON_KEY"]

log = logging.getLogger(__name__)

#: Where :class:`UserGuard` leaves the authenticated user's name.
USER_ENVIRON_KEY = "remotedialer.user"

_HEADERS = ("HTTP_PROXY_AUTHORIZATION", "HTTP_AUTHORIZATION")
_NEED_SECRET = "a user secret is needed: Proxy-Authorization or Authorization, Basic or Bearer\n"
_CHALLENGE = (("WWW-Authenticate", 'Basic realm="remotedialer"'),)


class UserAuthority(Protocol):
    """What checks users (a :class:`~remotedialer.server.credentials.CredentialStore`)."""

    def authorize_user(self, secret: Optional[str], client_key: str) -> UserCredential:
        """The user of ``secret`` if they may reach ``client_key``; raises
        :class:`~remotedialer.errors.AccessDeniedError`."""


def user_secret(environ: WSGIEnviron) -> Tuple[Optional[str], Optional[str]]:
    """``(environ key of the header, secret)`` from the first of
    ``Proxy-Authorization`` and ``Authorization`` present (``Basic``: the
    password; ``Bearer``: the token); ``(None, None)`` without either."""
    for name in _HEADERS:
        value = environ.get(name)
        if value:
            basic = basic_credentials(value)
            return name, basic[1] if basic is not None else bearer_token(value)
    return None, None


def client_key_from_path(prefix: str) -> Callable[[WSGIEnviron], str]:
    """The client key of ``<prefix>/<key>/...`` paths (``""`` if none)."""
    start = prefix.rstrip("/") + "/"

    def key_of(environ: WSGIEnviron) -> str:
        path = str(environ.get("PATH_INFO", ""))
        if not path.startswith(start):
            return ""
        return path[len(start):].split("/", 1)[0]

    return key_of


class UserGuard:
    """``app`` behind user authentication; see the module doc.
    ``client_key_of(environ)`` names the agent a request addresses."""

    def __init__(
        self, app: WSGIApp, users: UserAuthority, client_key_of: Callable[[WSGIEnviron], str]
    ) -> None:
        self.app = app
        self.users = users
        self.client_key_of = client_key_of

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        client_key = self.client_key_of(environ)
        header, secret = user_secret(environ)
        try:
            user = self.users.authorize_user(secret, client_key)
        except AccessDeniedError as exc:
            remote = f"{environ.get('REMOTE_ADDR', '?')}:{environ.get('REMOTE_PORT', '?')}"
            log.warning("refused user request for agent %r from %s: HTTP %d: %s",
                        client_key, remote, exc.status, exc.reason)
            if exc.status == 401:
                return plain_text_response(start_response, 401, _NEED_SECRET, _CHALLENGE)
            return plain_text_response(start_response, exc.status, "forbidden\n")
        if header is not None:
            del environ[header]
        environ[USER_ENVIRON_KEY] = user.name
        return self.app(environ, start_response)

