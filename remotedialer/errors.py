"""The exception tree of remotedialer.

Everything raised on purpose derives from :class:`RemotedialerError`. Errors a
socket user expects also derive from the matching built-in ``OSError``
subclass, so ``except ConnectionError`` or ``except TimeoutError`` written for
plain sockets keeps working with tunneled connections.

They are also shaped like the stdlib's socket errors: ``errno`` is set and
``args == (errno, strerror)``, with the library's text as ``strerror``
(``ECONNRESET`` for a lost tunnel or a connection the far side ended with an
error, ``ECONNREFUSED`` for a refused dial, ``ETIMEDOUT`` for a timeout).
Third-party code such as paramiko reads ``e.args[1]`` and ``e.errno``.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

__all__ = [
    "RemotedialerError",
    "ProtocolError",
    "TunnelClosedError",
    "TransportClosed",
    "TransportEnded",
    "ReaderReleased",
    "RemoteError",
    "RemoteRefusedError",
    "RemoteTimeoutError",
    "DialError",
    "NoSessionError",
    "ConnectNotAllowedError",
    "HandshakeError",
    "LimitExceededError",
    "TunnelTimeoutError",
    "ConfigurationError",
    "ProxyError",
    "ListenError",
    "DialRefusedError",
    "AccessDeniedError",
    "AuthenticationError",
    "ForbiddenError",
    "socket_error",
]


class RemotedialerError(Exception):
    """Base class of every error this library raises on purpose."""


def _rebuild(cls: Type["_SocketError"], args: Tuple[Any, ...], state: Dict[str, Any]) -> "_SocketError":
    """Unpickle a :class:`_SocketError` without calling its ``__init__``."""
    error = cls.__new__(cls, *args)
    OSError.__init__(error, *args)
    error.__dict__.update(state)
    return error


class _SocketError(RemotedialerError):
    """Mixin for the ``OSError`` subclasses: built from a message alone, it
    carries the class's ``default_errno`` and ``args == (errno, message)``."""

    default_errno: ClassVar[int] = errno.ECONNRESET

    def __init__(self, message: str = "") -> None:
        super().__init__(self.default_errno, message)

    def __reduce__(self) -> Any:
        return _rebuild, (type(self), self.args, self.__dict__)


class ProtocolError(RemotedialerError, ValueError):
    """A message that breaks the wire protocol (undecodable header, text frame, ...)."""


class TunnelClosedError(_SocketError, ConnectionResetError, ConnectionAbortedError):
    """The session carrying the connection ended ("tunnel disconnect"), or the
    connection was closed on this side. ``errno`` is ``ECONNRESET``; it is
    both a ``ConnectionResetError`` and (as before) a ``ConnectionAbortedError``."""


class TransportClosed(TunnelClosedError):
    """The WebSocket under a session closed or failed (raised by a
    :class:`~remotedialer.transports.base.Transport`)."""


class TransportEnded(TransportClosed):
    """The peer closed the WebSocket on purpose (a close frame with the
    normal status, 1000, as :meth:`Transport.close
    <remotedialer.transports.base.Transport.close>` sends): its session is
    over. A resumable session ends instead of suspending."""


class ReaderReleased(RemotedialerError):
    """Not a failure: raised out of ``Transport.receive()`` when the
    transport parked (:mod:`remotedialer.poller`) and lets its reader thread
    go. :meth:`Session.serve <remotedialer.session.Session.serve>` then
    returns :data:`~remotedialer.session.RELEASED`; the transport has a new
    reader call ``serve(transport)`` when anything but a ping arrives."""


