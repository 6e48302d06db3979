"""The server side: a WSGI application for the connect endpoint, and dialers.

:class:`Server` authorizes each request to its endpoint (peers first, then the
user's authorizer), answers refusals with plain HTTP before any upgrade, and
otherwise takes the socket over and serves a
:class:`~remotedialer.session.Session` on the WSGI handler thread until the
tunnel ends. That thread is the session's only reader; no other thread is
started per tunnel. It runs under werkzeug's threaded server and gunicorn's
``gthread`` worker (one thread per tunnel: give gunicorn ``--threads`` of at
least the number of tunnels plus concurrent ordinary requests). With
``Limits.park_idle``, an idle tunnel parks on the shared poller
(:mod:`remotedialer.poller`) and its thread returns to the WSGI server; a
thread of our own serves it again once anything but a ping arrives.

A front end that owns its listener and reads request heads itself (the
example server's, :mod:`remotedialer.gateway.head_reader`) calls
:meth:`Server.handshake` instead, on its listener's thread: the same checks
and answers, and the tunnel's ``serve`` handed back to run on a thread of
its own, the only one the tunnel gets. Either way the session is registered
before its client sees the ``101``.

Dialing through a client::

    server = Server(authorizer)
    conn = server.dial("agent-1", "tcp", "127.0.0.1:8080", timeout=10)
    conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")

    dial = server.dialer("agent-1")           # dial(proto, address, timeout=None)
    connect = server.create_connection_for("agent-1")
    conn = connect(("127.0.0.1", 8080), timeout=10)   # socket.create_connection-shaped

Dials never wait for a tunnel: with no open session for the key they raise
:class:`~remotedialer.errors.NoSessionError` at once.

Peering (HA): ``server.peering``, a :class:`PeeringLayer`
(:class:`~remotedialer.ha.peering.Peering` unless the ``peering`` argument
builds another), authenticates peers, holds the links to them and what they
advertise. Peer sessions live in ``peer_sessions`` (never used for client
dials). The :class:`PeerRouter` set as ``server.peer_router`` (the peering,
unless replaced) serves the CONNECTs and ADD/REMOVE_CLIENT messages of peer
sessions and routes dials for keys held elsewhere. Without one, peers'
CONNECTs are refused and only local sessions are dialed. The server talks to
peering through these two protocols only, and this package never imports
:mod:`remotedialer.ha`: the package root plugs :class:`Peering
<remotedialer.ha.peering.Peering>` in as the default
(:func:`set_default_peering`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Tuple,
    Type,
    Union,
)

from werkzeug.wrappers import Request

from .. import plugins, poller
from ..addresses import join_host_port
from ..config import DEFAULT_LIMITS, Limits
from ..connection import TunnelConnection
from ..errors import (
    AccessDeniedError,
    DialRefusedError,
    ConnectNotAllowedError,
    LimitExceededError,
    NoSessionError,
    TunnelClosedError,
    TunnelTimeoutError,
    error_text,
)
from .policy import DialGate, PolicySource
from .port_forward import ForwardSpec, PortForward, start_forward
from .wsgi import Handshake, StartResponse, WSGIEnviron, plain_text_response
from ..observer import NULL_OBSERVER, Observer
from ..piping import ConnectAuthorizer, LocalDialer, Piper, SocketDialer
from ..resumable import ResumableSession
from ..resume import (
    RESUME_HEADER,
    RESUME_VERSION,
    RESUMED_HEADER,
    TOKEN_HEADER,
    WINDOW_HEADER,
    new_token,
)
from ..session import RELEASED, ClientListener, ConnectHandler, Session
from .sessions import ResumeTokens, SessionListener, SessionManager, dial_first
from ..transports.base import TransportClosed
from ..transports.wsgi import (
    RECEIVE_BYTES,
    ServerWebSocket,
    SimpleWebSocketTransport,
    UnsupportedServerError,
    describe_remote,
    finish_taken_over_response,
    is_websocket_request,
    socket_from_environ,
)

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

__all__ = [
    "Server",
    "ClientDialer",
    "PeerRouter",
    "PeeringLayer",
    "PeeringFactory",
    "set_default_peering",
    "Authorizer",
    "ErrorWriter",
    "default_error_writer",
    "FAILED_AUTHENTICATION",
    "FORBIDDEN",
]

log = logging.getLogger(__name__)


Authorizer = Callable[[Request], Tuple[str, bool]]
"""``authorizer(request) -> (client_key, authed)``; raising refuses the
request with HTTP 400 and the error's text."""

