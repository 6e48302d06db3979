"""RequestThreads: one thread per connection, spare threads started ahead."""

from __future__ import annotations

import logging
import threading
from typing import Any, List

import pytest

from remotedialer.cli.request_threads import RequestThreads

from .support import wait_for

TIMEOUT = 30.0


def _threads_named(name: str) -> List[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


class Jobs:
    """A handler whose calls block until released; records who ran what."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running: List[Any] = []
        self.done: List[Any] = []
        self.threads: List[threading.Thread] = []
        self.release = threading.Event()

    def __call__(self, request: Any, client_address: Any) -> None:
        with self.cond:
            self.running.append(request)
            self.threads.append(threading.current_thread())
            self.cond.notify_all()
        if not self.release.wait(TIMEOUT):
            raise AssertionError("never released")
        with self.cond:
            self.done.append((request, client_address))
            self.cond.notify_all()

    def wait_for(self, predicate: Any) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, TIMEOUT)


def test_each_job_runs_on_a_thread_of_its_own_and_spares_are_kept() -> None:
    name = "test-request-threads-1"
    jobs = Jobs()
    pool = RequestThreads(jobs, spares=3, name=name)
    try:
        for index in range(20):
            pool.submit(index, ("127.0.0.1", index))
        jobs.wait_for(lambda: len(jobs.running) == 20)  # all at once: 20 threads
        assert len({thread.ident for thread in jobs.threads}) == 20
        jobs.release.set()
        jobs.wait_for(lambda: len(jobs.done) == 20)
        assert sorted(jobs.done) == [(index, ("127.0.0.1", index)) for index in range(20)]
        # the threads beyond the spares end (no event tells a thread ended)
        wait_for(lambda: pool.waiting == 3 and len(_threads_named(name)) == 3)
        # A job now goes to a waiting thread: no thread is started for it.
        before = set(_threads_named(name))
        jobs.release.clear()
        pool.submit("next", None)
        jobs.wait_for(lambda: "next" in jobs.running)
        assert jobs.threads[-1] in before
        jobs.release.set()
        jobs.wait_for(lambda: len(jobs.done) == 21)
    finally:
        jobs.release.set()
        pool.close()
    for thread in before | set(_threads_named(name)):
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert _threads_named(name) == []


def test_a_failing_handler_is_logged_and_the_pool_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    name = "test-request-threads-2"
    served: List[threading.Thread] = []
    done = threading.Semaphore(0)

    def handler(request: Any, client_address: Any) -> None:
        served.append(threading.current_thread())
        done.release()
        if request == "fail":
            raise RuntimeError("handler bug")

    pool = RequestThreads(handler, spares=2, name=name)
    try:
        with caplog.at_level(logging.ERROR, logger="remotedialer.cli.request_threads"):
            pool.submit("fail", None)
            assert done.acquire(timeout=TIMEOUT)
            wait_for(lambda: "handler bug" in caplog.text)
        # the pool settles at its spares (the failing thread waits again or ends)
        wait_for(lambda: pool.waiting == 2 and len(_threads_named(name)) == 2)
        pool.submit("ok", None)
        assert done.acquire(timeout=TIMEOUT)
    finally:
        pool.close()
    assert len(served) == 2
    for thread in served + _threads_named(name):
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_close_ends_the_waiting_threads() -> None:
    name = "test-request-threads-3"
    ran = threading.Event()
    pool = RequestThreads(lambda request, address: ran.set(), spares=4, name=name)
    pool.submit("one", None)
    assert ran.wait(TIMEOUT)
    wait_for(lambda: pool.waiting == 4)
    pool.close()
    assert pool.waiting == 0
    for thread in _threads_named(name):
        thread.join(TIMEOUT)
    assert _threads_named(name) == []
    ran.clear()
    pool.submit("after close", None)  # still served, on a thread that then ends
    assert ran.wait(TIMEOUT)


def test_spares_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        RequestThreads(lambda request, address: None, spares=-1)