class RemoteError(_SocketError, ConnectionResetError):
    """The far side ended the connection with an error text (its ERROR
    message), kept as ``remote_message``. ``errno`` is ``ECONNRESET``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.remote_message = message


class DialError(_SocketError, ConnectionRefusedError):
    """Dialing a target failed: the far side could not (or would not) connect.
    ``errno`` is ``ECONNREFUSED``."""

    default_errno = errno.ECONNREFUSED

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.__cause__ = cause


class RemoteRefusedError(RemoteError, DialError):
    """The far side's dial of the target was refused ("connection refused"):
    a ``ConnectionRefusedError`` with ``errno`` ``ECONNREFUSED``, and a
    :class:`RemoteError` carrying the far side's text."""

    default_errno = errno.ECONNREFUSED


class NoSessionError(DialError):
    """No live session for the client key: the dial fails at once."""


class ConnectNotAllowedError(DialError):
    """A connect authorizer refused the ``proto/address``."""


class HandshakeError(_SocketError, ConnectionRefusedError):
    """The server refused the WebSocket handshake; carries its HTTP ``status``,
    ``reason`` phrase and whole ``body``. ``errno`` is ``ECONNREFUSED``.

    The message is one line: status, reason, the first
    :data:`BODY_PREVIEW` characters of the body with its line breaks
    folded, and a hint: for 404 that the URL's path may not be the tunnel
    endpoint (``/connect`` on ``remotedialer server``), for 400 that the
    endpoint may not be mounted with WebSocket upgrades allowed (a web
    framework's plain route answers an upgrade request with 400)."""

    default_errno = errno.ECONNREFUSED

    #: How much of the body the message shows.
    BODY_PREVIEW = 200

    def __init__(
        self, status: int, body: str = "", cause: Optional[BaseException] = None, reason: str = ""
    ) -> None:
        super().__init__(_handshake_summary(status, reason, body, self.BODY_PREVIEW))
        self.status = status
        self.reason = reason
        self.body = body
        self.__cause__ = cause


_UPGRADE_HINT = (
    "is the endpoint mounted with WebSocket upgrades allowed? "
    "With Flask, mount the Server with DispatcherMiddleware, not as a route"
)


_PATH_HINT = (
    "is the URL's path the server's tunnel endpoint? "
    "remotedialer server and the Go example serve it at /connect (ws://HOST:PORT/connect)"
)


def _handshake_summary(status: int, reason: str, body: str, preview: int) -> str:
    head = f"handshake refused: HTTP {status}" + (f" {reason}" if reason else "")
    text = " ".join(body.split())
    if len(text) > preview:
        text = text[:preview] + "..."
    summary = f"{head}: {text}" if text else head
    if status == 404:
        summary += f" - hint: {_PATH_HINT}"
    elif status == 400:
        summary += f" - hint: {_UPGRADE_HINT}"
    return summary


class ConfigurationError(RemotedialerError, ValueError):
    """A setting that cannot work (a server URL, a port, a proxy URL, a
    certificate file), found before anything connects."""


class ProxyError(_SocketError, ConnectionRefusedError):
    """The proxy on the way to the server failed: unreachable, refused the
    ``CONNECT`` (``status`` carries its HTTP status, 407 for credentials) or
    answered nonsense. ``errno`` is ``ECONNREFUSED``."""

    default_errno = errno.ECONNREFUSED

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class ListenError(RemotedialerError):
    """A server could not listen on its address (in use, not ours, no
    permission); the ``OSError`` is the ``__cause__``. Not an ``OSError``
    itself: werkzeug's server turns those into printed lines and ``sys.exit``."""

    @classmethod
    def binding(cls, address: Tuple[Any, ...], error: OSError) -> "ListenError":
        """The error for a failed ``bind`` of ``address`` (host, port, ...)."""
        from .addresses import join_host_port

        where = join_host_port(str(address[0]), int(address[1]))
        listen_error = cls(f"cannot listen on {where}: {error_text(error)}")
        listen_error.__cause__ = error
        return listen_error


class LimitExceededError(_SocketError, ConnectionResetError):
    """A configured limit (buffer, connections, message size) was exceeded.
    ``errno`` is ``ECONNRESET``."""


if sys.version_info >= (3, 10):
    _Timeout = socket.timeout  # which is TimeoutError
