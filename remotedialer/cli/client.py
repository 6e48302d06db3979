"""``remotedialer client``: connect to a server and serve its dials.

Opens a tunnel to ``--connect`` with header ``X-Tunnel-ID: <--id>``, lets the
server dial anything reachable from here (as the Go example does), and
reconnects with exponential backoff whenever the tunnel drops. SIGINT
(Ctrl-C) or SIGTERM closes the tunnel and exits 0. ``--proxy`` (or
``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``, read as a Go agent reads them)
is the proxy on the way out. A server with a credentials file needs the
agent's secret, sent as ``Authorization: Bearer``: from ``--token-file`` or
the ``REMOTEDIALER_TOKEN`` environment variable, never from the command line
(or a client certificate, ``--cert``, where the server takes them). Settings
that cannot work (``--connect``, ``--cacert``, ``--cert``, ``--token-file``,
``--proxy``, a proxy variable) stop it before the first attempt with one line
and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import urllib.parse

from ..config import DEFAULT_LIMITS
from ..errors import ConfigurationError, error_text
from ..examples.agent import make_client, tls_context
from ..transports.base import server_address
from ..transports.proxy import parse_proxy_url

__all__ = ["add_arguments", "run", "make_client", "TOKEN_ENV"]

log = logging.getLogger(__name__)

#: The environment variable holding the agent's secret.
TOKEN_ENV = "REMOTEDIALER_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer client`` options (the Go example's flags plus TLS)."""
    from . import seconds

    parser.add_argument("--connect", default="ws://localhost:8123/connect", metavar="URL",
                        help="server URL, ws:// or wss:// (default ws://localhost:8123/connect)")
    parser.add_argument("--id", default="foo", help="client id sent as X-Tunnel-ID (default foo)")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file holding the agent's secret (default: ${TOKEN_ENV}; none: no secret)")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, including every tunnel message")
    parser.add_argument("--cacert", metavar="FILE",
                        help="CA bundle to verify a wss:// server with (default: system store)")
    parser.add_argument("--cert", metavar="FILE",
                        help="client certificate (PEM) for a wss:// server that takes them (mTLS)")
    parser.add_argument("--key", metavar="FILE", help="private key of --cert (default: in the --cert file)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the wss:// server certificate")
    parser.add_argument("--proxy", metavar="URL",
                        help="proxy to reach the server through: http://, https://, socks5:// or "
                             "socks5h://[USER:PASSWORD@]HOST:PORT (default: HTTP_PROXY/HTTPS_PROXY/"
                             "NO_PROXY as Go reads them)")
    parser.add_argument("--resume-window", type=seconds, default=DEFAULT_LIMITS.resume_window,
                        metavar="SECONDS",
                        help="offer resumption: keep the tunneled connections this long when the "
                             "WebSocket is lost, reconnecting to resume them (default "
                             f"{DEFAULT_LIMITS.resume_window:g}; 0: off, as in Go)")


def run(args: argparse.Namespace) -> int:
    """Keep the tunnel up until SIGINT or SIGTERM; returns the exit status."""
    from . import install_stop_signals, read_secret, setup_logging, wait_for_stop

    setup_logging(args.debug)
    try:
        server_address(args.connect)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--connect: {exc}") from None
    if args.proxy:
        parse_proxy_url(args.proxy, "--proxy")
    try:
        secret = read_secret(args.token_file, TOKEN_ENV)
    except OSError as exc:
        raise ConfigurationError(f"--token-file {args.token_file}: {error_text(exc)}") from None
    url = urllib.parse.urlsplit(args.connect)
    if secret and url.scheme == "ws" and url.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning("sending the agent secret over plain ws:// to %s: use wss://", url.hostname)
    context = tls_context(args.cacert, args.insecure, args.cert, args.key)
    client = make_client(args.connect, args.id, context, args.proxy, secret, args.resume_window)
    log.info("connecting to %s as %r", args.connect, args.id)
    stop = install_stop_signals()
    client.start()
    wait_for_stop(stop)
    client.stop()
    log.info("stopped")
    return 0