ErrorWriter = Callable[[WSGIEnviron, StartResponse, int, str], Iterable[bytes]]
"""``error_writer(environ, start_response, status_code, message)``: writes a
refusal as a WSGI response (Go's ``ErrorWriter``)."""

FAILED_AUTHENTICATION = "failed authentication"
"""Body of the HTTP 401 answer to a request the authorizer did not authorize."""

FORBIDDEN = "forbidden"
"""Body of the HTTP 403 answer to a secret that may not claim the client key."""

def default_error_writer(
    environ: WSGIEnviron, start_response: StartResponse, status_code: int, message: str
) -> Iterable[bytes]:
    """Answer ``status_code`` with ``message`` as a plain-text body, as Go does."""
    return plain_text_response(start_response, status_code, message)


class PeerRouter(Protocol):
    """What the peering layer provides to a :class:`Server` (``server.peer_router``)."""

    def handle_connect(self, conn: TunnelConnection) -> None:
        """Serve a CONNECT ``clientKey::proto/address`` from a peer session
        (a connect handler: must not block, raises
        :class:`~remotedialer.errors.ConnectNotAllowedError` to refuse)."""

    def on_client_change(self, session: Session, added: bool, client_key: str, session_key: int) -> None:
        """An ADD_CLIENT (``added``) or REMOVE_CLIENT arrived on a peer session."""

    def dial(
        self, client_key: str, proto: str, address: str, timeout: Optional[float]
    ) -> Optional[TunnelConnection]:
        """Dial through a peer holding ``client_key``; ``None`` if none does."""


class PeeringLayer(PeerRouter, Protocol):
    """What a :class:`Server` needs from its peering layer (``server.peering``):
    the routing of :class:`PeerRouter`, peer authentication and the peer table."""

    def authenticate(self, headers: Union[Mapping[str, str], "Headers"]) -> Optional[str]:
        """The peer id if ``headers`` authenticate a known peer, else ``None``
        (the server's authorizer decides)."""

    def refusal(self, headers: Union[Mapping[str, str], "Headers"]) -> Optional[str]:
        """Why a request carrying peer headers is not an accepted peer link
        (for the log; never shows a token), or ``None``."""

    def add_peer(self, url: str, peer_id: str, token: str) -> None:
        """Accept ``peer_id`` with ``token`` and keep a link to it at ``url``."""

    def remove_peer(self, peer_id: str) -> None:
        """Forget ``peer_id``: stop its link and refuse it from now on."""

    def close(self) -> None:
        """Stop every link."""


class _Admission(NamedTuple):
    """A connect request that passed every check: whose tunnel it opens."""

    client_key: str
    is_peer: bool
    offered: bool  # the client offered resumption
    resumed: Optional[ResumableSession]  # the suspended session its token reattaches


PeeringFactory = Callable[["Server"], PeeringLayer]
"""Builds the peering layer of a new :class:`Server` from it."""


class NoPeering:
    """The peering layer of a server built with none: no peer authenticates,
    peers' CONNECTs are refused and no dial goes to a peer."""

    def authenticate(self, headers: Union[Mapping[str, str], "Headers"]) -> Optional[str]:
        return None

    def refusal(self, headers: Union[Mapping[str, str], "Headers"]) -> Optional[str]:
        return None

    def add_peer(self, url: str, peer_id: str, token: str) -> None:
        raise ValueError("this server was built without a peering layer")

    def remove_peer(self, peer_id: str) -> None:
        pass

    def close(self) -> None:
        pass

    def handle_connect(self, conn: TunnelConnection) -> None:
        raise ConnectNotAllowedError("connect not allowed")

    def on_client_change(self, session: Session, added: bool, client_key: str, session_key: int) -> None:
        pass

    def dial(
        self, client_key: str, proto: str, address: str, timeout: Optional[float]
    ) -> Optional[TunnelConnection]:
        return None


def _no_peering(server: "Server") -> PeeringLayer:
    return NoPeering()