else:

    class _Timeout(socket.timeout, TimeoutError):
        """Before Python 3.10 ``socket.timeout`` is not a ``TimeoutError``:
        a tunnel's timeout is both, as on later versions."""


class TunnelTimeoutError(_SocketError, _Timeout):
    """A blocking call on a tunnel did not complete within its timeout.
    ``errno`` is ``ETIMEDOUT``.

    It is a ``socket.timeout`` and a ``TimeoutError`` on every Python version
    (the two are one class from Python 3.10 on).
    """

    default_errno = errno.ETIMEDOUT


class RemoteTimeoutError(RemoteError, TunnelTimeoutError):
    """The far side's dial of the target timed out: a ``TimeoutError`` with
    ``errno`` ``ETIMEDOUT``, and a :class:`RemoteError` carrying its text."""

    default_errno = errno.ETIMEDOUT


class DialRefusedError(RemotedialerError, PermissionError):
    """The server's dial policy refused a dial through an agent: a
    ``PermissionError`` with ``errno`` ``EACCES``. ``reason`` is
    ``"target"`` (the address or port is not allowed), ``"no-policy"`` (no
    policy applies to the client key) or ``"max-connections"`` (the agent's
    cap on open connections is reached)."""

    def __init__(self, client_key: str, proto: str, address: str, reason: str, detail: str = "") -> None:
        text = f"dial {proto}/{address} through {client_key!r} not allowed: " + (
            detail or _REFUSAL_TEXT.get(reason, reason))
        super().__init__(errno.EACCES, text)
        self.client_key = client_key
        self.proto = proto
        self.address = address
        self.reason = reason

    def __reduce__(self) -> Any:
        return _rebuild, (type(self), self.args, self.__dict__)


_REFUSAL_TEXT = {
    "target": "target not in the agent's policy",
    "no-policy": "no dial policy for this client key",
    "max-connections": "too many connections",
}


class AccessDeniedError(RemotedialerError):
    """A caller (agent, user, admin) was refused: ``status`` is the HTTP
    status to answer, ``claimed`` the client key or user it claimed (for a
    log line; never the secret), ``reason`` why."""

    status: ClassVar[int] = 403

    def __init__(self, reason: str, claimed: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.claimed = claimed


class AuthenticationError(AccessDeniedError):
    """A missing, unknown or expired secret: HTTP 401."""

    status = 401


class ForbiddenError(AccessDeniedError):
    """A valid secret that does not allow what was asked (another client
    key, the admin API without the admin role): HTTP 403."""

    status = 403


# How far sides word a failed dial. Go's net package: "dial tcp 127.0.0.1:1:
# connect: connection refused" and "...: i/o timeout"; this library's client
# passes the OS text on: "dial tcp 127.0.0.1:1: Connection refused" (Windows:
# "...target machine actively refused it") and "...: timed out". Matched in
# lower case (compiling the two case-blind regular expressions these were cost
# 0.5 ms of every import of the package).
_REFUSED = ("connection refused", "actively refused")
_TIMED_OUT = ("i/o timeout", "timed out")


def remote_error(text: str) -> RemoteError:
    """The error local readers and writers see for a far side's ERROR text
    (other than ``EOF``, a clean end): refused and timed-out dials get their
    own types, anything else is a :class:`RemoteError`."""
    lowered = text.lower()
    if any(words in lowered for words in _REFUSED):
        return RemoteRefusedError(text)
    if any(words in lowered for words in _TIMED_OUT):
        return RemoteTimeoutError(text)
    return RemoteError(text)


def socket_error(code: int) -> OSError:
    """The error a plain socket raises for ``code``: ``OSError`` picks the
    subclass (``EPIPE`` gives a ``BrokenPipeError``), with the OS text."""
    return OSError(code, os.strerror(code))


def error_text(error: BaseException) -> str:
    """An error's message without the ``[Errno N]`` prefix ``str()`` adds:
    the text to send the peer as ERROR or to show in a log line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
