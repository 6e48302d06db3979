"""``remotedialer dummy``: a small threaded HTTP file server for tests and benchmarks.

The command line of :mod:`remotedialer.examples.file_server` (which this
module re-exports, as it held it before the re-layout).
"""

from __future__ import annotations

import argparse
import logging
import os

from ..addresses import join_host_port, reachable_host
from ..examples.file_server import BLOCK_SIZE, DummyServer, generated_bytes, generated_sha256

__all__ = ["add_arguments", "run", "DummyServer", "generated_bytes", "generated_sha256", "BLOCK_SIZE"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer dummy`` options."""
    from . import listen_address_type

    parser.add_argument(
        "--listen", default=":8125", type=listen_address_type, metavar="ADDR",
        help="listen address, HOST:PORT or :PORT (default :8125; port 0 picks a free one)",
    )
    parser.add_argument("--debug", action="store_true", help="log every request")
    parser.add_argument("directory", nargs="?", default=".", metavar="DIR",
                        help="directory to serve (default: the current one)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (SIGINT or SIGTERM); returns the exit status."""
    from . import install_stop_signals, setup_logging, wait_for_stop

    setup_logging(args.debug)
    if not os.path.isdir(args.directory):
        log.error("not a directory: %s", args.directory)
        return 2
    server = DummyServer(args.listen, args.directory)
    host = server.server_address[0]
    log.info("listening on %s serving %s", _url(str(host), server.port), server.directory)
    stop = install_stop_signals()
    server.start()
    wait_for_stop(stop)
    log.info("stopping")
    server.stop()
    return 0


def _url(host: str, port: int) -> str:
    return f"http://{join_host_port(reachable_host(host), port)}"
