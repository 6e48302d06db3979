"""The example server, assembled: the tunnel server, the HTTP gateway, the
health endpoints, peering and scale-out.

Routes ``/connect`` to a :class:`remotedialer.server.Server` that accepts any
request carrying a non-empty ``X-Tunnel-ID`` header (its value is the client
key; with a credentials file, only with a secret or client certificate
allowing that key: :mod:`remotedialer.server.credentials`) and
``/client/<id>/<scheme>/<host>/<path...>`` to the
:class:`~remotedialer.gateway.forwarder_app.Forwarder`, which sends the
request through that client's tunnel and streams the answer back.
``remotedialer server`` serves it with the built-in front end
(:mod:`remotedialer.gateway.frontend`); under gunicorn, use the app factory::

    gunicorn -k gthread --threads 64 -b 0.0.0.0:8123 'remotedialer.cli.server:make_app()'

``make_app`` takes the same settings as keyword arguments
(``make_app(peer_id="a", peer_token="secret", peers="b:secret:ws://b:8123/connect")``)
or from the environment (``REMOTEDIALER_ID``, ``REMOTEDIALER_TOKEN``,
``REMOTEDIALER_PEERS``, ``REMOTEDIALER_DEBUG``, ``REMOTEDIALER_TIMEOUT``,
``REMOTEDIALER_ALLOW_CLIENT_CONNECT``), plus the scale-out settings for
running several instances behind a Kubernetes Service (docs/deployment.rst,
"Scale out on Kubernetes"):

==========================  ==============================  ========================
option                      ``make_app`` argument           environment
==========================  ==============================  ========================
``--peers-from-dns NAME``   ``peers_from_dns``              ``REMOTEDIALER_PEERS_FROM_DNS``
``--peer-refresh S``        ``peer_refresh``                ``REMOTEDIALER_PEER_REFRESH``
``--dns-server HOST:PORT``  ``dns_server``                  ``REMOTEDIALER_DNS_SERVER``
``--token-file PATH``       ``token_file``                  ``REMOTEDIALER_TOKEN_FILE``
``--drain-seconds S``       ``drain_seconds``               ``REMOTEDIALER_DRAIN_SECONDS``
==========================  ==============================  ========================

With discovery, this instance's peer id is ``--id`` (``REMOTEDIALER_ID``),
else ``POD_IP`` (``POD_IP:PORT`` when its port is not the name's default
port: see :mod:`remotedialer.ha.discovery`). ``/healthz`` and ``/readyz``
answer the health probes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from werkzeug.wrappers import Request

from .config import DEFAULT_LIMITS
from .examples.agent import allow_all
from .examples.logs import setup_logging
from .gateway.admin import AdminAPI
from .gateway.forwarder_app import DEFAULT_TIMEOUT, Forwarder
from .gateway.user_auth import UserGuard, client_key_from_path
from .ha.discovery import DEFAULT_REFRESH, DnsPeerDiscovery, DnsResolver, parse_dns_name, parse_dns_server
from .ha.lifecycle import DEFAULT_DRAIN_SECONDS, GracefulShutdown, chain_sigterm, is_gunicorn_worker
from .ha.peering import PeerSpec as Peer
from .ha.peering import parse_peers
from .server.credentials import CredentialStore
from .server.wsgi import Handshake, WSGIApp, plain_text_response

__all__ = [
    "ServerApp",
    "make_app",
    "make_tunnel_server",
    "wire_peers",
    "tunnel_id_authorizer",
    "ScaleOut",
    "read_token_file",
    "start_discovery",
    "DEFAULT_PORT",
    "start_proxy",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8123
"""The port peers listen on when ``NAME`` gives none (``make_app``: the
process cannot know the port gunicorn binds)."""


def read_token_file(path: str) -> str:
    """The token in ``path`` (a mounted Secret), surrounding whitespace
    stripped. Raises ``ValueError`` if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file: {exc}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


