"""``remotedialer server``: the example tunnel server.

The command line of :mod:`remotedialer.app` (the app: ``/connect``,
``/client/<id>/<scheme>/<host>/<path...>``, health, peering, scale-out)
served by the built-in front end (:mod:`remotedialer.gateway.frontend`)
with the process settings of :mod:`remotedialer.server.process`. Under
gunicorn, use the app factory, re-exported here::

    gunicorn -k gthread --threads 64 -b 0.0.0.0:8123 'remotedialer.cli.server:make_app()'
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import threading
from typing import Any

from ..addresses import join_host_port, reachable_host
from ..app import (
    DEFAULT_PORT,
    ScaleOut,
    ServerApp,
    make_app,
    make_tunnel_server,
    start_proxy,
    tunnel_id_authorizer,
    wire_peers,
)
from ..config import DEFAULT_LIMITS
from ..examples.logs import lean_log_records
from ..gateway.forwarder_app import DEFAULT_TIMEOUT
from ..gateway.frontend import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    BoundedThreadedWSGIServer,
    server_tls_context,
)
from ..ha.discovery import DEFAULT_REFRESH
from ..ha.lifecycle import DEFAULT_DRAIN_SECONDS
from ..server.process import (
    DEFAULT_MAX_THREADS,
    RESERVED_DESCRIPTORS,
    SWITCH_INTERVAL,
    THREAD_STACK_SIZE,
    default_max_threads,
    raise_open_files_limit,
    tune_interpreter_for_many_threads,
)

__all__ = [
    "add_arguments",
    "run",
    # Re-exported: the gunicorn app factory and what this module held before
    # the re-layout (issue 23).
    "make_app",
    "make_tunnel_server",
    "ServerApp",
    "tunnel_id_authorizer",
    "wire_peers",
    "BoundedThreadedWSGIServer",
    "default_max_threads",
    "tune_interpreter_for_many_threads",
    "raise_open_files_limit",
    "DEFAULT_MAX_THREADS",
    "SWITCH_INTERVAL",
    "DEFAULT_PORT",
]

log = logging.getLogger(__name__)


#: Shown at the end of ``remotedialer server --help``, as README.rst says it.
HELP_EPILOG = (
    "WARNING: without --credentials this server is an open relay, as Go's example: "
    "anyone who can reach it may open a tunnel with any X-Tunnel-ID and reach anything "
    "through any client via /client/. The default --listen :8123 listens on every "
    "interface: use --listen 127.0.0.1:8123, or give --credentials (agent and user "
    "secrets, dial policy; see the docs page 'Running the server for real')."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer server`` options (the Go example's flags and a few more)."""
    from . import listen_address_type, positive_int, seconds

    parser.add_argument("--listen", default=":8123", type=listen_address_type, metavar="ADDR",
                        help="listen address, HOST:PORT or :PORT (default :8123)")
    parser.add_argument("--id", default="", help="peer id of this server (peering)")
    parser.add_argument("--token", default="", help="peer token shared by the servers (peering)")
    parser.add_argument("--peers", default="", metavar="ID:TOKEN:URL,...",
                        help="peers to route through, id:token:url,id:token:url")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, including every tunnel message")
    parser.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="default idle timeout of /client/ requests (default 15; ?timeout=N overrides)")
    parser.add_argument("--allow-client-connect", action="store_true",
                        help="let clients dial through this server (the Go example allows it)")
    parser.add_argument("--park-idle", action="store_true",
                        help="idle tunnels wait on one shared poller, which answers their pings, "
                             "and hold no thread (REMOTEDIALER_PARK_IDLE; experimental, off by default)")
    parser.add_argument("--max-threads", type=positive_int, default=None, metavar="N",
                        help="request threads at most: tunnels + requests in flight (default: the "
                             f"open-files limit, raised to its hard limit, minus {RESERVED_DESCRIPTORS})")
    parser.add_argument("--keepalive", type=seconds, default=DEFAULT_KEEPALIVE_TIMEOUT, metavar="SECONDS",
                        help="keep idle HTTP/1.1 connections open this long for their next request "
                             f"(default {DEFAULT_KEEPALIVE_TIMEOUT:g}; 0: close after each request)")
    parser.add_argument("--header-timeout", type=seconds, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                        help="close a connection whose request head (or proxy handshake) has not "
                             f"arrived this long after it started (default {DEFAULT_HEADER_TIMEOUT:g}; "
                             "0: no limit), as Go's ReadHeaderTimeout")
    parser.add_argument("--proxy-listen", default=None, type=listen_address_type, metavar="ADDR",
                        help="also serve a proxy on ADDR (HTTP CONNECT, absolute-form HTTP and "
                             "SOCKS5 on one port): the proxy username is the client key of the "
                             "agent to go through, the password a user secret (docs/proxy.rst)")
    parser.add_argument("--credentials", metavar="FILE", default=None,
                        help="credentials file: agent and user secrets, dial policy (docs: Running the "
                             "server for real; default $REMOTEDIALER_CREDENTIALS; none: an open server)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="serve HTTPS/wss:// with this certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE",
                        help="private key of --tls-cert (default: in the --tls-cert file)")
    parser.add_argument("--client-ca", metavar="FILE",
                        help="with --tls-cert: accept agents by client certificates this CA signed "
                             "(mTLS; the certificate's name is the client key)")
    parser.add_argument("--new-secret", action="store_true",
                        help="print a new secret and its hash for the credentials file, and exit")
    parser.add_argument("--hash-secret", action="store_true",
                        help="read a secret from standard input, print its hash, and exit")
    parser.add_argument("--resume-window", type=seconds, default=DEFAULT_LIMITS.resume_window,
                        metavar="SECONDS",
                        help="keep a client's connections this long after its WebSocket is lost, "
                             f"for it to resume them (default {DEFAULT_LIMITS.resume_window:g}; "
                             "0: off, as in Go)")
    parser.add_argument("--forward", action="append", default=[], metavar="LISTEN=CLIENT:PROTO:ADDRESS",
                        type=_forward_type,
                        help="forward a TCP port through a client, like ssh -R (repeatable), "
                             "e.g. 127.0.0.1:9125=foo:tcp:127.0.0.1:8125; PROTO is tcp, tcp4, "
                             "tcp6 or unix")
    _add_scaleout_arguments(parser)


