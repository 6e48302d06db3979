"""Logging of the example programs (``remotedialer server``, ``client``,
``dummy``, ``demo``, and :func:`remotedialer.app.make_app` when nothing
configured logging yet): to stderr, with the protocol trace of
``CATTLE_TUNNEL_DATA_DEBUG=true`` as the Go implementation has it."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional, Tuple

__all__ = ["LOG_FORMAT", "LineFormatter", "setup_logging", "lean_log_records"]

#: The format of the examples' log lines.
LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


class LineFormatter(logging.Formatter):
    """:data:`LOG_FORMAT`, with the date and time text made once a second
    instead of once a line: a server taking thousands of tunnels a second
    logs a line for each. The text is the standard ``Formatter``'s."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second: Tuple[int, str] = (-1, "")  # (second, its text), replaced whole

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime(self.default_time_format, self.converter(record.created)))
            self._second = cached
        msec_format = self.default_msec_format
        return msec_format % (cached[1], record.msecs) if msec_format else cached[1]


def lean_log_records() -> None:
    """Spare every log record of this process the lookups
    :data:`LOG_FORMAT` never shows: the thread, the process and the calling
    function (the "Optimization" section of Python's Logging HOWTO). For
    programs whose every handler uses :data:`LOG_FORMAT` (``remotedialer
    server``: a line per tunnel accepted cost ~97k instructions, ~15% of a
    handshake); not under gunicorn, whose own lines show the process."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the HOWTO's switch for the caller lookup


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
        handler.setFormatter(LineFormatter())
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
