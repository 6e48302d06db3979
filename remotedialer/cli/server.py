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
``REMOTEDIALER_ALLOW_CLIENT_CONNECT``), plus the scale-out settings of
:mod:`remotedialer.cli.scaleout` (peers from DNS, drain on SIGTERM).
``/healthz`` and ``/readyz`` answer the health probes.
"""

from __future__ import annotations

import argparse
import email.utils
import http.client
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wrappers import Request
from werkzeug.wsgi import LimitedStream

from ..addresses import join_host_port, reachable_host
from ..ha.discovery import DnsPeerDiscovery
from ..forwarder import DEFAULT_TIMEOUT, Forwarder, poll_readable
from ..gateway.http1 import (
    MAX_HEADER_LINE,
    MAX_REQUEST_HEADERS,
    parse_request_header_line,
    request_framing_error,
    request_version_error,
)
from ..server.wsgi import WSGIApp, header_tokens, plain_text_response
from ..ha.lifecycle import GracefulShutdown, chain_sigterm, is_gunicorn_worker
from ..ha.peering import PeerSpec as Peer
from ..ha.peering import parse_peers
from . import scaleout
from .request_framing import ChunkedRequestBody

__all__ = [
    "add_arguments",
    "run",
    "make_app",
    "make_tunnel_server",
    "ServerApp",
    "tunnel_id_authorizer",
    "BoundedThreadedWSGIServer",
    "default_max_threads",
    "tune_interpreter_for_many_threads",
    "raise_open_files_limit",
]

log = logging.getLogger(__name__)

#: Threads the built-in server may run at once when the descriptor limit is
#: unknown: one per tunnel plus one per request in flight. Further connections
#: wait to be accepted. See :func:`default_max_threads`.
DEFAULT_MAX_THREADS = 1024

#: Descriptors kept free for everything that is not a request's socket
#: (listeners, log files, dials through tunnels...) when sizing the thread cap.
_RESERVED_DESCRIPTORS = 256

#: Stack reserved per request thread (``threading.stack_size``). A tunnel's
#: reader touches about 12 KiB of it; 8 MiB (the usual default) only costs
#: address space, but 10,000 tunnels would reserve 80 GiB of it.
THREAD_STACK_SIZE = 1024 * 1024

#: ``sys.setswitchinterval`` of a server process. Every thread waiting for
#: the GIL wakes up once per interval; with thousands of tunnel threads the
#: default 5 ms meant a million futex wake-ups a second, and past ~6,000
#: tunnels the server stopped accepting and answering pings. 50 ms carried
#: 10,000 tunnels for 75 s but fell behind in a 5-minute hold on a loaded
#: machine (pongs up to 233 s late); 0.5 s held 10,000 for 3 minutes with
#: every pong within 0.4 s. The threads are I/O-bound and release the GIL on
#: every socket call, so a longer interval only delays the neighbours of a
#: CPU-bound request (1 KiB GETs with 3,000 idle tunnels were no slower).
SWITCH_INTERVAL = 0.5


def tune_interpreter_for_many_threads() -> None:
    """Set :data:`SWITCH_INTERVAL` (if the interval is still shorter), as
    ``remotedialer server`` does at start; under gunicorn, call it from the
    ``post_worker_init`` hook (docs/deployment.rst)."""
    if sys.getswitchinterval() < SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


#: Connections waiting in the listen queue (the kernel caps it at somaxconn):
#: werkzeug's 128 overflowed when agents reconnected all at once.
LISTEN_BACKLOG = 4096


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (as Go programs do at
    start); return the soft limit now in force (0: unknown or unlimited)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # pragma: no cover - e.g. macOS caps at OPEN_MAX
            pass
    return 0 if soft == resource.RLIM_INFINITY else int(soft)


def default_max_threads(open_files: int) -> int:
    """The thread cap for a process allowed ``open_files`` descriptors: each
    tunnel and each request holds one descriptor and one thread, so a cap
    below the descriptor limit only stops tunnels that could be served
    (about 31-35 KiB of RSS each, see docs/deployment.rst)."""
    if open_files <= 0:
        return DEFAULT_MAX_THREADS
    return max(64, open_files - _RESERVED_DESCRIPTORS)

#: Seconds an idle keep-alive connection of the built-in server is kept open
#: waiting for its next request (``--keepalive``; 0 closes after each request).
DEFAULT_KEEPALIVE_TIMEOUT = 30.0


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
    """Peer ``server`` (a :class:`~remotedialer.server.Server`) with each of
    ``peers`` (see docs/deployment.rst)."""
    for peer in peers:
        log.info("peering with %s at %s", peer.peer_id, peer.url)
        server.add_peer(peer.url, peer.peer_id, peer.token)


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
        self.shutdown: Optional[GracefulShutdown] = None
        self.discovery: Optional[DnsPeerDiscovery] = None
        self._mounts: Dict[str, WSGIApp] = {}

    def mount(self, path: str, app: WSGIApp) -> None:
        """Serve the exact ``path`` (e.g. ``/metrics``) with ``app``."""
        self._mounts[path] = app

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/connect":
            return self.connect_app(environ, start_response)
        if path.startswith(self.forwarder.prefix + "/"):
            return self.forwarder(environ, start_response)
        mounted = self._mounts.get(path)
        if mounted is not None:
            return mounted(environ, start_response)
        return plain_text_response(start_response, 404, "not found\n")

    def close(self) -> None:
        """Close every tunnel session the server holds (if it can) and the
        forwarder's idle connections."""
        if self.discovery is not None:
            self.discovery.stop()
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
    dns_default_port: int = scaleout.DEFAULT_PORT,
    handle_sigterm: Optional[bool] = None,
    debug_endpoints: Optional[bool] = None,
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
    advertised).
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
    scale = scaleout.ScaleOut(peers_from_dns, peer_refresh, dns_server, token_file,
                              drain_seconds).from_environment()
    peer_token = scale.token(peer_token)
    peer_id = scale.peer_id(peer_id)
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
    forwarder = Forwarder(server.dial, default_timeout=timeout)
    forwarder.watch(server)
    app = ServerApp(server, forwarder)
    if metrics_registry is not None:
        from ..metrics import make_wsgi_app

        app.mount("/metrics", make_wsgi_app(metrics_registry))
    wire_peers(server, peer_list)
    try:
        app.discovery = scaleout.start_discovery(server, scale, dns_default_port)
    except BaseException:
        app.close()
        raise
    app.shutdown = scale.shutdown_for(server, app.discovery)
    app.connect_app = app.shutdown.guard(server)
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


