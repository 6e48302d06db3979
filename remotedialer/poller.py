"""One thread that watches the sockets of idle sessions (issue 24).

A session keeps its reader thread and its blocking API, but a session with
no connection open need not wake that thread for every ping: its transport
*parks* (:meth:`Poller.park`) and its reader blocks on a lock instead of on
``recv``. The poller's one thread waits on every parked socket at once
(``selectors``: epoll on Linux, kqueue or ``select`` elsewhere) and, when one
is readable, calls its :meth:`Parked.on_readable`: the transport reads what
arrived, answers pings itself and says whether anything else came (a
message, a close, EOF, an error). If so, the poller stops watching that
socket and calls :meth:`Parked.resume`, which hands the socket (and every
byte already read) back to the reader thread. Many sockets are served per
wake-up of the one thread, and none of their readers wakes: once woken, the
thread waits at least ``batch_window`` before it looks again, so that under
many pings each wake-up serves all that arrived meanwhile (a pong, or the
hand-over of a CONNECT to an idle tunnel, waits that long at most).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Dict, Optional, Protocol

from .singleton import Singleton

__all__ = ["BATCH_WINDOW", "Parked", "Poller", "default"]

log = logging.getLogger(__name__)

BATCH_WINDOW = 0.005
"""Seconds the poller lets pass between two looks at its sockets, at least:
at most 200 wake-ups a second, however many pings arrive."""

_EDGE_READY_SELECTORS = tuple(
    getattr(selectors, name) for name in ("EpollSelector", "KqueueSelector", "DevpollSelector")
    if hasattr(selectors, name)
)
"""Selectors that see a socket registered while another thread waits in
``select``; the others need that thread woken up first."""


class Parked(Protocol):
    """What the poller needs from a parked transport."""

    def fileno(self) -> int:
        """The socket to watch."""

    def on_readable(self) -> bool:
        """Poller thread: the socket is readable. Read without blocking, answer
        what can be answered; True if the reader thread must take over."""

    def resume(self) -> None:
        """Poller thread, after the socket was dropped from the watch list:
        wake the reader thread."""


class Poller:
    """Watches parked transports on one daemon thread (started with the
    first :meth:`park`; it lives as long as the process).

    ``_lock`` guards ``_parked`` and the selector's registrations; it is
    never held while a transport's :meth:`~Parked.on_readable` runs.
    """

    def __init__(self, name: str = "remotedialer-poller", batch_window: float = BATCH_WINDOW) -> None:
        self._name = name
        self._batch_window = batch_window
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._needs_wake = not isinstance(self._selector, _EDGE_READY_SELECTORS)
        self._parked: Dict[int, Parked] = {}
        self._thread: Optional[threading.Thread] = None
        #: Times the poller's thread woke up (for tests and benchmarks).
        self.wakeups = 0
        #: Transports handed back to their reader so far.
        self.resumed = 0

    def __len__(self) -> int:
        """How many transports are parked."""
        with self._lock:
            return len(self._parked)

    def park(self, parked: Parked) -> None:
        """Watch ``parked`` until something its reader must see arrives; then
        :meth:`Parked.resume` is called once, on the poller's thread."""
        fd = parked.fileno()
        with self._lock:
            self._selector.register(fd, selectors.EVENT_READ, parked)
            self._parked[fd] = parked
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        if self._needs_wake:
            try:
                self._wake_writer.send(b"x")
            except BlockingIOError:  # pragma: no cover - a wake-up is pending anyway
                pass

    def _run(self) -> None:
        woke = 0.0
        while True:
            pause = woke + self._batch_window - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # let more arrive: one wake-up serves them all
            try:
                events = self._selector.select()
            except OSError:  # pragma: no cover - a descriptor closed under us
                log.exception("poller: select failed")
                continue
            woke = time.monotonic()
            self.wakeups += 1
            for key, _mask in events:
                parked = key.data
                if parked is None:
                    self._drain_wake()
                    continue
                try:
                    done = parked.on_readable()
                except Exception:
                    log.exception("poller: %r failed", parked)
                    done = True
                if done:
                    with self._lock:
                        self._selector.unregister(key.fd)
                        del self._parked[key.fd]
                    self.resumed += 1
                    parked.resume()

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass


_default = Singleton(Poller)


def default() -> Poller:
    """The process-wide poller."""
    return _default.get()
