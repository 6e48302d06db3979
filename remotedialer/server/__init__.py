"""The server side of the tunnel (layer 3 of the package, see
docs/contributing.rst): the connect endpoint and dialers
(:mod:`~remotedialer.server.tunnel_server`), the session table
(:mod:`~remotedialer.server.sessions`), ``ssh -R`` style port forwards
(:mod:`~remotedialer.server.port_forward`) and the small WSGI helpers they
share (:mod:`~remotedialer.server.wsgi`).

It never imports the agent (:mod:`remotedialer.client`) or high availability
(:mod:`remotedialer.ha`): peering plugs in through :class:`PeerRouter`.
"""

from .port_forward import ForwardSpec, PortForward
from .sessions import SessionListener, SessionManager
from .tunnel_server import (
    FAILED_AUTHENTICATION,
    Authorizer,
    ClientDialer,
    ErrorWriter,
    PeerRouter,
    Server,
    default_error_writer,
)

__all__ = [
    "Server",
    "ClientDialer",
    "PeerRouter",
    "Authorizer",
    "ErrorWriter",
    "default_error_writer",
    "FAILED_AUTHENTICATION",
    "SessionManager",
    "SessionListener",
    "PortForward",
    "ForwardSpec",
]