def _forward_type(text: str) -> Any:
    """``--forward``: a :class:`~remotedialer.server.port_forward.ForwardSpec`;
    a bad one is a usage error (exit status 2) saying why."""
    from ..server.port_forward import parse_forward_spec

    try:
        return parse_forward_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    from . import install_stop_signals, wait_for_stop

    if args.new_secret or args.hash_secret:
        return _secret_command(args.new_secret)
    try:
        scale = _scaleout_from_args(args)
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
            credentials=args.credentials,
            announce=False,
            resume_window=args.resume_window,
            park_idle=args.park_idle or None,
        )
        specs = list(args.forward)  # ForwardSpecs, checked by _forward_type
    except (ValueError, ImportError) as exc:
        log.error("%s", exc)
        return 2
    host, port = args.listen
    tls_context = None
    if args.tls_cert:
        try:
            tls_context = server_tls_context(args.tls_cert, args.tls_key, args.client_ca)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot use --tls-cert %s: %s", args.tls_cert, exc)
            app.close()
            return 2
    elif args.client_ca or args.tls_key:
        log.error("--tls-key and --client-ca need --tls-cert")
        app.close()
        return 2
    open_files = raise_open_files_limit()
    tune_interpreter_for_many_threads()
    lean_log_records()  # a line per tunnel: see docs/benchmarks.rst, "Accept rate"
    max_threads = args.max_threads or default_max_threads(open_files)
    threading.stack_size(THREAD_STACK_SIZE)  # threads started from here on
    httpd = BoundedThreadedWSGIServer(host, port, app, max_threads=max_threads,
                                      keepalive_timeout=args.keepalive,
                                      header_timeout=args.header_timeout or None, tls_context=tls_context,
                                      listener_handshakes=_listener_handshakes())
    log.info("serving at most %d tunnels and requests at once (open files: %s)",
             max_threads, open_files or "unlimited")
    shown = join_host_port(reachable_host(host), httpd.port)
    secure = tls_context is not None
    log.info("listening on %s://%s (connect: %s://%s/connect)", "https" if secure else "http", shown,
             "wss" if secure else "ws", shown)
    app.announce()
    try:
        forwards = [app.server.forward(s.listen, s.client_key, s.proto, s.address) for s in specs]
    except OSError as exc:
        log.error("cannot listen for --forward: %s", exc)
        app.close()
        httpd.server_close()
        return 1
    try:
        proxy = start_proxy(app, args.proxy_listen, args.header_timeout) if args.proxy_listen else None
    except OSError as exc:
        log.error("cannot listen for --proxy-listen: %s", exc)
        for forward in forwards:
            forward.stop()
        app.close()
        httpd.server_close()
        return 1
    stop = install_stop_signals()
    if app.credentials is not None:
        app.credentials.install_sighup()
    thread = threading.Thread(target=httpd.serve_forever, name="remotedialer-http", daemon=True)
    thread.start()
    wait_for_stop(stop)
    app.drain(stop)
    if proxy is not None:
        proxy.stop()
    for forward in forwards:
        forward.stop()
    httpd.shutdown()
    app.close()
    httpd.server_close()
    log.info("stopped")
    return 0


