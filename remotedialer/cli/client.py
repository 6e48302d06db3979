"""``remotedialer client``: connect to a server and serve its dials.

Opens a tunnel to ``--connect`` with header ``X-Tunnel-ID: <--id>``, lets the
server dial anything reachable from here (as the Go example does), and
reconnects with exponential backoff whenever the tunnel drops. SIGINT
(Ctrl-C) or SIGTERM closes the tunnel and exits 0. ``--proxy`` (or
``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``, read as a Go agent reads them)
is the proxy on the way out. Settings that cannot work (``--connect``,
``--cacert``, ``--proxy``, a proxy variable) stop it before the first attempt
with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging

from ..errors import ConfigurationError
from ..examples.agent import make_client, tls_context
from ..transports.proxy import parse_proxy_url
from ..transports.websocket_client import server_address

__all__ = ["add_arguments", "run", "make_client"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer client`` options (the Go example's flags plus TLS)."""
    parser.add_argument("--connect", default="ws://localhost:8123/connect", metavar="URL",
                        help="server URL, ws:// or wss:// (default ws://localhost:8123/connect)")
    parser.add_argument("--id", default="foo", help="client id sent as X-Tunnel-ID (default foo)")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, including every tunnel message")
    parser.add_argument("--cacert", metavar="FILE",
                        help="CA bundle to verify a wss:// server with (default: system store)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the wss:// server certificate")
    parser.add_argument("--proxy", metavar="URL",
                        help="proxy to reach the server through: http://, https://, socks5:// or "
                             "socks5h://[USER:PASSWORD@]HOST:PORT (default: HTTP_PROXY/HTTPS_PROXY/"
                             "NO_PROXY as Go reads them)")


def run(args: argparse.Namespace) -> int:
    """Keep the tunnel up until SIGINT or SIGTERM; returns the exit status."""
    from . import install_stop_signals, setup_logging, wait_for_stop

    setup_logging(args.debug)
    try:
        server_address(args.connect)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--connect: {exc}") from None
    if args.proxy:
        parse_proxy_url(args.proxy, "--proxy")
    client = make_client(args.connect, args.id, tls_context(args.cacert, args.insecure), args.proxy)
    log.info("connecting to %s as %r", args.connect, args.id)
    stop = install_stop_signals()
    client.start()
    wait_for_stop(stop)
    client.stop()
    log.info("stopped")
    return 0
