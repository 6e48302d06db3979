"""remotedialer: reverse tunnels over one WebSocket, wire-compatible with
rancher/remotedialer.

A client behind NAT opens one WebSocket to a server; the server then dials
``proto/address`` *through* it and gets socket-like connections that connect
from the client's side, many multiplexed over the one WebSocket.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

from . import plugins
from .config import DEFAULT_LIMITS, Limits
from .errors import (
    ConnectNotAllowedError,
    DialError,
    HandshakeError,
    LimitExceededError,
    NoSessionError,
    ProtocolError,
    RemotedialerError,
    RemoteError,
    RemoteRefusedError,
    RemoteTimeoutError,
    TunnelClosedError,
    TunnelTimeoutError,
)
from .observer import Observer

if TYPE_CHECKING:
    from .client import Backoff, TunnelClient, client_connect, connect_to_proxy
    from .connection import TunnelConnection
    from .ha.peering import Peering
    from .piping import LocalDialer, Piper, dial_socket
    from .server.port_forward import PortForward
    from .server.sessions import SessionManager
    from .server.tunnel_server import ClientDialer, Server
    from .session import Session

__version__ = "0.1.0"

_LAZY: Dict[str, str] = {
    "Backoff": "client",
    "TunnelClient": "client",
    "client_connect": "client",
    "connect_to_proxy": "client",
    "TunnelConnection": "connection",
    "Peering": "ha.peering",
    "LocalDialer": "piping",
    "Piper": "piping",
    "dial_socket": "piping",
    "PortForward": "server.port_forward",
    "SessionManager": "server.sessions",
    "ClientDialer": "server.tunnel_server",
    "Server": "server.tunnel_server",
    "Session": "session",
}
"""Public names by the module that defines them, imported on first use
(module ``__getattr__``): an agent never loads the server, werkzeug or the
HA layer, a server never loads the agent's websocket-client until peering
needs it. ``tests/client/test_footprint.py`` holds what an agent loads."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))


def _peering_for_server(server: "Server") -> Any:
    """:meth:`Peering.for_server <remotedialer.ha.peering.Peering.for_server>`,
    imported when the first server is built."""
    from .ha.peering import Peering

    return Peering.for_server(server)


# The server never imports the HA layer; the package root plugs it in.
plugins.set_default_peering(_peering_for_server)

__all__ = [
    "Backoff",
    "ClientDialer",
    "ConnectNotAllowedError",
    "DEFAULT_LIMITS",
    "DialError",
    "HandshakeError",
    "LimitExceededError",
    "Limits",
    "LocalDialer",
    "NoSessionError",
    "Observer",
    "Peering",
    "PortForward",
    "Piper",
    "ProtocolError",
    "RemoteError",
    "RemoteRefusedError",
    "RemoteTimeoutError",
    "RemotedialerError",
    "Server",
    "Session",
    "SessionManager",
    "TunnelClient",
    "TunnelClosedError",
    "TunnelConnection",
    "TunnelTimeoutError",
    "client_connect",
    "connect_to_proxy",
    "dial_socket",
]
