"""The exception tree of remotedialer.

Everything raised on purpose derives from :class:`RemotedialerError`. Errors a
socket user expects also derive from the matching built-in ``OSError``
subclass, so ``except ConnectionError`` or ``except TimeoutError`` written for
plain sockets keeps working with tunneled connections.
"""

from __future__ import annotations

import socket
from typing import Optional

__all__ = [
    "RemotedialerError",
    "ProtocolError",
    "TunnelClosedError",
    "RemoteError",
    "DialError",
    "NoSessionError",
    "ConnectNotAllowedError",
    "HandshakeError",
    "LimitExceededError",
    "TunnelTimeoutError",
]


class RemotedialerError(Exception):
    """Base class of every error this library raises on purpose."""


class ProtocolError(RemotedialerError, ValueError):
    """A message that breaks the wire protocol (undecodable header, text frame, ...)."""


class TunnelClosedError(RemotedialerError, ConnectionAbortedError):
    """The session carrying the connection ended ("tunnel disconnect"), or the
    connection was closed on this side."""


class RemoteError(RemotedialerError, ConnectionResetError):
    """The far side ended the connection with an error text (its ERROR message)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.remote_message = message


class DialError(RemotedialerError, ConnectionRefusedError):
    """Dialing a target failed: the far side could not (or would not) connect."""

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.__cause__ = cause


class NoSessionError(DialError):
    """No live session for the client key: the dial fails at once."""


class ConnectNotAllowedError(DialError):
    """A connect authorizer refused the ``proto/address``."""


class HandshakeError(RemotedialerError, ConnectionRefusedError):
    """The server refused the WebSocket handshake; carries its HTTP status and body."""

    def __init__(self, status: int, body: str = "", cause: Optional[BaseException] = None) -> None:
        super().__init__(f"handshake refused: HTTP {status}: {body}".rstrip(": "))
        self.status = status
        self.body = body
        self.__cause__ = cause


class LimitExceededError(RemotedialerError, ConnectionResetError):
    """A configured limit (buffer, connections, message size) was exceeded."""


class TunnelTimeoutError(RemotedialerError, socket.timeout):
    """A blocking call on a tunnel did not complete within its timeout.

    ``socket.timeout`` is ``TimeoutError`` on Python 3.10 and later.
    """