def _listener_handshakes() -> bool:
    """``REMOTEDIALER_LISTENER_HANDSHAKES=1``: tunnels' upgrades answered on
    the listener's thread (off by default: slower at 10,000 agents opening
    at once, faster at 1,000; docs/benchmarks.rst)."""
    return os.environ.get("REMOTEDIALER_LISTENER_HANDSHAKES", "").lower() in ("1", "true", "yes", "on")


def _secret_command(new: bool) -> int:
    """``--new-secret`` / ``--hash-secret``: print and return the exit status."""
    from ..server.credentials import hash_secret, new_secret

    if new:
        secret = new_secret()
        print(f"secret: {secret}    (give this to the agent or user; it is not stored)")
        print(f"hash:   {hash_secret(secret)}    (put this in the credentials file)")
        return 0
    try:
        print(hash_secret(sys.stdin.readline().strip()))
    except ValueError as exc:
        print(f"remotedialer server --hash-secret: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_scaleout_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out options of ``remotedialer server`` (see :mod:`remotedialer.app`)."""
    from . import seconds

    group = parser.add_argument_group("scale out (Kubernetes)")
    group.add_argument("--peers-from-dns", default=None, metavar="NAME[:PORT]",
                       help="peer with every instance DNS lists for NAME (a headless Service; SRV "
                            "records give ports; PORT defaults to the listen port; wss://NAME for TLS)")
    group.add_argument("--peer-refresh", type=seconds, default=None, metavar="SECONDS",
                       help=f"resolve NAME this often (default {DEFAULT_REFRESH:g})")
    group.add_argument("--dns-server", default=None, metavar="HOST[:PORT]",
                       help="ask this DNS server instead of the system resolver")
    group.add_argument("--token-file", default=None, metavar="PATH",
                       help="read the peer token from this file (a mounted Secret)")
    group.add_argument("--drain-seconds", type=seconds, default=None, metavar="SECONDS",
                       help="on SIGTERM, fail /readyz and refuse new tunnels this long before closing "
                            f"the tunnels (default {DEFAULT_DRAIN_SECONDS:g})")


def _scaleout_from_args(args: argparse.Namespace) -> ScaleOut:
    """The settings given on the command line (``None``: not given)."""
    return ScaleOut(args.peers_from_dns, args.peer_refresh, args.dns_server, args.token_file,
                    args.drain_seconds)
