"""One thread that keeps every session of a process alive.

Instead of a pinger thread per session, a :class:`Heartbeat` calls
``session.heartbeat(now)`` for each registered session whenever one is due:
client sessions ping and send SYNC_CONNECTIONS, and any session whose peer
went silent past the read deadline is closed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Dict, Optional

from .singleton import Singleton

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Heartbeat", "default"]

log = logging.getLogger(__name__)

_MIN_WAIT = 0.005
_MAX_WAIT = 1.0


class Heartbeat:
    """Runs ``heartbeat(now)`` of registered sessions on one daemon thread.

    The thread starts with the first registration and exits when the last
    session unregisters.
    """

    def __init__(self, name: str = "remotedialer-heartbeat") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._due: Dict["Session", float] = {}  # guarded by _lock
        self._thread: Optional[threading.Thread] = None

    def register(self, session: "Session") -> None:
        with self._lock:
            self._due[session] = 0.0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake.set()

    def unregister(self, session: "Session") -> None:
        with self._lock:
            self._due.pop(session, None)
        self._wake.set()

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                if not self._due:
                    self._thread = None
                    return
                due = [s for s, when in self._due.items() if when <= now]
            for session in due:
                try:
                    wait = session.heartbeat(now)
                except Exception:
                    log.exception("heartbeat of %s failed", session)
                    wait = _MAX_WAIT
                with self._lock:
                    if session in self._due:
                        self._due[session] = now + min(max(wait, _MIN_WAIT), _MAX_WAIT)
            with self._lock:
                next_due = min(self._due.values(), default=now + _MAX_WAIT)
            self._wake.wait(max(next_due - time.monotonic(), _MIN_WAIT))
            self._wake.clear()


_default = Singleton(Heartbeat)


def default() -> Heartbeat:
    """The process-wide heartbeat used by sessions that are given none."""
    return _default.get()
