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
byte already read) back: the transport starts a reader thread for it (a
parked transport holds none). :meth:`Poller.unpark` hands one back at once,
for a dial through the idle tunnel. Many sockets are served per wake-up of
the one thread, and no reader wakes: once woken, the thread waits at least
``batch_window`` before it looks again, so that under many pings each
wake-up serves all that arrived meanwhile (a pong, or the hand-over of a
CONNECT to an idle tunnel, waits that long at most).
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
        """After the socket was dropped from the watch list (on the poller's
        thread, or on the thread calling :meth:`Poller.unpark`): have a
        reader take the socket over."""


class Poller:
    """Watches parked transports on one daemon thread (started with the
    first :meth:`park`; it lives as long as the process).

    ``_lock`` guards ``_parked``, the selector's registrations, ``_reading``
    (the transport whose :meth:`~Parked.on_readable` runs now, outside the
    lock), ``_unpark_wanted`` (:meth:`unpark` asked for that one meanwhile)
    and ``resumed``. It is never held while a transport's methods run.
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
        self._reading: Optional[Parked] = None
        self._unpark_wanted = False
        self._thread: Optional[threading.Thread] = None
        #: Times the poller's thread woke up (for tests and benchmarks).
        self.wakeups = 0
        #: Transports handed back so far.
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

    def unpark(self, parked: Parked) -> bool:
        """Hand ``parked`` back now (its :meth:`~Parked.resume` is called
        on this thread, or on the poller's right after a read under way);
        False if it is not parked (handed back already, or on its way)."""
        with self._lock:
            if self._parked.get(parked.fileno()) is not parked:
                return False
            if self._reading is parked:
                self._unpark_wanted = True
                return True
            self._drop_locked(parked)
        parked.resume()
        return True

    def _drop_locked(self, parked: Parked) -> None:
        fd = parked.fileno()
        self._selector.unregister(fd)
        del self._parked[fd]
        self.resumed += 1

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
                parked: Optional[Parked] = key.data
                if parked is None:
                    self._drain_wake()
                    continue
                with self._lock:
                    if self._parked.get(key.fd) is not parked:
                        continue  # unparked since select() returned
                    self._reading = parked
                try:
                    done = parked.on_readable()
                except Exception:
                    log.exception("poller: %r failed", parked)
                    done = True
                with self._lock:
                    self._reading = None
                    done = done or self._unpark_wanted
                    self._unpark_wanted = False
                    if done:
                        self._drop_locked(parked)
                if done:
                    try:
                        parked.resume()
                    except Exception:  # the poller serves every other socket on
                        log.exception("poller: resuming %r failed", parked)

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