def set_default_peering(factory: PeeringFactory) -> None:
    """Build the peering layer of servers made from now on with ``factory``
    unless they are given one. ``import remotedialer`` sets
    :meth:`Peering.for_server <remotedialer.ha.peering.Peering.for_server>`
    (through :mod:`remotedialer.plugins`, without importing it)."""
    plugins.set_default_peering(factory)


class ClientDialer:
    """Dials through the tunnel of one client key (see :meth:`Server.dialer`).

    Calling it is :meth:`Server.dial` for that key; :meth:`create_connection`
    has the shape of ``socket.create_connection`` for libraries that take one.
    """

    def __init__(self, server: "Server", client_key: str) -> None:
        self.server = server
        self.client_key = client_key

    def __repr__(self) -> str:
        return f"<ClientDialer {self.client_key!r}>"

    def __call__(self, proto: str, address: str, timeout: Optional[float] = None) -> TunnelConnection:
        """Dial ``proto/address`` through the client; see :meth:`Server.dial`."""
        return self.server.dial(self.client_key, proto, address, timeout)

    def create_connection(
        self,
        address: Tuple[str, int],
        timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: Optional[Tuple[str, int]] = None,
    ) -> TunnelConnection:
        """``socket.create_connection((host, port), timeout)`` through the
        client: a TCP connection made from the client's side. A timeout that
        is not a number (the default sentinel) means
        ``socket.getdefaulttimeout()``; ``source_address`` is ignored (the
        client picks its own). Raises like :meth:`Server.dial`."""
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            timeout = socket.getdefaulttimeout()
        return self.server.dial(self.client_key, "tcp", join_host_port(address[0], address[1]), timeout)