#: Request bodies left unread by the app are read and dropped up to this many
#: bytes to keep the connection; a longer rest closes it.
_MAX_DRAIN = 256 * 1024
_LARGE_CHUNK = 64 * 1024



class KeepAliveRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler with HTTP/1.1 keep-alive.

    werkzeug's own handler answers every request with ``Connection: close``;
    this one keeps a connection open for the next request when that is safe:
    an HTTP/1.1 request that did not ask to close, whose body (if any) was
    read or can be drained, answered with a framed response (``Content-Length``
    honoured exactly, or chunked) that the app finished without error. A
    WebSocket takeover or an app that fails or aborts mid-body closes the
    connection (an aborted chunked body is never terminated, so the client
    sees the truncation). Between requests the thread waits at most the
    server's ``keepalive_timeout`` (and not past the server's shutdown).
    Sets ``TCP_NODELAY``; the access log is at DEBUG level (this module's
    logger).

    Kept instead of werkzeug's own handler after measuring both
    (docs/benchmarks.rst, "Libraries against the hand-written code"): with a
    new connection per request, werkzeug's server cost 2.7-3.4x the server
    CPU per 1 KiB GET and 46-70 % of the request rate.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    rbufsize = 512
    #: ``(second, Date header value)`` of the last response: formatted once a second.
    _date_cache: Tuple[int, str] = (0, "")

    def handle(self) -> None:
        self._requests_served = 0
        super().handle()

    def handle_one_request(self) -> None:
        """Wait for the next request (after the first), then serve it."""
        if self._requests_served and not self._wait_for_request():
            self.close_connection = True
            return
        self._requests_served += 1
        super().handle_one_request()

    def _wait_for_request(self) -> bool:
        """Block until the next request starts arriving (True), or until the
        keep-alive timeout passes or the server stops (False)."""
        sock = self.connection
        try:
            sock.setblocking(False)
            try:
                rfile: Any = self.rfile
                if rfile.peek(1):  # already buffered (pipelined)
                    return True
            except ssl.SSLWantReadError:
                pass
            finally:
                sock.setblocking(True)
        except OSError:
            return False
        deadline = time.monotonic() + float(getattr(self.server, "keepalive_timeout", 0.0))
        stopping = getattr(self.server, "stopping", None)
        give_up_slot = getattr(self.server, "give_up_idle_slot", None)
        while True:
            if stopping is not None and stopping.is_set():
                return False
            if give_up_slot is not None and give_up_slot():
                return False  # a new connection waits for this thread
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if poll_readable(sock, min(remaining, 0.5)):
                return True  # data, or EOF which the request reader sees

    def parse_request(self) -> bool:
        """Parse the request line and headers (``http.server``'s contract:
        False means an error answer was sent).

        An ``HTTP/1.1`` or ``HTTP/1.0`` request line takes a fast path: the
        header lines are split here instead of by the ``email`` package (the
        front end's largest cost per request); a malformed header line or an
        obsolete folded one is answered with 400, more than 100 lines or one
        over 64 KiB with 431. Against request smuggling, lines must end in
        CRLF, values hold no CR or NUL, and the body's framing must be
        unambiguous (:func:`~remotedialer.gateway.http1.request_framing_error`);
        another ``HTTP/x.y`` version is answered with 505. A request line
        without a version (HTTP/0.9) goes to ``http.server``."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if len(words) != 3:
            return bool(super().parse_request())
        self.request_version = "HTTP/1.0"  # for the error answers below
        refused = request_version_error(words[2])
        if refused is not None:
            self.close_connection = True
            self.send_error(*refused)
            return False
        if not self.raw_requestline.endswith(b"\r\n"):
            self.close_connection = True
            self.send_error(400, "Request line not ended by CRLF")
            return False
        self.requestline = requestline
        self.command, path, self.request_version = words
        if path.startswith("//"):  # as http.server (gh-87389)
            path = "/" + path.lstrip("/")
        self.path = path
        self.close_connection = self.request_version == "HTTP/1.0"
        headers = self._read_headers()
        if headers is None:
            return False
        self.headers = headers
        connection = header_tokens(headers.get("Connection", ""))
        if "close" in connection:
            self.close_connection = True
        elif "keep-alive" in connection:
            self.close_connection = False
        if headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            return bool(self.handle_expect_100())
        return True

    def _read_headers(self) -> Optional[http.client.HTTPMessage]:
        """Read the header lines up to the empty line; None after answering
        an error. Blocks on the socket (its timeout applies)."""
        fields: List[Tuple[str, str]] = []
        readline = self.rfile.readline
        while True:
            line = readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, "Line too long", "header line")
                return None
            if line in (b"\r\n", b""):
                break
            if len(fields) >= MAX_REQUEST_HEADERS:
                self.send_error(431, "Too many headers", f"got more than {MAX_REQUEST_HEADERS} headers")
                return None
            field = parse_request_header_line(line)
            if field is None:
                self.send_error(400, "Bad request header")
                return None
            fields.append(field)
        refused = request_framing_error(self.request_version, fields)
        if refused is not None:
            self.send_error(*refused)
            return None
        message: http.client.HTTPMessage = self.MessageClass()
        for name, value in fields:
            message[name] = value
        return message

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        """The ``Date`` header value; the current one is formatted once a second."""
        if timestamp is not None:
            return str(super().date_time_string(timestamp))
        now = int(time.time())
        cached = KeepAliveRequestHandler._date_cache
        if cached[0] != now:
            cached = (now, email.utils.formatdate(now, usegmt=True))
            KeepAliveRequestHandler._date_cache = cached
        return cached[1]

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug('%s "%s" %s %s', self.address_string(), self.requestline, code, size)

    def run_wsgi(self) -> None:
        """Serve one request with ``self.server.app``."""
        if self.headers.get("Expect", "").lower().strip() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.environ = environ = self.make_environ()
        keep_alive = (
            not self.close_connection
            and self.request_version == "HTTP/1.1"
            and float(getattr(self.server, "keepalive_timeout", 0.0)) > 0
        )
        body: Optional[LimitedStream] = None
        if "wsgi.input_terminated" in environ:
            keep_alive = False  # chunked request body: its end is not tracked here
            environ["wsgi.input"] = ChunkedRequestBody(self.rfile)  # type: ignore[arg-type]
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = -1
            if length < 0:
                keep_alive = False
            elif length > 0:
                body = LimitedStream(self.rfile, length)  # type: ignore[arg-type]
                environ["wsgi.input"] = body
        response = _ResponseWriter(self, environ, keep_alive)
        try:
            app_iter = self.server.app(environ, response.start_response)
            try:
                for data in app_iter:
                    response.write(data)
                response.finish()
            finally:
                close = getattr(app_iter, "close", None)
                if close is not None:
                    close()
        except (ConnectionError, socket.timeout, ssl.SSLEOFError) as exc:
            # The client went away, the app aborted the response, or the
            # socket was taken over (WebSocket): write nothing more.
            self.close_connection = True
            self.connection_dropped(exc, environ)
            return
        except Exception:
            self.close_connection = True
            if self.server.passthrough_errors:
                raise
            log.exception("error on request %s", self.requestline)
            if not response.head_sent:
                response.send_error_response()
            return
        if not response.keep_alive or not _drained(body):
            self.close_connection = True


def _drained(body: Optional[LimitedStream]) -> bool:
    """Read and drop what the app left of a request body; False if too much
    is left or the client went away."""
    if body is None or body.is_exhausted:
        return True
    left = _MAX_DRAIN
    try:
        while not body.is_exhausted and left > 0:
            data = body.read(min(left, _LARGE_CHUNK))
            if not data:
                return False
            left -= len(data)
    except Exception:  # ClientDisconnected, OSError
        return False
    return body.is_exhausted


class _ResponseWriter:
    """``start_response``/``write`` of one request on a
    :class:`KeepAliveRequestHandler`: frames the body and decides whether the
    connection can be kept."""

    def __init__(self, handler: KeepAliveRequestHandler, environ: Dict[str, Any], keep_alive: bool) -> None:
        self.handler = handler
        self.is_head = environ.get("REQUEST_METHOD") == "HEAD"
        self.keep_alive = keep_alive
        self.status: Optional[str] = None
        self.headers: List[Tuple[str, str]] = []
        self.head_sent = False
        self.has_body = True
        self.chunked = False
        self.length: Optional[int] = None
        self.written = 0

    def start_response(self, status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice")
        self.status = status
        self.headers = list(headers)
        return self.write

    def _head(self) -> bytes:
        """The response head (status line, ``Server``, ``Date``, the app's
        headers and the framing ones); decides chunking and keep-alive."""
        if self.status is None:
            raise AssertionError("write() before start_response")
        code_text, _, reason = self.status.partition(" ")
        code = int(code_text)
        self.has_body = not (self.is_head or 100 <= code < 200 or code in (204, 304))
        handler = self.handler
        handler.log_request(code)
        if handler.request_version == "HTTP/0.9":
            return b""
        lines = [
            f"{handler.protocol_version} {code} {reason}\r\n"
            f"Server: {handler.version_string()}\r\nDate: {handler.date_time_string()}\r\n"
        ]
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self.keep_alive = False
            elif lowered == "connection":
                if "close" in header_tokens(value):
                    self.keep_alive = False
                continue  # hop-by-hop: decided here
            lines.append(f"{name}: {value}\r\n")
        if self.has_body and self.length is None:
            if handler.request_version == "HTTP/1.1":
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends where the connection does
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1", "strict")

    def write(self, data: bytes) -> None:
        """Send ``data`` (after the head, if not sent yet: a small first
        piece goes out with it in one write); blocks on the socket."""
        head = b""
        if not self.head_sent:
            head = self._head()
        wfile = self.handler.wfile
        if not data or not self.has_body:
            if head:
                wfile.write(head)
            self.head_sent = True
            return
        if len(data) > _LARGE_CHUNK:
            prefix = head + (b"%x\r\n" % len(data) if self.chunked else b"")
            if prefix:
                wfile.write(prefix)
            wfile.write(data)
            if self.chunked:
                wfile.write(b"\r\n")
        elif self.chunked:
            wfile.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))
        else:
            wfile.write(head + data if head else data)
        self.head_sent = True
        self.written += len(data)

    def finish(self) -> None:
        """The app's iterable ended: complete the response."""
        if not self.head_sent:
            self.write(b"")
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")
        elif self.has_body and self.length is not None and self.written != self.length:
            self.keep_alive = False  # the body does not match its length: the client must see it end

    def send_error_response(self) -> None:
        """The app failed before sending anything: 500, then close."""
        body = b"Internal Server Error\n"
        handler = self.handler
        handler.send_response(500, "Internal Server Error")
        handler.send_header("Content-Type", "text/plain; charset=utf-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)


class BoundedThreadedWSGIServer(ThreadedWSGIServer):
    """werkzeug's threaded server with at most ``max_threads`` request threads
    and HTTP/1.1 keep-alive (:class:`KeepAliveRequestHandler`, idle
    connections closed after ``keepalive_timeout`` seconds; 0 closes each
    connection after one request).

    A WebSocket tunnel holds its thread for as long as it lives, and so does a
    streamed download; when all threads are busy, new connections wait in the
    listen backlog instead of spawning more threads. An idle keep-alive
    connection gives up its thread (within half a second) when a new
    connection waits for one.
    """

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, host: str, port: int, app: WSGIApp, max_threads: int = DEFAULT_MAX_THREADS,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT, **kwargs: Any) -> None:
        self.max_threads = max_threads
        self.keepalive_timeout = keepalive_timeout
        self._slots = threading.BoundedSemaphore(max_threads)
        self._stopping = threading.Event()
        self.stopping = self._stopping
        # Connections waiting for a slot, and idle keep-alive connections
        # closing to free one for them; both guarded by _claims_lock.
        self._claims_lock = threading.Lock()
        self._slots_wanted = 0
        self._slots_freeing = 0
        kwargs.setdefault("handler", KeepAliveRequestHandler)
        super().__init__(host, port, app, **kwargs)

    def give_up_idle_slot(self) -> bool:
        """For an idle keep-alive connection: whether it should close so that
        a waiting connection gets its thread (True for one idle connection
        per waiting one)."""
        if not self._slots_wanted:
            return False
        with self._claims_lock:
            if self._slots_wanted > self._slots_freeing:
                self._slots_freeing += 1
                return True
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with self._claims_lock:
                self._slots_wanted += 1
            try:
                while not self._slots.acquire(timeout=0.5):
                    if self._stopping.is_set():
                        self.shutdown_request(request)
                        return
            finally:
                with self._claims_lock:
                    self._slots_wanted -= 1
                    self._slots_freeing = max(0, min(self._slots_freeing - 1, self._slots_wanted))
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


