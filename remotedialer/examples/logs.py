"""Logging of the example programs (``remotedialer server``, ``client``,
``dummy``, ``demo``, and :func:`remotedialer.app.make_app` when nothing
configured logging yet): to stderr, with the protocol trace of
``CATTLE_TUNNEL_DATA_DEBUG=true`` as the Go implementation has it."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LOG_FORMAT", "setup_logging"]

#: The format of the examples' log lines.
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
