"""The ``remotedialer`` command: ``server``, ``client``, ``dummy`` and ``demo``.

Each subcommand lives in its own module (``server.py``, ``client.py``,
``dummy.py``, ``demo.py``) with an ``add_arguments(parser)`` and a
``run(args) -> int``; this module wires them into one argument parser and
sets up logging.

``--debug`` (or ``CATTLE_TUNNEL_DATA_DEBUG=true``) logs every protocol message
sent and received through the ``remotedialer.trace`` logger, as the Go
implementation does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "setup_logging", "parse_listen"]

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    """Log to stderr: INFO by default, DEBUG with ``debug``, only errors with
    ``quiet``. With ``debug`` or ``CATTLE_TUNNEL_DATA_DEBUG=true`` every
    protocol message is logged too (``debug`` sets that variable so that
    sessions created from now on trace)."""
    if debug:
        os.environ["CATTLE_TUNNEL_DATA_DEBUG"] = "true"
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    # werkzeug sets its logger to INFO unless told otherwise.
    logging.getLogger("werkzeug").setLevel(level)
    if os.environ.get("CATTLE_TUNNEL_DATA_DEBUG", "").lower() == "true" and level > logging.DEBUG:
        # Trace records are DEBUG: let them (and only them) through.
        root.setLevel(logging.DEBUG)
        for name in ("remotedialer", "urllib3", "werkzeug", "websocket", "simple_websocket", "gunicorn"):
            logging.getLogger(name).setLevel(level)
        logging.getLogger("remotedialer.trace").setLevel(logging.DEBUG)


def parse_listen(text: str, default_host: str = "0.0.0.0") -> Tuple[str, int]:
    """Parse a Go-style listen address: ``:8123``, ``127.0.0.1:0``,
    ``[::1]:8123`` or a bare port. Raises ``ValueError`` if malformed."""
    text = text.strip()
    if text.isdigit():
        return default_host, int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid listen address {text!r} (want HOST:PORT or :PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ValueError(f"invalid port in {text!r}")
    return host or default_host, number


def install_stop_signals() -> threading.Event:
    """An event set by SIGINT (Ctrl-C) or SIGTERM; call from the main thread.
    The command then waits on it and shuts down cleanly."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _listen_type(text: str) -> Tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``remotedialer`` command."""
    from . import client, demo, dummy, server

    parser = argparse.ArgumentParser(
        prog="remotedialer",
        description="Reverse tunnels over one WebSocket (a port of rancher/remotedialer).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"remotedialer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, module, summary in (
        ("server", server, "run the example tunnel server (/connect and /client/...)"),
        ("client", client, "connect to a server and serve its dials"),
        ("dummy", dummy, "serve a directory (and generated data) over HTTP"),
        ("demo", demo, "run server, client and file server in one process and try them"),
    ):
        first_line = (module.__doc__ or "").split("\n", 1)[0]
        sub = commands.add_parser(name, help=summary, description=first_line.split(": ", 1)[-1])
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``remotedialer`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


def subcommand_main(command: str) -> int:
    """Entry point of the ``bin/remotedialer-<command>`` wrappers."""
    argv: List[str] = [command, *sys.argv[1:]]
    return main(argv)
