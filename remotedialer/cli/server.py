"""``remotedialer server``: the example tunnel server.

Routes ``/connect`` to a :class:`remotedialer.server.Server` that accepts any
request carrying a non-empty ``X-Tunnel-ID`` header (its value is the client
key) and ``/client/<id>/<scheme>/<host>/<path...>`` to the
:class:`~remotedialer.forwarder.Forwarder`, which sends the request through
that client's tunnel and streams the answer back.

Run it with the built-in threaded werkzeug server (``remotedialer server``) or
under gunicorn with the app factory::

    gunicorn -k gthread --threads 64 -b 0.0.0.0:8123 'remotedialer.cli.server:make_app()'

``make_app`` takes the same settings as keyword arguments
(``make_app(peer_id="a", peer_token="secret", peers="b:secret:ws://b:8123/connect")``)
or from the environment (``REMOTEDIALER_ID``, ``REMOTEDIALER_TOKEN``,
``REMOTEDIALER_PEERS``, ``REMOTEDIALER_DEBUG``, ``REMOTEDIALER_TIMEOUT``,
``REMOTEDIALER_ALLOW_CLIENT_CONNECT``).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from werkzeug.serving import ThreadedWSGIServer
from werkzeug.wrappers import Request

from ..forwarder import DEFAULT_TIMEOUT, Forwarder
from ..peering import PeerSpec as Peer
from ..peering import parse_peers

__all__ = [
    "add_arguments",
    "run",
    "make_app",
    "make_tunnel_server",
    "ServerApp",
    "Peer",
    "parse_peers",
    "wire_peers",
    "tunnel_id_authorizer",
    "BoundedThreadedWSGIServer",
]

log = logging.getLogger(__name__)

WSGIApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Threads the built-in server may run at once: one per tunnel plus one per
#: request in flight. Further connections wait to be accepted.
DEFAULT_MAX_THREADS = 1024


def tunnel_id_authorizer(request: Request) -> Tuple[str, bool]:
    """The example authorizer: any request with a non-empty ``X-Tunnel-ID``
    header; its value is the client key."""
    client_key = request.headers.get("X-Tunnel-ID", "")
    return client_key, client_key != ""


def _allow_all(proto: str, address: str) -> bool:
    return True


def make_tunnel_server(
    *,
    peer_id: Optional[str] = None,
    peer_token: Optional[str] = None,
    allow_client_connect: bool = False,
    observer: Any = None,
) -> Any:
    """The :class:`remotedialer.server.Server` of the example (the connect
    endpoint and session manager)."""
    from ..server import Server

    kwargs: Dict[str, Any] = {}
    if observer is not None:
        kwargs["observer"] = observer
    return Server(
        tunnel_id_authorizer,
        client_connect_authorizer=_allow_all if allow_client_connect else None,
        peer_id=peer_id or None,
        peer_token=peer_token or None,
        **kwargs,
    )


def wire_peers(server: Any, peers: List[Peer]) -> None:
    """Connect ``server`` to each peer (peering, see docs/). A server without
    peering support only logs that the peers are ignored."""
    if not peers:
        return
    add_peer = getattr(server, "add_peer", None)
    if add_peer is None:
        log.warning("peering is not available in this build; ignoring %d peer(s)", len(peers))
        return
    for peer in peers:
        log.info("peering with %s at %s", peer.peer_id, peer.url)
        add_peer(peer.url, peer.peer_id, peer.token)


class ServerApp:
    """The example server's WSGI application.

    ``/connect`` goes to the tunnel server, ``/client/...`` to the forwarder,
    and any path added with :meth:`mount` (``/metrics``, ...) to its app;
    everything else is a 404.
    """

    def __init__(self, server: Any, forwarder: Forwarder) -> None:
        self.server = server
        self.forwarder = forwarder
        self._mounts: Dict[str, WSGIApp] = {}

    def mount(self, path: str, app: WSGIApp) -> None:
        """Serve the exact ``path`` (e.g. ``/metrics``) with ``app``."""
        self._mounts[path] = app

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/connect":
            return self.server(environ, start_response)  # type: ignore[no-any-return]
        if path.startswith(self.forwarder.prefix + "/"):
            return self.forwarder(environ, start_response)
        mounted = self._mounts.get(path)
        if mounted is not None:
            return mounted(environ, start_response)
        body = b"not found\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def close(self) -> None:
        """Close every tunnel session the server holds (if it can)."""
        close = getattr(self.server, "close", None)
        if close is not None:
            close()


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
) -> ServerApp:
    """Build the example server's WSGI app (the gunicorn app factory).

    Arguments left ``None`` come from the environment (see the module doc).
    Logging is set up if nothing configured it yet (or ``debug`` asks for it).
    """
    if debug is None:
        debug = _env_flag("REMOTEDIALER_DEBUG")
    if debug or not logging.getLogger().handlers:
        from . import setup_logging

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
    peer_list = parse_peers(peers)
    metrics_registry = None
    if observer is None:
        try:
            from ..metrics import observer_with_registry
        except ImportError:  # the metrics extra is not installed: no /metrics
            log.debug("prometheus_client is not installed; not serving /metrics")
        else:
            observer = observer_with_registry()
            metrics_registry = observer.registry
    server = make_tunnel_server(
        peer_id=peer_id,
        peer_token=peer_token,
        allow_client_connect=allow_client_connect,
        observer=observer,
    )
    app = ServerApp(server, Forwarder(server.dial, default_timeout=timeout))
    if metrics_registry is not None:
        from ..metrics import make_wsgi_app

        app.mount("/metrics", make_wsgi_app(metrics_registry))
    wire_peers(server, peer_list)
    return app


class BoundedThreadedWSGIServer(ThreadedWSGIServer):
    """werkzeug's threaded server with at most ``max_threads`` request threads.

    A WebSocket tunnel holds its thread for as long as it lives, and so does a
    streamed download; when all threads are busy, new connections wait in the
    listen backlog instead of spawning more threads.
    """

    def __init__(self, host: str, port: int, app: WSGIApp, max_threads: int = DEFAULT_MAX_THREADS,
                 **kwargs: Any) -> None:
        self.max_threads = max_threads
        self._slots = threading.BoundedSemaphore(max_threads)
        self._stopping = threading.Event()
        super().__init__(host, port, app, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._slots.acquire(timeout=0.5):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer server`` options (the Go example's flags and a few more)."""
    from . import _listen_type

    parser.add_argument("--listen", default=":8123", type=_listen_type, metavar="ADDR",
                        help="listen address, HOST:PORT or :PORT (default :8123)")
    parser.add_argument("--id", default="", help="peer id of this server (peering)")
    parser.add_argument("--token", default="", help="peer token shared by the servers (peering)")
    parser.add_argument("--peers", default="", metavar="ID:TOKEN:URL,...",
                        help="peers to route through, id:token:url,id:token:url")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, including every tunnel message")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="default idle timeout of /client/ requests (default 15; ?timeout=N overrides)")
    parser.add_argument("--allow-client-connect", action="store_true",
                        help="let clients dial through this server (the Go example allows it)")
    parser.add_argument("--max-threads", type=int, default=DEFAULT_MAX_THREADS, metavar="N",
                        help="request threads at most: tunnels + requests in flight "
                             f"(default {DEFAULT_MAX_THREADS})")
    parser.add_argument("--forward", action="append", default=[], metavar="LISTEN=CLIENT:PROTO:ADDRESS",
                        help="forward a TCP port through a client, like ssh -R (repeatable), "
                             "e.g. 127.0.0.1:9125=foo:tcp:127.0.0.1:8125")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    from ..forward import parse_forward_spec
    from . import install_stop_signals

    try:
        app = make_app(
            peer_id=args.id,
            peer_token=args.token,
            peers=args.peers,
            timeout=args.timeout,
            allow_client_connect=args.allow_client_connect,
            debug=args.debug,
        )
        specs = [parse_forward_spec(text) for text in args.forward]
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    host, port = args.listen
    httpd = BoundedThreadedWSGIServer(host, port, app, max_threads=args.max_threads)
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else (f"[{host}]" if ":" in host else host)
    log.info("listening on http://%s:%d (connect: ws://%s:%d/connect)", shown, httpd.port, shown, httpd.port)
    try:
        forwards = [app.server.forward(s.listen, s.client_key, s.proto, s.address) for s in specs]
    except OSError as exc:
        log.error("cannot listen for --forward: %s", exc)
        app.close()
        httpd.server_close()
        return 1
    stop = install_stop_signals()
    thread = threading.Thread(target=httpd.serve_forever, name="remotedialer-http", daemon=True)
    thread.start()
    stop.wait()
    for forward in forwards:
        forward.stop()
    httpd.shutdown()
    app.close()
    httpd.server_close()
    log.info("stopped")
    return 0
