"""Waiting for a socket to become writable, in one place (as urllib3's
``util/wait.py``): ``poll`` where there is one, since ``select`` fails for
descriptors past 1023; ``select`` only where there is no ``poll`` (Windows).

Used to finish a non-blocking connect (:mod:`remotedialer.piping`) and to
look whether a WebSocket takes a ping or a close frame without blocking
(:mod:`remotedialer.transports`).
"""

from __future__ import annotations

import select
from typing import Any, Optional

__all__ = ["wait_for_write"]


def wait_for_write(sock: Any, timeout: Optional[float]) -> bool:
    """Whether ``sock`` (a socket or anything with ``fileno()``) becomes
    writable, or fails, within ``timeout`` seconds (0: look only; ``None``:
    block). A failed socket counts as ready, so that the write or the
    ``SO_ERROR`` that follows reports the failure: ``poll`` always reports
    errors and hang-ups, and on the ``select`` fallback a failed connect shows
    in the exception set on Windows, not in the write set. Raises ``OSError``
    or ``ValueError`` for a closed socket."""
    wait = None if timeout is None else max(0.0, timeout)
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT)  # POLLERR and POLLHUP come anyway
        return bool(poller.poll(None if wait is None else wait * 1000))
    _, writable, failed = select.select([], [sock], [sock], wait)
    return bool(writable or failed)
