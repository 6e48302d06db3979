"""The small interface a :class:`~remotedialer.session.Session` needs from a WebSocket.

A transport sends and receives whole binary messages, pings, and closes:
``transports.websocket_client.WebSocketClientTransport`` adapts websocket-client,
``transports.wsgi.ServerWebSocket`` is the server's own, and
``transports.wsgi.SimpleWebSocketTransport`` adapts simple-websocket; tests use
the in-memory :func:`remotedialer.testing.memory_pair`. The agent's way to
its server starts here too: :func:`server_address` reads its URL,
:func:`connect_tcp` connects.

Contract:

* ``send`` is only ever called by one thread at a time (the session serializes).
  A message may come in two parts (``send(header, payload)``: a DATA
  message's header and the caller's payload, so that the payload is never
  copied to join them); the transport writes them as one message.
* ``receive`` is only ever called by the session's reader thread.
* ``close`` may be called from any thread, any number of times, and makes a
  blocked ``receive`` or ``send`` in another thread return or raise promptly.
* ``last_keepalive`` is the ``time.monotonic()`` of the last sign of life the
  protocol counts (a pong on the client side, a ping on the server side).
"""

from __future__ import annotations

import socket
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Tuple
from urllib.parse import urlsplit

from ..errors import ConfigurationError, TransportClosed, TransportEnded
from ..wait import wait_for_write  # re-exported: the transports' writes use it

if TYPE_CHECKING:
    from ..frames import FrameReader, WebSocketEvent
    from ..protocol import Bytes

__all__ = [
    "Transport", "TransportClosed", "TransportEnded", "ReceiveSize", "next_event_from_socket",
    "wait_for_write", "connect_tcp", "server_address", "sendall_parts",
]


def server_address(url: str) -> Tuple[bool, str, int]:
    """``(secure, host, port)`` of a ``ws://`` or ``wss://`` server URL.
    Raises :class:`~remotedialer.errors.ConfigurationError` (a ``ValueError``)
    saying what is wrong: scheme, host, port, IPv6 literal."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
        raise ConfigurationError(f"invalid server URL {url!r}: {exc} (unclosed IPv6 literal?)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ConfigurationError(f"invalid server URL {url!r}: want ws://HOST[:PORT]/PATH or wss://...")
    if not parts.hostname:
        raise ConfigurationError(f"invalid server URL {url!r}: no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        text = parts.netloc.rpartition(":")[2]
        raise ConfigurationError(f"invalid server URL {url!r}: port {text!r} is not a number in 1-65535")
    return scheme == "wss", parts.hostname, port or (443 if scheme == "wss" else 80)


def connect_tcp(host: str, port: int, timeout: Optional[float]) -> socket.socket:
    """``socket.create_connection((host, port), timeout)``, with an ASCII
    ``host`` handed to the resolver as bytes: ``getaddrinfo`` encodes every
    ``str`` host with the ``idna`` codec, whose import (``encodings.idna``,
    ``stringprep``, ``unicodedata``) was 0.35 MiB of an idle agent. Other
    hosts go as they are (the codec then does its job). Raises ``OSError``."""
    lookup: Any = host.encode("ascii") if host.isascii() else host
    return socket.create_connection((lookup, port), timeout)


def sendall_parts(sock: Any, head: "Bytes", tail: "Bytes") -> None:
    """Write ``head`` then ``tail`` completely on the blocking ``sock``, as
    one ``sendmsg`` where the socket has one (no copy to join them, one
    system call, no small segment for ``head`` alone under ``TCP_NODELAY``);
    else (Windows, TLS) ``sendall`` each. Raises ``OSError``."""
    sendmsg = getattr(sock, "sendmsg", None)
    if sendmsg is not None and tail:
        try:
            sent = sendmsg((head, tail))
        except NotImplementedError:  # an SSLSocket has the method, not the call
            pass
        else:
            if sent < len(head):
                sock.sendall(memoryview(head)[sent:])
                sock.sendall(tail)
            elif sent - len(head) < len(tail):
                sock.sendall(memoryview(tail)[sent - len(head) :])
            return
    sock.sendall(head)
    if tail:
        sock.sendall(tail)


class ReceiveSize:
    """How many bytes the next ``recv`` of a WebSocket asks for: ``large``
    while data flows, ``small`` after a read that brought less than ``small``
    (an idle tunnel's ping). A blocked ``recv(n)`` holds an ``n``-byte buffer,
    so thousands of idle readers ask small. One reader thread uses it."""

    __slots__ = ("large", "small", "next")

    def __init__(self, large: int, small: Optional[int] = None) -> None:
        self.large = large
        self.small = large if small is None else min(small, large)
        self.next = self.small

    def update(self, received: int) -> None:
        """Size the next read after one that brought ``received`` bytes."""
        self.next = self.large if received >= self.small else self.small


def next_event_from_socket(
    reader: "FrameReader", sock: Optional[socket.socket], size: ReceiveSize, closing: Callable[[], bool]
) -> "WebSocketEvent":
    """The next event of ``reader``, fed from ``sock`` (as many bytes at a
    time as ``size`` says) until one is whole; blocks on ``recv``. Raises
    :class:`TransportClosed` at EOF, on a socket error or once ``closing()``
    (our own close: then as a plain "websocket closed"), and
    :class:`~remotedialer.frames.WebSocketProtocolError` for a bad frame."""
    while True:
        event = reader.next_event()
        if event is not None:
            return event
        if closing():
            raise TransportClosed("websocket closed")
        try:
            if sock is None:
                raise OSError("no socket")
            data = sock.recv(size.next)
        except OSError as exc:
            if closing():
                raise TransportClosed("websocket closed") from exc
            raise TransportClosed(f"websocket read failed: {exc}") from exc
        if not data:
            raise TransportClosed("websocket closed" if closing() else "websocket EOF")
        size.update(len(data))
        reader.feed(data)


class Transport(Protocol):
    """What a session needs from a WebSocket (see the module docstring)."""

    last_keepalive: float

    def send(self, data: "Bytes", tail: "Bytes" = b"") -> None:
        """Send one binary message, ``data`` followed by ``tail``; raise
        :class:`TransportClosed` if closed. ``tail`` is not copied where
        the transport can avoid it; neither may change until this returns."""

    def receive(self) -> bytes:
        """Block for the next binary message.

        Raises :class:`TransportClosed` when the WebSocket is closed and
        :class:`~remotedialer.errors.ProtocolError` for a text message.
        """

    def ping(self) -> None:
        """Send a WebSocket ping."""

    def close(self) -> None:
        """Close the WebSocket on purpose: a close frame with the normal
        status (the peer's :meth:`receive` raises :class:`TransportEnded`),
        then shut it down. Idempotent and callable from any thread."""

    def abort(self) -> None:
        """Drop the WebSocket without a close frame, as a network failure
        would (a resumable session suspending: its peer must see a lost
        WebSocket, not an ended session). Idempotent, callable from any
        thread; a later :meth:`close` does nothing."""

    def describe(self) -> str:
        """A short human-readable description of the far end, for logs."""


def __getattr__(name: str) -> Any:
    """``MemoryTransport`` and ``memory_pair`` moved to :mod:`remotedialer.testing`
    (this module was ``remotedialer.transport``, which had them)."""
    if name in ("MemoryTransport", "memory_pair"):
        warnings.warn(
            f"{__name__}.{name} is deprecated: import remotedialer.testing.{name} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        from .. import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
