"""An ``httpcore`` network backend over a dial function (optional: needs
``pip install '.[httpcore]'`` from a checkout).

``httpcore.ConnectionPool(network_backend=TunnelBackend(dial))`` sends every
connection of the pool through ``dial(proto, address, timeout)``, for instance
``server.dialer("client-1")``. As with the requests integration, host names
are resolved on the far side and https runs the standard ``ssl`` module over
:func:`~remotedialer.bridge.as_socket`, with the pool's ``ssl_context`` doing
the verification.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any, Iterable, Iterator, Optional

import httpcore
from urllib3.util.wait import wait_for_read

from ..bridge import as_socket, lost_transport, tunnel_error
from ..connection import TunnelConnection
from ..piping import Piper
from .requests import Dial, dial_address

__all__ = ["TunnelBackend", "TunnelStream"]


@contextlib.contextmanager
def _mapped(timeout_error: type, other_error: type) -> Iterator[None]:
    """Turn socket errors into httpcore's (it expects its own exception types).
    A target the far side could not connect to shows up on the first read or
    write as ``ConnectionRefusedError``: that is ``httpcore.ConnectError``."""
    try:
        yield
    except socket.timeout as exc:  # TimeoutError on Python >= 3.10
        raise timeout_error(exc) from exc
    except ConnectionRefusedError as exc:
        raise httpcore.ConnectError(exc) from exc
    except OSError as exc:
        raise other_error(exc) from exc


class TunnelStream(httpcore.NetworkStream):
    """An httpcore stream over a tunneled connection, or over the TLS socket
    that :meth:`start_tls` made of it."""

    def __init__(self, sock: Any, piper: Optional[Piper] = None,
                 tunnel: Optional[TunnelConnection] = None) -> None:
        self._sock = sock
        self._piper = piper
        self._tunnel = tunnel if tunnel is not None else (
            sock if isinstance(sock, TunnelConnection) else None
        )

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        """Blocks up to ``timeout`` for data; raises ``httpcore.ReadTimeout`` or
        ``httpcore.ReadError``."""
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            self._sock.settimeout(timeout)
            return bytes(self._sock.recv(max_bytes))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        """Blocks up to ``timeout`` while the far side is paused; raises
        ``httpcore.WriteTimeout`` or ``httpcore.WriteError``."""
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: Optional[str] = None,
                  timeout: Optional[float] = None) -> "TunnelStream":
        """Run the TLS handshake (bounded by ``timeout``) over a socket bridged
        to the tunneled connection. A failure closes the connection and raises
        ``httpcore.ConnectTimeout`` or ``httpcore.ConnectError``."""
        raw = self._sock
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            if isinstance(raw, TunnelConnection):
                raw = as_socket(raw, self._piper)
            try:
                raw.settimeout(timeout)
                tls = ssl_context.wrap_socket(raw, server_hostname=server_hostname)
            except BaseException as exc:
                raw.close()
                cause = tunnel_error(self._tunnel)
                if cause is not None and lost_transport(exc):
                    raise httpcore.ConnectError(f"through the tunnel: {cause}") from cause
                raise
        return TunnelStream(tls, self._piper, self._tunnel)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return getattr(self._sock, "_sslobj", None)  # what httpcore's own backend hands out
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # Readable while idle means the far side closed (or sent junk).
            return self._sock.fileno() < 0 or wait_for_read(self._sock, timeout=0.0)
        return None


class TunnelBackend(httpcore.NetworkBackend):
    """An httpcore ``NetworkBackend`` whose TCP connections come from ``dial``.

    ``piper`` copies for https connections (default: the process-wide one).
    """

    def __init__(self, dial: Dial, piper: Optional[Piper] = None) -> None:
        self.dial = dial
        self.piper = piper

    def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None,
                    local_address: Optional[str] = None,
                    socket_options: Optional[Iterable[Any]] = None) -> TunnelStream:
        """Blocks in the dial function; raises ``httpcore.ConnectTimeout`` or
        ``httpcore.ConnectError``. ``local_address`` and ``socket_options``
        have no meaning for a tunnel and are ignored."""
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            conn = self.dial("tcp", dial_address(host, port), timeout)
        return TunnelStream(conn, self.piper)

    def connect_unix_socket(self, path: str, timeout: Optional[float] = None,
                            socket_options: Optional[Iterable[Any]] = None) -> TunnelStream:
        """Dials ``unix/path`` on the far side (if the far side allows it)."""
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            conn = self.dial("unix", path, timeout)
        return TunnelStream(conn, self.piper)
