"""Request threads of the built-in server, started ahead of need.

``threading.Thread.start`` returns only once the new thread runs, and a new
thread must take the GIL before it runs. In a server holding thousands of
tunnel threads (and a long switch interval, see
:data:`~remotedialer.cli.server.SWITCH_INTERVAL`), the listener thread spent
most of its time per connection in that wait: 3,000 agents, 4.5 s of the
5.1 s it spent handing out connections (docs/benchmarks.rst, "Many tunnels
on one server"). :class:`RequestThreads` hands each connection to a thread
that is already waiting; a thread that takes a connection first starts its
own replacement, so the wait for a thread to start moves off the listener.

A connection still gets a thread of its own for as long as it lives, as with
``socketserver.ThreadingMixIn``; a thread whose connection ended waits for
the next one while fewer than ``spares`` threads wait, and ends otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

__all__ = ["RequestThreads", "DEFAULT_SPARES"]

log = logging.getLogger(__name__)

#: Threads kept waiting for the next connection. Each costs a thread's memory
#: (about 20 KiB of RSS); 8 keep the listener from waiting for a thread start
#: while a fleet opens 100 handshakes at a time (docs/benchmarks.rst).
DEFAULT_SPARES = 8

Job = Tuple[Any, Any]
"""A connection: ``(request, client_address)`` as socketserver hands them out."""


class RequestThreads:
    """Runs ``handler(request, client_address)`` for each :meth:`submit`\\ ted
    connection, each on a thread of its own while it runs, with up to
    ``spares`` threads waiting.

    ``_cond`` guards ``_jobs``, ``_waiting``, ``_starting`` and ``_closed``;
    it is never held while a handler runs or a thread starts.
    """

    def __init__(self, handler: Callable[[Any, Any], None], spares: int = DEFAULT_SPARES,
                 name: str = "remotedialer-request") -> None:
        if spares < 0:
            raise ValueError(f"spares must be >= 0, not {spares}")
        self._handler = handler
        self._spares = spares
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._jobs: Deque[Job] = deque()
        self._waiting = 0  # threads in _next_job, waiting for a job
        self._starting = 0  # threads started and not yet in _next_job
        self._closed = False

    def submit(self, request: Any, client_address: Any) -> None:
        """Run ``handler(request, client_address)`` on a waiting thread, or on a new one when
        none waits (then this blocks until the new thread runs, as
        ``Thread.start`` does). Raises ``RuntimeError`` if no thread can be
        started (the job is not run)."""
        job = (request, client_address)
        with self._cond:
            self._jobs.append(job)
            # Threads that will look at the queue before waiting: enough?
            start = self._waiting + self._starting < len(self._jobs)
            if start:
                self._starting += 1
            else:
                self._cond.notify()
        if start:
            try:
                self._start_thread()
            except BaseException:
                with self._cond:
                    self._jobs.remove(job)
                raise

    def close(self, timeout: float = 5.0) -> None:
        """Let the waiting threads end (threads running a job end after it
        and any job still queued); blocks until no thread waits any more, at
        most ``timeout`` seconds."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._waiting and not self._starting, timeout)

    @property
    def waiting(self) -> int:
        """Threads waiting for a job now."""
        with self._cond:
            return self._waiting

    # ------------------------------------------------------------ threads
    def _start_thread(self) -> None:
        """Start one thread (``_starting`` already counts it)."""
        try:
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        except BaseException:
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
            raise

    def _run(self) -> None:
        self._top_up(started=True)
        while True:
            job = self._next_job()
            if job is None:
                return
            self._top_up(started=False)
            try:
                # Two plain arguments, not *job: a call through ``*`` enters
                # a new C-level eval loop, and the C stack of every idle
                # tunnel thread grew by a touched page (4 KiB of RSS each).
                self._handler(job[0], job[1])
            except Exception:  # the handler's own errors are its to report
                log.exception("request thread: handler failed")

    def _next_job(self) -> Optional[Job]:
        """The next job, waiting for one if fewer than ``spares`` threads
        wait already; None when this thread should end."""
        with self._cond:
            if not self._jobs and (self._closed or self._waiting >= self._spares):
                self._cond.notify_all()  # for close()
                return None
            self._waiting += 1
            while not self._jobs and not self._closed:
                self._cond.wait()
            self._waiting -= 1
            if not self._jobs:  # closed
                self._cond.notify_all()
                return None
            return self._jobs.popleft()

    def _top_up(self, started: bool) -> None:
        """Start one more thread if fewer than ``spares`` threads would wait
        for a job: called by a new thread before it waits for its first job
        (``started``: so new threads fill up the spares one after another)
        and by a thread that just took a job (it starts its replacement)."""
        with self._cond:
            if started:
                self._starting -= 1
            about_to_wait = 1 if started else 0
            if self._closed or self._waiting + self._starting + about_to_wait >= self._spares:
                if started:
                    self._cond.notify_all()  # for close()
                return
            self._starting += 1
        try:
            self._start_thread()
        except RuntimeError as exc:  # out of threads: the listener starts them as needed
            log.warning("request thread: cannot start a spare thread: %s", exc)
