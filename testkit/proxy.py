"""Helpers for the proxy front end's tests: a user check shaped like the
credential store's ``authorize_user(secret, client_key)``."""

from __future__ import annotations

from typing import Callable, Collection


class Refused(Exception):
    """A refusal as the proxy reads it: an error with an HTTP ``status``
    (401: bad secret, 403: not this agent)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def user_authorizer(password: str, client_keys: Collection[str]) -> Callable[[str, str], None]:
    """``authorize(secret, client_key)`` for one user, whose secret is
    ``password`` and who may reach ``client_keys`` only."""

    def authorize(secret: str, client_key: str) -> None:
        if secret != password:
            raise Refused(401, "bad secret")
        if client_key not in client_keys:
            raise Refused(403, f"user may not reach {client_key}")

    return authorize