#: Shown at the end of ``remotedialer server --help``, as README.rst says it.
HELP_EPILOG = (
    "WARNING: for testing and demos only, as in Go: this server is an open relay. "
    "Anyone who can reach it may open a tunnel with any X-Tunnel-ID and reach anything "
    "through any client via /client/. The default --listen :8123 listens on every "
    "interface: use --listen 127.0.0.1:8123 or put it behind authentication; real "
    "deployments build a remotedialer.Server with their own authorizer."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer server`` options (the Go example's flags and a few more)."""
    from . import listen_address_type

    parser.add_argument("--listen", default=":8123", type=listen_address_type, metavar="ADDR",
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
    parser.add_argument("--max-threads", type=int, default=None, metavar="N",
                        help="request threads at most: tunnels + requests in flight (default: the "
                             f"open-files limit, raised to its hard limit, minus {_RESERVED_DESCRIPTORS})")
    parser.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE_TIMEOUT, metavar="SECONDS",
                        help="keep idle HTTP/1.1 connections open this long for their next request "
                             f"(default {DEFAULT_KEEPALIVE_TIMEOUT:g}; 0: close after each request)")
    parser.add_argument("--forward", action="append", default=[], metavar="LISTEN=CLIENT:PROTO:ADDRESS",
                        type=_forward_type,
                        help="forward a TCP port through a client, like ssh -R (repeatable), "
                             "e.g. 127.0.0.1:9125=foo:tcp:127.0.0.1:8125; PROTO is tcp, tcp4, "
                             "tcp6 or unix")
    scaleout.add_arguments(parser)


def _forward_type(text: str) -> Any:
    """``--forward``: a :class:`~remotedialer.forward.ForwardSpec`; a bad one
    is a usage error (exit status 2) saying why."""
    from ..server.port_forward import parse_forward_spec

    try:
        return parse_forward_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    from . import install_stop_signals, wait_for_stop

    try:
        scale = scaleout.from_args(args)
        app = make_app(
            peer_id=args.id or None,
            peer_token=args.token or None,
            peers=args.peers,
            timeout=args.timeout,
            allow_client_connect=args.allow_client_connect,
            debug=args.debug,
            peers_from_dns=scale.peers_from_dns,
            peer_refresh=scale.peer_refresh,
            dns_server=scale.dns_server,
            token_file=scale.token_file,
            drain_seconds=scale.drain_seconds,
            dns_default_port=args.listen[1],
            handle_sigterm=False,
        )
        specs = list(args.forward)  # ForwardSpecs, checked by _forward_type
    except (ValueError, ImportError) as exc:
        log.error("%s", exc)
        return 2
    host, port = args.listen
    open_files = raise_open_files_limit()
    tune_interpreter_for_many_threads()
    max_threads = args.max_threads or default_max_threads(open_files)
    threading.stack_size(THREAD_STACK_SIZE)  # threads started from here on
    httpd = BoundedThreadedWSGIServer(host, port, app, max_threads=max_threads,
                                      keepalive_timeout=args.keepalive)
    log.info("serving at most %d tunnels and requests at once (open files: %s)",
             max_threads, open_files or "unlimited")
    shown = join_host_port(reachable_host(host), httpd.port)
    log.info("listening on http://%s (connect: ws://%s/connect)", shown, shown)
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
    wait_for_stop(stop)
    _drain(app, stop)
    for forward in forwards:
        forward.stop()
    httpd.shutdown()
    app.close()
    httpd.server_close()
    log.info("stopped")
    return 0


def _drain(app: ServerApp, stop: threading.Event) -> None:
    """Run the graceful shutdown while the HTTP server keeps serving; another
    stop signal cuts the drain short."""
    if app.shutdown is None:
        return
    stop.clear()
    app.shutdown.begin()
    while not app.shutdown.wait(0.2):
        if stop.is_set():
            app.shutdown.skip_drain()
