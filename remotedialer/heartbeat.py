"""One thread that keeps every session of a process alive.

Instead of a pinger thread per session, a :class:`Heartbeat` calls
``session.heartbeat(now)`` for each registered session when it is due:
client sessions ping and send SYNC_CONNECTIONS, and any session whose peer
went silent past the read deadline is closed. Each call returns how long the
session can wait, so due times sit in a heap: a session costs nothing
between its deadlines (a server session is visited about once per read
deadline, a client session once per ping), however many sessions are idle.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .singleton import Singleton

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Heartbeat", "default"]

log = logging.getLogger(__name__)

_MIN_WAIT = 0.005
#: A session is visited at least this often, whatever it asks for.
_MAX_WAIT = 300.0
#: Wait after a ``heartbeat`` call that raised (a bug: logged, then retried).
_RETRY_WAIT = 1.0


class Heartbeat:
    """Runs ``heartbeat(now)`` of registered sessions on one daemon thread,
    each when it is due.

    The thread starts with the first registration and exits when the last
    session unregisters.
    """

    def __init__(self, name: str = "remotedialer-heartbeat") -> None:
        self._name = name
        # _lock guards _entry_ids, _heap and _thread; never held while a
        # session's heartbeat runs.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # The registered sessions, each with the entry_id of its current heap
        # entry; an entry whose entry_id is not the session's current one is
        # stale (the session unregistered) and is dropped when popped.
        self._entry_ids: Dict["Session", int] = {}
        self._heap: List[Tuple[float, int, "Session"]] = []  # (due, entry_id, session)
        self._counter = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def __len__(self) -> int:
        """How many sessions are registered."""
        with self._lock:
            return len(self._entry_ids)

    def register(self, session: "Session", delay: float = 0.0) -> None:
        """Visit ``session`` in ``delay`` seconds (at once by default), then
        whenever it asks to be. The thread is woken only when the visit is
        due before the one it sleeps until (a server accepting many
        sessions, each first due a read deadline later, wakes it for none)."""
        due = time.monotonic() + delay if delay > 0 else 0.0
        with self._lock:
            entry_id = next(self._counter)
            self._entry_ids[session] = entry_id
            wake = not self._heap or due < self._heap[0][0]
            heapq.heappush(self._heap, (due, entry_id, session))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        if wake:
            self._wake.set()

    def unregister(self, session: "Session") -> None:
        """Stop visiting ``session`` (a call running now still finishes)."""
        with self._lock:
            if self._entry_ids.pop(session, None) is None:
                return
            empty = not self._entry_ids
            if len(self._heap) > 2 * len(self._entry_ids) + 64:  # mostly stale entries
                self._heap = [entry for entry in self._heap if self._entry_ids.get(entry[2]) == entry[1]]
                heapq.heapify(self._heap)
        if empty:
            self._wake.set()  # the thread exits

    def _take_due(self, now: float) -> Optional[List[Tuple[int, "Session"]]]:
        """Pop the live entries due by ``now``; None once nothing is registered."""
        with self._lock:
            if not self._entry_ids:
                self._thread = None
                return None
            due = []
            heap = self._heap
            while heap and heap[0][0] <= now:
                _when, entry_id, session = heapq.heappop(heap)
                if self._entry_ids.get(session) == entry_id:
                    due.append((entry_id, session))
            return due

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            due = self._take_due(now)
            if due is None:
                return
            for entry_id, session in due:
                try:
                    wait = session.heartbeat(now)
                except Exception:
                    log.exception("heartbeat of %s failed", session)
                    wait = _RETRY_WAIT
                when = now + min(max(wait, _MIN_WAIT), _MAX_WAIT)
                with self._lock:
                    if self._entry_ids.get(session) == entry_id:
                        heapq.heappush(self._heap, (when, entry_id, session))
            with self._lock:
                next_due = self._heap[0][0] if self._heap else now + _MAX_WAIT
            self._wake.wait(max(next_due - time.monotonic(), _MIN_WAIT))
            self._wake.clear()


_default = Singleton(Heartbeat)


def default() -> Heartbeat:
    """The process-wide heartbeat used by sessions that are given none."""
    return _default.get()
