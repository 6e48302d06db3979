"""remotedialer: reverse tunnels over one WebSocket, wire-compatible with
rancher/remotedialer.

A client behind NAT opens one WebSocket to a server; the server then dials
``proto/address`` *through* it and gets socket-like connections that connect
from the client's side, many multiplexed over the one WebSocket.
"""

from .client import Backoff, TunnelClient, client_connect, connect_to_proxy
from .config import DEFAULT_LIMITS, Limits
from .connection import TunnelConnection
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
from .server.port_forward import PortForward
from .observer import Observer
from .ha.peering import Peering
from .piping import LocalDialer, Piper, dial_socket
from .server.tunnel_server import ClientDialer, Server, set_default_peering
from .session import Session
from .server.sessions import SessionManager

__version__ = "0.1.0"

# The server never imports the HA layer; the package root plugs it in.
set_default_peering(Peering.for_server)

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