@dataclass
class ScaleOut:
    """The scale-out settings; :meth:`from_environment` fills what is ``None``."""

    peers_from_dns: Optional[str] = None
    peer_refresh: Optional[float] = None
    dns_server: Optional[str] = None
    token_file: Optional[str] = None
    drain_seconds: Optional[float] = None

    def from_environment(self) -> "ScaleOut":
        """A copy with each unset setting taken from its environment variable."""

        def pick(value: Any, name: str, default: Any) -> Any:
            return value if value is not None else os.environ.get(name) or default

        return ScaleOut(
            peers_from_dns=pick(self.peers_from_dns, "REMOTEDIALER_PEERS_FROM_DNS", ""),
            peer_refresh=float(pick(self.peer_refresh, "REMOTEDIALER_PEER_REFRESH", DEFAULT_REFRESH)),
            dns_server=pick(self.dns_server, "REMOTEDIALER_DNS_SERVER", ""),
            token_file=pick(self.token_file, "REMOTEDIALER_TOKEN_FILE", ""),
            drain_seconds=float(
                pick(self.drain_seconds, "REMOTEDIALER_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS)
            ),
        )

    def token(self, given: str) -> str:
        """The peer token: ``given`` (``--token`` or ``REMOTEDIALER_TOKEN``),
        else the token file's."""
        if given or not self.token_file:
            return given
        return read_token_file(self.token_file)

    def peer_id(self, given: str) -> str:
        """This instance's peer id: ``given``, else ``POD_IP`` when
        discovering peers."""
        if given or not self.peers_from_dns:
            return given
        return os.environ.get("POD_IP", "")

    def shutdown_for(self, server: Any, discovery: Optional[DnsPeerDiscovery]) -> GracefulShutdown:
        """The health endpoints and graceful shutdown of ``server``."""
        return GracefulShutdown(server, drain_seconds=self.drain_seconds or 0.0, discovery=discovery)


def start_discovery(
    server: Any, settings: ScaleOut, default_port: int = DEFAULT_PORT
) -> Optional[DnsPeerDiscovery]:
    """Start discovering ``server``'s peers from DNS, if asked to; ``None``
    otherwise. Raises ``ValueError`` for bad settings (no id or token, a
    malformed name or DNS server) and ``ImportError`` (saying what to
    install) without dnspython."""
    if not settings.peers_from_dns:
        return None
    scheme, name, port = parse_dns_name(settings.peers_from_dns, default_port)
    nameserver = parse_dns_server(settings.dns_server) if settings.dns_server else None
    if not server.peer_id or not server.peer_token:
        raise ValueError("--peers-from-dns needs this instance's id (--id or POD_IP) and a token "
                         "(--token, REMOTEDIALER_TOKEN or --token-file)")
    resolver = DnsResolver(nameserver)
    discovery = DnsPeerDiscovery(
        server, name, port, refresh=settings.peer_refresh or DEFAULT_REFRESH,
        scheme=scheme, lookup=resolver.endpoints,
    )
    source = f"DNS server {settings.dns_server}" if nameserver else "system resolver"
    log.info("discovering peers from %s (port %d, every %gs, %s) as %s", name, port,
             discovery.refresh_interval, source, server.peer_id)
    discovery.start()
    return discovery


def tunnel_id_authorizer(request: Request) -> Tuple[str, bool]:
    """The example authorizer: any request with a non-empty ``X-Tunnel-ID``
    header; its value is the client key."""
    client_key = request.headers.get("X-Tunnel-ID", "")
    return client_key, client_key != ""


def make_tunnel_server(
    *,
    peer_id: Optional[str] = None,
    peer_token: Optional[str] = None,
    allow_client_connect: bool = False,
    observer: Any = None,
    credentials: Optional[CredentialStore] = None,
    resume_window: Optional[float] = None,
    park_idle: bool = False,
) -> Any:
    """The :class:`remotedialer.server.Server` of the example (the connect
    endpoint and session manager). With ``credentials``, agents need a
    secret allowing their client key and dials obey its dial policy;
    without, any ``X-Tunnel-ID`` is accepted and every dial allowed.
    ``resume_window`` above 0 lets its clients' sessions survive a lost
    WebSocket that long (``None``: :attr:`Limits.resume_window
    <remotedialer.config.Limits.resume_window>`; 0: off). ``park_idle``: idle tunnels park on the shared
    poller (:attr:`Limits.park_idle <remotedialer.config.Limits.park_idle>`)."""
    from .server.tunnel_server import Server

    kwargs: Dict[str, Any] = {}
    if observer is not None:
        kwargs["observer"] = observer
    if credentials is not None:
        kwargs["dial_policy"] = credentials.dial_policy
    if resume_window is None:
        resume_window = DEFAULT_LIMITS.resume_window
    kwargs["limits"] = DEFAULT_LIMITS.replace(resume_window=resume_window, park_idle=park_idle)
    return Server(
        credentials.agent_authorizer if credentials is not None else tunnel_id_authorizer,
        client_connect_authorizer=allow_all if allow_client_connect else None,
        peer_id=peer_id or None,
        peer_token=peer_token or None,
        **kwargs,
    )


def wire_peers(server: Any, peers: List[Peer]) -> None:
    """Peer ``server`` (a :class:`~remotedialer.server.Server`) with each of
    ``peers`` (see docs/deployment.rst)."""
    for peer in peers:
        server.add_peer(peer.url, peer.peer_id, peer.token)  # raises ValueError first: no identity
        log.info("peering with %s at %s", peer.peer_id, peer.url)


class ServerApp:
    """The example server's WSGI application.

    ``/connect`` goes to the tunnel server, ``/client/...`` to the forwarder,
    and any path added with :meth:`mount` (``/metrics``, ...) to its app;
    everything else is a 404. ``connect_app`` serves ``/connect`` (the
    server, or the server behind the shutdown guard); ``shutdown`` and
    ``discovery`` are the instance's graceful shutdown and peer discovery,
    if any.
    """

    def __init__(self, server: Any, forwarder: Forwarder) -> None:
        self.server = server
        self.forwarder = forwarder
        self.connect_app: WSGIApp = server
        # connect_app as built here or by make_app (the server, or the server
        # behind the shutdown guard): only then does handshake() stand for it.
        self._connect_default: WSGIApp = server
        #: Serves ``/client/...``: the forwarder, behind :meth:`secure`'s user check.
        self.client_app: WSGIApp = forwarder
        self.shutdown: Optional[GracefulShutdown] = None
        self.discovery: Optional[DnsPeerDiscovery] = None
        #: The credentials in force (:meth:`secure`); ``None``: an open server.
        self.credentials: Optional[CredentialStore] = None
        #: The admin API under ``/admin/`` (:meth:`secure`), if any.
        self.admin: Optional[AdminAPI] = None
        self._mounts: Dict[str, WSGIApp] = {}

    def announce(self) -> None:
        """Log whether the server is open (as Go's example) or what
        credentials it holds (one line, plus a warning for a credentials
        file without policy lines: every dial is refused)."""
        store = self.credentials
        if store is None:
            log.warning("no --credentials: open server (as Go's example): any agent may claim any "
                        "client key and anyone may use /client/")
            return
        log.info("credentials from %s: %s", store.path, store.current.summary())
        if not store.current.policy.rules:
            log.warning("%s has no policy lines: every dial through an agent is refused "
                        "(add 'policy * allow=*' to allow all)", store.path)

    def secure(self, credentials: CredentialStore) -> None:
        """Require ``credentials``' users on ``/client/`` and serve the admin
        API under ``/admin/`` (the tunnel server takes the agents' side:
        :func:`make_tunnel_server`)."""
        self.credentials = credentials
        self.client_app = UserGuard(self.forwarder, credentials, client_key_from_path(self.forwarder.prefix))
        peering = getattr(self.server, "peering", None)
        remote_clients = getattr(peering, "remote_clients", None)
        self.admin = AdminAPI(self.server, credentials.authorize_admin,
                              *((remote_clients,) if remote_clients is not None else ()))

    def mount(self, path: str, app: WSGIApp) -> None:
        """Serve the exact ``path`` (e.g. ``/metrics``) with ``app``."""
        self._mounts[path] = app

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/connect":
            return self.connect_app(environ, start_response)
        if path.startswith(self.forwarder.prefix + "/"):
            return self.client_app(environ, start_response)
        if self.admin is not None and path.startswith(self.admin.prefix + "/"):
            return self.admin(environ, start_response)
        mounted = self._mounts.get(path)
        if mounted is not None:
            return mounted(environ, start_response)
        return plain_text_response(start_response, 404, "not found\n")

    def handshake(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Optional[Handshake]:
        """An upgrade request the front end read itself (see
        :meth:`Server.handshake <remotedialer.server.Server.handshake>`):
        ``/connect`` is answered on the calling thread (through the
        shutdown guard, if any); ``None`` for any other path (serve it as a
        WSGI request)."""
        if (environ.get("PATH_INFO") or "/") != "/connect":
            return None
        handshake = getattr(self.server, "handshake", None)
        if handshake is None or self.connect_app is not self._connect_default:
            return None  # the connect endpoint was replaced: WSGI only
        if self.shutdown is not None and self.shutdown.refuses(environ):
            refusal = self.server.error_writer(environ, start_response, 503, "server shutting down")
            return Handshake(refusal, None)
        result: Handshake = handshake(environ, start_response)
        return result

    def drain(self, interrupt: threading.Event) -> None:
        """Run the graceful shutdown (if any) while the HTTP server keeps
        serving; blocks until it is done. ``interrupt`` (cleared first; set
        by another stop signal) cuts the drain short."""
        if self.shutdown is None:
            return
        interrupt.clear()
        self.shutdown.begin()
        while not self.shutdown.wait(0.2):
            if interrupt.is_set():
                self.shutdown.skip_drain()

    def close(self) -> None:
        """Close every tunnel session the server holds (if it can) and the
        forwarder's idle connections."""
        if self.discovery is not None:
            self.discovery.stop()
        if self.credentials is not None:
            self.credentials.stop_watching()
        close = getattr(self.server, "close", None)
        if close is not None:
            close()
        close_forwarder = getattr(self.forwarder, "close", None)
        if close_forwarder is not None:
            close_forwarder()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def make_app(
    *,
    peer_id: Optional[str] = None,
    peer_token: Optional[str] = None,
    peers: Optional[str] = None,
    timeout: Optional[float] = None,
    allow_client_connect: Optional[bool] = None,
    debug: Optional[bool] = None,
    observer: Any = None,
    peers_from_dns: Optional[str] = None,
    peer_refresh: Optional[float] = None,
    dns_server: Optional[str] = None,
    token_file: Optional[str] = None,
    drain_seconds: Optional[float] = None,
    dns_default_port: int = DEFAULT_PORT,
    handle_sigterm: Optional[bool] = None,
    debug_endpoints: Optional[bool] = None,
    credentials: Optional[str] = None,
    announce: bool = True,
    resume_window: Optional[float] = None,
    park_idle: Optional[bool] = None,
) -> ServerApp:
    """Build the example server's WSGI app (the gunicorn app factory).

    Arguments left ``None`` come from the environment (see the module doc).
    Logging is set up if nothing configured it yet (or ``debug`` asks for it).
    ``handle_sigterm`` runs the graceful shutdown on SIGTERM and then hands
    the signal to the handler installed before; by default it does so when
    that handler is a gunicorn worker's (the app is loaded in the worker,
    i.e. without ``--preload``). ``debug_endpoints``
    (``REMOTEDIALER_DEBUG_ENDPOINTS``) serves ``/debug/sessions``: the
    instance's session table as JSON (client keys, peers, what peers
    advertised). ``credentials`` (``REMOTEDIALER_CREDENTIALS``) is the path
    of a credentials file (:mod:`remotedialer.server.credentials`): agents
    and users need secrets, dials obey its policy, ``/admin/`` serves the
    admin API, and the file is reloaded when it changes; a malformed file
    raises :class:`~remotedialer.server.credentials.CredentialsError`.
    Without it the server is open, as Go's example. ``announce`` logs
    which (:meth:`ServerApp.announce`; ``remotedialer server`` does so
    once it listens). ``park_idle`` (``REMOTEDIALER_PARK_IDLE``): idle
    tunnels park on the shared poller (:mod:`remotedialer.poller`).
    ``resume_window`` (``REMOTEDIALER_RESUME_WINDOW``, seconds, default
    :attr:`Limits.resume_window <remotedialer.config.Limits.resume_window>`;
    0: off) keeps a client's session suspended that long after its WebSocket is
    lost (the resumption extension, docs/protocol.rst).
    """
    if debug is None:
        debug = _env_flag("REMOTEDIALER_DEBUG")
    if debug or not logging.getLogger().handlers:
        setup_logging(debug)
    if peer_id is None:
        peer_id = os.environ.get("REMOTEDIALER_ID", "")
    if peer_token is None:
        peer_token = os.environ.get("REMOTEDIALER_TOKEN", "")
    if peers is None:
        peers = os.environ.get("REMOTEDIALER_PEERS", "")
    if timeout is None:
        timeout = float(os.environ.get("REMOTEDIALER_TIMEOUT", DEFAULT_TIMEOUT))
    if allow_client_connect is None:
        allow_client_connect = _env_flag("REMOTEDIALER_ALLOW_CLIENT_CONNECT")
    if resume_window is None:
        window = os.environ.get("REMOTEDIALER_RESUME_WINDOW", "")
        resume_window = float(window) if window else DEFAULT_LIMITS.resume_window
    if park_idle is None:
        park_idle = _env_flag("REMOTEDIALER_PARK_IDLE")
    scale = ScaleOut(peers_from_dns, peer_refresh, dns_server, token_file,
                              drain_seconds).from_environment()
    peer_token = scale.token(peer_token)
    peer_id = scale.peer_id(peer_id)
    peer_list = parse_peers(peers)
    if credentials is None:
        credentials = os.environ.get("REMOTEDIALER_CREDENTIALS", "")
    metrics_registry = None
    if observer is None:
        try:
            from .metrics import observer_with_registry
        except ImportError:  # the metrics extra is not installed: no /metrics
            log.debug("prometheus_client is not installed; not serving /metrics")
        else:
            observer = observer_with_registry()
            metrics_registry = observer.registry
    store = CredentialStore.load(credentials, _reload_listener(observer)) if credentials else None
    server = make_tunnel_server(
        peer_id=peer_id,
        peer_token=peer_token,
        allow_client_connect=allow_client_connect,
        observer=observer,
        credentials=store,
        resume_window=resume_window,
        park_idle=park_idle,
    )
    if observer is not None and hasattr(observer, "dials_in_flight"):
        observer.dials_in_flight = server.dials_in_flight_by_key
    forwarder = Forwarder(server.dial, default_timeout=timeout)
    forwarder.watch(server)
    app = ServerApp(server, forwarder)
    if store is not None:
        app.secure(store)
        store.start_watching()
    if announce:
        app.announce()
    if metrics_registry is not None:
        from .metrics import make_wsgi_app

        app.mount("/metrics", make_wsgi_app(metrics_registry))
    wire_peers(server, peer_list)
    try:
        app.discovery = start_discovery(server, scale, dns_default_port)
    except BaseException:
        app.close()
        raise
    app.shutdown = scale.shutdown_for(server, app.discovery)
    app.connect_app = app._connect_default = app.shutdown.guard(server)
    app.mount("/healthz", app.shutdown.healthz)
    app.mount("/readyz", app.shutdown.readyz)
    if debug_endpoints is None:
        debug_endpoints = _env_flag("REMOTEDIALER_DEBUG_ENDPOINTS")
    if debug_endpoints:
        app.mount("/debug/sessions", app.shutdown.sessions)
    if handle_sigterm is None:
        handle_sigterm = (threading.current_thread() is threading.main_thread()
                          and is_gunicorn_worker(signal.getsignal(signal.SIGTERM)))
    if handle_sigterm:
        chain_sigterm(app.shutdown)
    return app


def start_proxy(app: ServerApp, listen: Tuple[str, int], header_timeout: float = 0.0) -> Any:
    """Serve the proxy front end (:class:`~remotedialer.gateway.proxy.ProxyFrontEnd`)
    on ``listen``, dialing through ``app``'s server (so its dial policy
    applies) and checking user secrets against ``app.credentials`` when it
    has them (an open proxy otherwise, which it logs); refusals are counted
    by the server's observer (``remotedialer_proxy_refused_total`` on
    ``/metrics``). ``header_timeout`` of 0 keeps the proxy's default.
    Raises ``OSError`` if it cannot bind."""
    from .gateway.proxy import ProxyFrontEnd, ProxyLimits

    credentials = getattr(app, "credentials", None)
    authorize = credentials.authorize_user if credentials is not None else None
    limits = ProxyLimits(header_timeout=header_timeout) if header_timeout else ProxyLimits()
    observer = getattr(app.server, "observer", None)
    if observer is None:
        return ProxyFrontEnd(app.server.dial, listen, authorize=authorize, limits=limits)
    return ProxyFrontEnd(app.server.dial, listen, authorize=authorize, limits=limits, observer=observer)


def _reload_listener(observer: Any) -> Optional[Callable[[bool], None]]:
    """``observer``'s hook for credentials reloads, if it has one."""
    return getattr(observer, "credentials_reloaded", None)