class Server:
    """A WSGI application serving the tunnel connect endpoint; see the module doc.

    * ``authorizer(request)`` returns ``(client_key, authed)`` for a werkzeug
      :class:`~werkzeug.wrappers.Request`, or raises: raising answers HTTP 400
      with the error's text, not authed answers 401 ``failed authentication``,
      both before any upgrade. Raising an
      :class:`~remotedialer.errors.AccessDeniedError` answers its ``status``
      (401 ``failed authentication``, 403 ``forbidden``) and logs the claimed
      key and the reason (e.g.
      :meth:`~remotedialer.server.credentials.CredentialStore.agent_authorizer`).
      ``error_writer`` replaces how those (and a request that is not a
      WebSocket upgrade: 400) are answered.
    * ``client_connect_authorizer(proto, address)`` decides which dials a
      *client* may make through the server (reverse dials); ``None`` refuses
      them all, failing only the connection concerned. ``local_dialer``
      replaces how those targets are dialed.
    * ``peer_id``/``peer_token`` identify this server to its peers (see
      :meth:`add_peer`); ``peer_ssl_context`` sets TLS for ``wss://`` peer
      links, which verify certificates by default. ``peering`` builds the
      peering layer (default: :class:`~remotedialer.ha.peering.Peering`).
    * ``dial_policy()`` returns the
      :class:`~remotedialer.server.policy.DialPolicy` in force (read on every
      dial; ``None``: no policy), which :meth:`dial` enforces (see
      :mod:`remotedialer.server.policy`); without it every dial is allowed.
    * ``websocket="simple-websocket"`` uses simple-websocket for the
      WebSocket instead of the built-in reader (the default), at a second
      thread per tunnel and 2.5x the CPU per GiB received (measured in
      docs/benchmarks.rst).
    """

    def __init__(
        self,
        authorizer: Authorizer,
        error_writer: Optional[ErrorWriter] = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        observer: Optional[Observer] = None,
        client_connect_authorizer: Optional[ConnectAuthorizer] = None,
        peer_id: Optional[str] = None,
        peer_token: Optional[str] = None,
        local_dialer: Optional[SocketDialer] = None,
        piper: Optional[Piper] = None,
        websocket: str = "builtin",
        receive_bytes: int = RECEIVE_BYTES,
        peer_ssl_context: Optional[ssl.SSLContext] = None,
        peering: Optional[PeeringFactory] = None,
        dial_policy: Optional[PolicySource] = None,
    ) -> None:
        if websocket not in ("builtin", "simple-websocket"):
            raise ValueError(f"unknown websocket implementation {websocket!r}")
        self.authorizer = authorizer
        self.error_writer: ErrorWriter = error_writer or default_error_writer
        self.limits = limits
        self.observer = observer
        self.peer_id = peer_id
        self.peer_token = peer_token
        self.websocket = websocket
        self.receive_bytes = receive_bytes
        self.client_connect_authorizer = client_connect_authorizer
        self.peer_ssl_context = peer_ssl_context
        self._local_dialer = LocalDialer(client_connect_authorizer, local_dialer, limits, piper)
        #: Client sessions by client key.
        self.session_manager = SessionManager(limits.max_sessions_per_key)
        #: Sessions of peers that connected to us, keyed by peer id.
        self.peer_sessions = SessionManager(limits.max_sessions_per_key)
        #: The peering layer (peer authentication, links to peers, what they
        #: advertise); see :class:`PeeringLayer` and :mod:`remotedialer.ha.peering`.
        factory = peering or plugins.default_peering() or _no_peering
        self.peering: PeeringLayer = factory(self)
        self.peer_router: Optional[PeerRouter] = self.peering
        #: Resumption tokens of client sessions (``limits.resume_window`` > 0).
        self.resume_tokens = ResumeTokens()
        #: Enforces ``dial_policy`` around every dial (``None`` without one).
        self.dial_gate: Optional[DialGate] = (
            DialGate(dial_policy, self._dial_refused) if dial_policy is not None else None
        )
        self._closed = False
        self._warned_single_threaded = False

    def __repr__(self) -> str:
        return f"<Server peer_id={self.peer_id!r} clients={self.list_clients()}>"

    @property
    def piper(self) -> Piper:
        """Pipes the connections this server relays (clients' reverse dials,
        port forwards, peers' relayed dials)."""
        return self._local_dialer.piper

    # ------------------------------------------------------------------ WSGI
    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request to the connect endpoint. For a tunnel this blocks
        the calling (WSGI handler) thread until the tunnel ends (or, with
        ``park_idle``, first parks)."""
        admitted = self._admit(environ, start_response)
        if not isinstance(admitted, _Admission):
            return admitted
        try:
            _sock, server_kind = socket_from_environ(environ)
        except UnsupportedServerError as exc:
            log.error("%s", exc)
            return self.error_writer(environ, start_response, 500, str(exc))
        if not environ.get("wsgi.multithread", True) and not self._warned_single_threaded:
            self._warned_single_threaded = True
            log.warning(
                "serving a tunnel on a single-threaded WSGI server blocks it for the tunnel's "
                "lifetime; use werkzeug's threaded server or gunicorn -k gthread"
            )
        serve = self._open_session(environ, admitted)
        if serve is not None:
            serve()
        finish_taken_over_response(server_kind)  # raises: the server must write nothing more
        return []  # pragma: no cover

    def handshake(self, environ: WSGIEnviron, start_response: StartResponse) -> Handshake:
        """Answer the upgrade request in ``environ`` on the calling thread
        without serving the tunnel: for a front end that owns the listener
        and reads request heads itself (``environ`` carries the socket under
        ``remotedialer.socket``). Refusals are answered through
        ``start_response`` and returned as the :class:`Handshake`'s body;
        an accepted tunnel is registered and its ``serve`` (run it on a
        thread of its own; it blocks until the tunnel ends) is returned.
        Enforces everything :meth:`__call__` does. Blocks on the socket
        write of the ``101`` answer only."""
        admitted = self._admit(environ, start_response)
        if not isinstance(admitted, _Admission):
            return Handshake(admitted, None)
        return Handshake((), self._open_session(environ, admitted))

    def _admit(self, environ: WSGIEnviron,
               start_response: StartResponse) -> Union["_Admission", Iterable[bytes]]:
        """Authorize and check one connect request: an :class:`_Admission`,
        or the refusal's body (answered through ``start_response``)."""
        request = Request(environ)
        peer_id = self.peering.authenticate(request.headers)
        if peer_id is not None:
            client_key, is_peer = peer_id, True
        else:
            is_peer = False
            try:
                client_key, authed = self.authorizer(request)
            except AccessDeniedError as exc:
                log.warning("refused agent %r from %s: HTTP %d: %s", exc.claimed,
                            describe_remote(environ), exc.status, exc.reason)
                return self._refuse(environ, start_response, exc.status,
                                    FAILED_AUTHENTICATION if exc.status == 401 else FORBIDDEN)
            except Exception as exc:
                self._log_refusal(environ, request, str(exc))
                return self._refuse(environ, start_response, 400, str(exc))
            if not authed:
                self._log_refusal(environ, request, FAILED_AUTHENTICATION)
                return self._refuse(environ, start_response, 401, FAILED_AUTHENTICATION)
        problem = is_websocket_request(environ)
        if problem is not None:
            return self._refuse(environ, start_response, 400, problem)
        if self._closed:
            return self._refuse(environ, start_response, 503, "server shutting down")
        manager = self.peer_sessions if is_peer else self.session_manager
        offered = (
            not is_peer and self.limits.resume_window > 0 and self.websocket == "builtin"
            and request.headers.get(RESUME_HEADER, "").strip() == RESUME_VERSION
        )
        resumed: Optional[ResumableSession] = None
        token = request.headers.get(TOKEN_HEADER, "").strip() if offered else ""
        if token:
            resumed = self.resume_tokens.take(client_key, token)
            if resumed is None:
                log.info("%s: no session to resume for %s (unknown or used token)",
                         describe_remote(environ), client_key)
                self._observer().resume_refused("unknown token")
        held = len(manager.sessions(client_key))
        if resumed is None and held >= self.limits.max_sessions_per_key:
            return self.error_writer(
                environ, start_response, 429, f"too many sessions for client {client_key}"
            )
        if held >= self.limits.max_sessions_per_key:
            return self._refuse(environ, start_response, 429, f"too many sessions for client {client_key}")
        return _Admission(client_key, is_peer, offered, resumed)

    def _refuse(
        self, environ: WSGIEnviron, start_response: StartResponse, status: int, message: str
    ) -> Iterable[bytes]:
        """Answer a refused tunnel request and count it."""
        if self.observer is not None:
            self.observer.handshake_refused(status)
        return self.error_writer(environ, start_response, status, message)

    def _log_refusal(self, environ: WSGIEnviron, request: Request, reason: str) -> None:
        """One line for a refused connect request; a peer link that failed
        peer authentication says so (token mismatch, unknown peer id)."""
        peer_refusal = self.peering.refusal(request.headers)
        if peer_refusal is not None:
            log.warning("refused peer link from %s: %s", describe_remote(environ), peer_refusal)
        else:
            log.info("refused %s: %s", describe_remote(environ), reason)

    def _observer(self) -> Observer:
        return self.observer or NULL_OBSERVER

    def _open_session(self, environ: WSGIEnviron, admitted: "_Admission") -> Optional[Callable[[], None]]:
        """Upgrade and register one admitted session; returns what serves it
        until it ends (or, with resumption, until it loses this WebSocket),
        after which the socket is shut down. ``None`` if the upgrade failed
        or the session was refused (the socket is shut down already)."""
        client_key, is_peer, offered, resumed = admitted
        transport: Any
        token = new_token() if offered else ""
        headers = []
        if offered:
            headers = [
                (RESUME_HEADER, RESUME_VERSION),
                (TOKEN_HEADER, token),
                (WINDOW_HEADER, f"{self.limits.resume_window:g}"),
            ]
            if resumed is not None:
                headers.append((RESUMED_HEADER, "1"))
        try:
            if self.websocket == "simple-websocket":
                transport = SimpleWebSocketTransport(
                    environ, self.limits.max_message_size, self.receive_bytes,
                    ping_interval=self.limits.read_deadline / 2,
                )
            else:
                transport = ServerWebSocket.accept(
                    environ, self.limits.max_message_size, self.receive_bytes, headers, deferred=True
                )
        except Exception as exc:
            log.info("websocket upgrade of %s failed: %s", describe_remote(environ), exc)
            sock, _kind = socket_from_environ(environ)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        if resumed is not None:
            reattach: ResumableSession = resumed
            if not self._open(transport, environ):
                return None
            return lambda: self._serve_reattached(reattach, transport, token)
        # A peer's session relays dials and reports its clients; a client's
        # session dials locally (if allowed) and reports nothing.
        if is_peer:
            connect_handler: ConnectHandler = self.handle_peer_connect
            client_listener: Optional[ClientListener] = self.on_peer_client_change
            manager = self.peer_sessions
        else:
            connect_handler, client_listener = self._local_dialer, None
            manager = self.session_manager
        session_type: Any = ResumableSession if offered else Session
        options = {"resume_window": self.limits.resume_window} if offered else {}
        session = session_type(
            transport,
            is_client=False,
            client_key=client_key,
            connect_handler=connect_handler,
            client_listener=client_listener,
            limits=self.limits,
            observer=self.observer,
            **options,
        )
        try:
            manager.add(client_key, session)
        except LimitExceededError as exc:
            if self._open(transport, environ):
                session.close(error_text(exc))
            return None
        if offered:
            self.resume_tokens.issue(session, token)
        if not self._open(transport, environ):
            session.close("websocket upgrade failed")
            return None
        kind = "peer" if is_peer else "client"
        self._park_when_idle(session, transport, kind)
        log.info("%s session started for %s from %s", kind, client_key, transport.describe())
        return lambda: self._serve_until_detached(session, transport, kind)

    @staticmethod
    def _open(transport: Any, environ: WSGIEnviron) -> bool:
        """Write the ``101`` answer a built-in transport deferred (the session
        is registered by now); False (socket shut down) if that failed."""
        if not isinstance(transport, ServerWebSocket):
            return True
        try:
            transport.open()
        except TransportClosed as exc:
            log.info("websocket upgrade of %s failed: %s", describe_remote(environ), exc)
            transport.abort()
            return False
        return True

    def _serve_reattached(self, session: ResumableSession, transport: Any, token: str) -> None:
        """Serve a suspended session over the new WebSocket of its client."""
        try:
            session.reattach(transport)
        except (TunnelClosedError, TunnelTimeoutError) as exc:
            log.info("reattach of %s failed: %s", session, exc)
            self._observer().resume_refused("reattach failed")
            transport.close()
            return
        self.resume_tokens.issue(session, token)
        self._park_when_idle(session, transport, "client")
        log.info("client session for %s reattached from %s", session.client_key, transport.describe())
        self._serve_until_detached(session, transport, "client")

    def _park_when_idle(self, session: Session, transport: Any, kind: str) -> None:
        """With ``park_idle``: ``transport`` (a session's first WebSocket or
        the one it reattached over) parks on the shared poller whenever the
        session has no connection open, and its reader thread (the WSGI
        handler's, at first) leaves; a new one serves when the poller hands
        the socket back."""
        if self.limits.park_idle and isinstance(transport, ServerWebSocket):
            transport.park_when(lambda: session.connection_count() == 0, poller.default(),
                                lambda: self._serve_on_new_thread(session, transport, kind))

    @classmethod
    def _serve_on_new_thread(cls, session: Session, transport: ServerWebSocket, kind: str) -> None:
        """Serve ``transport`` again after a park, on a new thread."""
        try:
            threading.Thread(target=cls._serve_until_detached, args=(session, transport, kind),
                             name=f"remotedialer-session-{session.session_key}", daemon=True).start()
        except RuntimeError as exc:  # can't start new thread: nothing else would read
            log.error("%s: no thread to serve it: %s", session, exc)
            if not isinstance(session, ResumableSession) or not session.suspend(str(exc)):
                session.close(f"no thread to serve it: {exc}")
            transport.close()
            transport.close_taken_socket()

    @staticmethod
    def _serve_until_detached(session: Session, transport: Any, kind: str) -> None:
        released = False
        try:
            reason = session.serve(transport)
            released = reason is RELEASED
        finally:
            if not released:  # released: the session lives on, parked
                if not isinstance(session, ResumableSession):
                    session.close("handler ended")
                # If another thread is closing the session, wait until its close
                # frame is out: the WSGI server closes the socket once we return.
                transport.close()
                if isinstance(transport, ServerWebSocket):
                    transport.close_taken_socket()
        if not released:
            log.info("%s session for %s ended: %s", kind, session.client_key, reason)

    # ------------------------------------------------------------ peering hooks
    def handle_peer_connect(self, conn: TunnelConnection) -> None:
        """Connect handler of peer sessions: a peer asks us to dial
        ``clientKey::proto/address`` through one of our clients. Refused
        without a :class:`PeerRouter`."""
        router = self.peer_router
        if router is None:
            raise ConnectNotAllowedError("connect not allowed")
        router.handle_connect(conn)

    def on_peer_client_change(self, session: Session, added: bool, client_key: str, session_key: int) -> None:
        """Client listener of peer sessions (ADD_CLIENT / REMOVE_CLIENT)."""
        router = self.peer_router
        if router is not None:
            router.on_client_change(session, added, client_key, session_key)

    def dial_via_peer(
        self, client_key: str, proto: str, address: str, timeout: Optional[float]
    ) -> Optional[TunnelConnection]:
        """Dial through a peer that holds ``client_key``; ``None`` when no
        peer does or there is no :class:`PeerRouter`."""
        router = self.peer_router
        if router is None:
            return None
        return router.dial(client_key, proto, address, timeout)

    def add_peer(self, url: str, peer_id: str, token: str) -> None:
        """Peer with the server ``peer_id`` whose connect endpoint is ``url``:
        accept its peer link authenticated by ``token`` and keep our own link
        to it up. Requires this server's ``peer_id`` and ``peer_token``;
        raises ``ValueError`` without them."""
        self.peering.add_peer(url, peer_id, token)

    def remove_peer(self, peer_id: str) -> None:
        """Stop peering with ``peer_id``: close its links and refuse it."""
        self.peering.remove_peer(peer_id)

    # ------------------------------------------------------------------ dials
    def dial(
        self, client_key: str, proto: str, address: str, timeout: Optional[float] = None
    ) -> TunnelConnection:
        """Open a connection to ``proto/address`` made from the side of
        ``client_key``'s client (``proto`` is ``tcp``, ``tcp4``, ``tcp6`` or
        ``unix``).

        Uses the first open session of the key, falling back to the next one
        if it just died, then to a peer. Waits at most ``timeout`` for the
        tunnel to take the CONNECT (the connection's timeout starts as
        ``timeout``), never for the far side: a refused target shows up as
        the first read raising :class:`~remotedialer.errors.RemoteError`.
        A session of the key that lost its WebSocket and waits to resume
        (resumption) is waited for, at most ``timeout`` (``None``: until it
        resumes or its resume window passes), when no other session and no
        peer took the dial.
        Raises :class:`~remotedialer.errors.NoSessionError` when no open
        session holds the key (at once, unless one is suspended), and
        :class:`~remotedialer.errors.DialRefusedError` (a ``PermissionError``)
        when the dial policy refuses (the target, or the key's connection
        cap); the policy may also lower ``timeout`` to its ``dial-timeout``.
        """
        gate = self.dial_gate
        if gate is None:
            conn = self._dial_any(client_key, proto, address, timeout)
        else:
            with gate.admit(client_key, proto, address, timeout,
                            lambda: self.open_connections(client_key)) as allowed_timeout:
                conn = self._dial_any(client_key, proto, address, allowed_timeout)
        if conn is not None:
            return conn
        raise NoSessionError(f"failed to find Session for client {client_key}")

    def _dial_any(
        self, client_key: str, proto: str, address: str, timeout: Optional[float]
    ) -> Optional[TunnelConnection]:
        """Our open sessions of ``client_key``, then a peer's, then our
        suspended ones once they resume (within ``timeout``)."""
        conn = dial_first(self.session_manager.sessions(client_key), proto, address, timeout)
        if conn is None:
            conn = self.dial_via_peer(client_key, proto, address, timeout)
        if conn is None:
            sessions = self.session_manager.sessions(client_key)
            conn = dial_first(sessions, proto, address, timeout, resumed=True)
        return conn

    def dial_local(
        self, client_key: str, proto: str, address: str, timeout: Optional[float],
        skip: Tuple[Type[BaseException], ...] = (TunnelClosedError,),
    ) -> Optional[TunnelConnection]:
        """Dial through this server's own sessions of ``client_key`` only
        (never a peer), under the dial policy: what a peer's relayed dial
        uses. ``None`` when no session took it (those raising one of
        ``skip`` are passed over); raises
        :class:`~remotedialer.errors.DialRefusedError` when the policy refuses."""
        gate = self.dial_gate
        if gate is None:
            return self._dial_own(client_key, proto, address, timeout, skip)
        with gate.admit(client_key, proto, address, timeout,
                        lambda: self.open_connections(client_key)) as allowed_timeout:
            return self._dial_own(client_key, proto, address, allowed_timeout, skip)

    def _dial_own(
        self, client_key: str, proto: str, address: str, timeout: Optional[float],
        skip: Tuple[Type[BaseException], ...],
    ) -> Optional[TunnelConnection]:
        """Our open sessions of ``client_key``, then our suspended ones once
        they resume (within ``timeout``)."""
        sessions = self.session_manager.sessions(client_key)
        conn = dial_first(sessions, proto, address, timeout, skip)
        if conn is None:
            conn = dial_first(sessions, proto, address, timeout, skip, resumed=True)
        return conn

    def open_connections(self, client_key: str) -> int:
        """Connections open on this server's sessions of ``client_key``."""
        return sum(session.connection_count() for session in self.session_manager.sessions(client_key))

    def dials_in_flight(self, client_key: Optional[str] = None) -> int:
        """Dials admitted by the dial policy and not yet registered, through
        ``client_key`` (all keys if ``None``); 0 without a policy."""
        return self.dial_gate.in_flight(client_key) if self.dial_gate is not None else 0

    def dials_in_flight_by_key(self) -> Dict[str, int]:
        """:meth:`dials_in_flight` of every key with any (the metrics gauge)."""
        return self.dial_gate.in_flight_by_key() if self.dial_gate is not None else {}

    def _dial_refused(self, error: DialRefusedError) -> None:
        if self.observer is not None:
            self.observer.dial_refused(error.client_key, error.reason)

    def dialer(self, client_key: str) -> ClientDialer:
        """A callable ``dial(proto, address, timeout=None)`` through
        ``client_key``; its ``create_connection`` method has the shape of
        ``socket.create_connection``. The key is looked up on every call."""
        return ClientDialer(self, client_key)

    def create_connection_for(
        self, client_key: str
    ) -> Callable[..., TunnelConnection]:
        """``f((host, port), timeout=..., source_address=None)`` shaped like
        ``socket.create_connection``, dialing TCP through ``client_key``."""
        return ClientDialer(self, client_key).create_connection

    def forward(
        self,
        listen: Tuple[str, int],
        client_key: str,
        proto: str,
        address: str,
        *,
        dial_timeout: Optional[float] = None,
    ) -> PortForward:
        """Listen on ``listen`` (port 0: a free one) and forward every accepted
        TCP connection to ``proto/address`` through ``client_key``'s client,
        like ``ssh -R``. Returns the running
        :class:`~remotedialer.server.port_forward.PortForward` (``stop()`` it, or use it as
        a context manager). Raises ``OSError`` if it cannot bind."""
        spec = ForwardSpec((listen[0], int(listen[1])), client_key, proto, address)
        return start_forward(self, spec, dial_timeout=dial_timeout, piper=self.piper)

    # ---------------------------------------------------------------- queries
    def has_session(self, client_key: str) -> bool:
        """Whether ``client_key`` has an open session on this server."""
        return self.session_manager.has_session(client_key)

    def list_clients(self) -> List[str]:
        """The client keys with a session on this server, sorted."""
        return self.session_manager.client_keys()

    def sessions(self, client_key: str) -> List[Session]:
        """The sessions of ``client_key``, first (the one dials use) first."""
        return self.session_manager.sessions(client_key)

    def add_session_listener(self, listener: SessionListener, replay: bool = False) -> None:
        """Hear about client sessions added and removed; see
        :meth:`SessionManager.add_listener`."""
        self.session_manager.add_listener(listener, replay)

    def remove_session_listener(self, listener: SessionListener) -> None:
        """Stop calling ``listener``."""
        self.session_manager.remove_listener(listener)

    def disconnect(self, client_key: str, reason: str = "disconnected") -> int:
        """Close every session of ``client_key`` on this server (peers hear
        REMOVE_CLIENT as each leaves the table); returns how many there
        were. The agent may reconnect: refuse its secret first to keep it out."""
        sessions = [s for s in self.session_manager.sessions(client_key) if not s.closed]
        for session in sessions:
            session.close(reason)
        if sessions:
            log.info("disconnected %s: %d sessions (%s)", client_key, len(sessions), reason)
        return len(sessions)

    # --------------------------------------------------------------- shutdown
    def close(self, reason: str = "server closed") -> None:
        """Refuse new tunnels and end every session (their handler threads
        then return). Does not block."""
        self._closed = True
        self.peering.close()
        for session in self.session_manager.all_sessions() + self.peer_sessions.all_sessions():
            session.close(reason)
        self._local_dialer.shutdown()
