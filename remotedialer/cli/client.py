"""``remotedialer client``: connect to a server and serve its dials.

Opens a tunnel to ``--connect`` with header ``X-Tunnel-ID: <--id>``, lets the
server dial anything reachable from here (as the Go example does), and
reconnects with exponential backoff whenever the tunnel drops. SIGINT
(Ctrl-C) or SIGTERM closes the tunnel and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import urllib.parse
from typing import Optional

from ..examples.agent import make_client

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


def run(args: argparse.Namespace) -> int:
    """Keep the tunnel up until SIGINT or SIGTERM; returns the exit status."""
    from . import install_stop_signals, setup_logging, wait_for_stop

    setup_logging(args.debug)
    url = urllib.parse.urlsplit(args.connect)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        log.error("invalid --connect URL %r: want ws://HOST:PORT/PATH or wss://...", args.connect)
        return 2
    context: Optional[ssl.SSLContext] = None
    if args.cacert or args.insecure:
        context = ssl.create_default_context(cafile=args.cacert)
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    client = make_client(args.connect, args.id, context)
    log.info("connecting to %s as %r", args.connect, args.id)
    stop = install_stop_signals()
    client.start()
    wait_for_stop(stop)
    client.stop()
    log.info("stopped")
    return 0
