"""A real OS socket whose other end is a tunneled connection.

Some APIs need a genuine descriptor-backed socket, not merely a socket-like
object: ``ssl.SSLContext.wrap_socket``, ``asyncio.open_connection(sock=...)``,
handing the descriptor to a subprocess. :func:`as_socket` makes one: a
``socket.socketpair()`` whose far end a :class:`~remotedialer.piping.Piper`
copies to and from the :class:`~remotedialer.connection.TunnelConnection`.

Ownership passes to the bridge: after :func:`as_socket` the tunneled
connection must not be read or written directly. Closing the returned socket
ends the tunneled connection (``ERROR EOF`` once everything written was sent);
the tunneled connection ending (either way, or with the session) closes the
pipe's end, so reads on the returned socket see end of file. The error that
ended the tunnel, if any, is kept in :attr:`BridgedSocket.tunnel_error`.

Flow control carries through: while the returned socket is not read, the
socketpair's kernel buffer fills, the piper stops draining the tunnel, and the
tunnel's buffer PAUSEs the peer.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING, Optional

from .piping import Piper, default_piper

if TYPE_CHECKING:
    from .connection import TunnelConnection

__all__ = ["BridgedSocket", "as_socket"]

log = logging.getLogger(__name__)


class BridgedSocket(socket.socket):
    """The socket :func:`as_socket` returns: an ordinary connected stream socket
    (``AF_UNIX`` where ``socketpair`` uses it) that also remembers its tunnel."""

    tunnel: Optional[TunnelConnection] = None

    @property
    def tunnel_error(self) -> Optional[BaseException]:
        """Why the tunneled connection ended: ``None`` while it is open or when
        it ended cleanly (``EOF``), else the error its readers got (e.g. a
        :class:`~remotedialer.errors.RemoteError` carrying a failed dial)."""
        return tunnel_error(self.tunnel)


def tunnel_error(conn: Optional[TunnelConnection]) -> Optional[BaseException]:
    """The error that ended ``conn``; ``None`` if it is open or ended cleanly."""
    return None if conn is None else conn.error


def lost_transport(exc: BaseException) -> bool:
    """Whether a TLS handshake over a bridged socket failed because its
    transport went away (end of file, reset), not because of what the peer
    said (certificate, alert) or a timeout."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, (ssl.SSLError, socket.timeout))


def as_socket(conn: TunnelConnection, piper: Optional[Piper] = None) -> BridgedSocket:
    """Return a connected OS socket bridged to ``conn``; takes ownership of ``conn``.

    The socket starts with ``conn``'s timeout. Does not block. Raises
    ``OSError`` if no socketpair can be made (out of descriptors) and
    ``RuntimeError`` if ``piper`` was stopped; ``conn`` is closed in both cases.
    """
    try:
        ours, theirs = socket.socketpair()
    except OSError:
        conn.close()
        raise
    bridged = BridgedSocket(fileno=ours.detach())
    try:
        bridged.tunnel = conn
        bridged.settimeout(conn.gettimeout())
        (piper or default_piper()).pipe_socket(theirs, conn)
    except BaseException:
        bridged.close()
        theirs.close()
        conn.close()
        raise
    log.debug("bridged %s to descriptor %d", conn, bridged.fileno())
    return bridged
