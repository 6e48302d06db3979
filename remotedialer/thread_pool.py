"""A bounded pool of worker threads that starts a thread only when no
started one is idle.

``concurrent.futures.ThreadPoolExecutor`` counts its idle threads with a
semaphore. From Python 3.12 on, that count falls behind: a busy worker that
finishes just as a task is submitted takes the task off the queue itself,
while the submit uses up the count of an idle worker, which then stays idle
but uncounted; the next submit starts a thread. A pool used in bursts thus
grows to its maximum (16 dial threads where 3 dials were ever in flight at
once), on 3.12 and 3.13 but not 3.11, which counted the other way round.
Here each task is handed to one idle worker by name, so the count is exact:
the pool holds as many threads as tasks were ever running at once.

Tasks are fire-and-forget: nothing is returned, and an exception a task
raises is logged.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import Any, Callable, Deque, List, Optional, Tuple

__all__ = ["ThreadPool"]

log = logging.getLogger(__name__)

Task = Tuple[Callable[..., Any], Tuple[Any, ...]]


class _Worker:
    """One worker thread's mailbox: the task handed to it while it was idle
    (``None`` with ``wake`` set: exit)."""

    __slots__ = ("task", "wake")

    def __init__(self) -> None:
        self.task: Optional[Task] = None
        self.wake = threading.Event()


class ThreadPool:
    """At most ``max_workers`` daemon threads named ``<name>_<n>`` running
    submitted tasks; a task waits in a queue only while all of them are busy.

    ``_lock`` guards ``_queue``, ``_idle``, ``_workers`` and ``_shutdown``; it
    is never held while a task runs.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.name = name
        self._lock = threading.Lock()
        self._queue: Deque[Task] = collections.deque()  # tasks no worker took yet
        self._idle: List[_Worker] = []  # waiting for a task, most recently idle last
        self._workers = 0  # threads started and not exited
        self._shutdown = False
        self._numbers = itertools.count()

    @property
    def threads(self) -> int:
        """Worker threads alive (busy or idle)."""
        with self._lock:
            return self._workers

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker: an idle one, else a new one if the
        pool is below its size, else the first to finish its task. Never
        blocks (but on the lock); raises ``RuntimeError`` after :meth:`shutdown`."""
        task: Task = (fn, args)
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"{self.name}: pool shut down")
            if self._idle:
                worker = self._idle.pop()
                worker.task = task
                worker.wake.set()
                return
            if self._workers >= self.max_workers:
                self._queue.append(task)
                return
            self._workers += 1
            number = next(self._numbers)
        thread = threading.Thread(
            target=self._run, args=(task,), name=f"{self.name}_{number}", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._workers -= 1
            raise

    def shutdown(self) -> None:
        """Take no more tasks. Idle workers exit now; busy ones exit after
        their task and the queued ones. Does not wait."""
        with self._lock:
            self._shutdown = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.wake.set()

    def _run(self, task: Optional[Task]) -> None:
        worker = _Worker()
        while task is not None:
            fn, args = task
            try:
                fn(*args)
            except Exception:
                log.exception("%s: task %r failed", self.name, fn)
            task = self._next_task(worker)
        with self._lock:
            self._workers -= 1

    def _next_task(self, worker: _Worker) -> Optional[Task]:
        """The next task for ``worker``: a queued one, else one handed to it
        once idle; None when the pool shut down."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._shutdown:
                return None
            worker.task = None
            worker.wake.clear()
            self._idle.append(worker)
        worker.wake.wait()
        return worker.task
