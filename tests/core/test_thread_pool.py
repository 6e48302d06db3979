"""The bounded worker pool, and the client's dial pool built on it: threads
started only when no started one is idle (``ThreadPoolExecutor`` grows to its
maximum on Python 3.12 and later where at most two tasks ever run at once)."""

from __future__ import annotations

import logging
import random
import threading
from typing import Any, List, Set

import pytest

from remotedialer.errors import RemoteError
from remotedialer.thread_pool import ThreadPool

from testkit.support import TIMEOUT, LocalDialTunnel, wait_for

ROUNDS = 2000


def _dial_threads() -> Set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("remotedialer-dial")}


def test_the_pool_holds_as_many_threads_as_tasks_ran_at_once() -> None:
    pool = ThreadPool(16, "test-pool")
    slots = threading.Semaphore(2)  # at most two tasks submitted and not finished
    done = threading.Event()
    left = [ROUNDS]
    lock = threading.Lock()

    def task() -> None:
        threading.Event().wait(random.random() * 0.0005)
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()
        slots.release()

    for _ in range(ROUNDS):
        assert slots.acquire(timeout=TIMEOUT)
        pool.submit(task)
    assert done.wait(TIMEOUT)
    # two tasks at once, plus one whose thread had not yet gone back to idle
    assert pool.threads <= 3
    pool.shutdown()
    wait_for(lambda: pool.threads == 0)


def test_tasks_beyond_the_size_wait_their_turn_and_all_run() -> None:
    pool = ThreadPool(2, "test-pool")
    gate = threading.Event()
    ran: List[int] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        gate.wait(TIMEOUT)
        with lock:
            ran.append(i)

    for i in range(10):
        pool.submit(task, i)
    assert pool.threads == 2
    gate.set()
    wait_for(lambda: len(ran) == 10)
    assert sorted(ran) == list(range(10))
    pool.shutdown()
    wait_for(lambda: pool.threads == 0)


def test_a_failing_task_is_logged_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = ThreadPool(1, "test-pool")
    ran = threading.Event()

    def fail() -> None:
        raise ValueError("broken task")

    pool.submit(fail)
    pool.submit(ran.set)
    assert ran.wait(TIMEOUT)
    assert pool.threads == 1
    assert any("broken task" in (r.exc_text or "") and r.levelno == logging.ERROR for r in caplog.records)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(ran.set)
    wait_for(lambda: pool.threads == 0)


def test_dial_threads_follow_the_dials_in_flight(setup: Any) -> None:
    """Dials through the client's LocalDialer from two threads: the dial
    pool keeps about as many threads as dials were in flight."""
    tunnel: LocalDialTunnel = setup
    before = _dial_threads()
    errors: List[BaseException] = []

    def dials() -> None:
        try:
            for _ in range(300):
                conn = tunnel.dial("127.0.0.1:9")
                with pytest.raises(RemoteError):
                    conn.recv(1)
                conn.close()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=dials, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not errors
    grown = _dial_threads() - before
    # Two dialers, and each dial's worker may still be finishing (it answered
    # the far side, which dialed again at once): at most four dials in
    # flight. ThreadPoolExecutor reached its maximum of 16 here on 3.12.
    assert len(grown) <= 8, sorted(t.name for t in grown)


@pytest.fixture
def setup(session_pair_factory: Any) -> Any:
    def slow_refusal(proto: str, address: str, timeout: Any) -> Any:
        threading.Event().wait(random.random() * 0.001)
        raise ConnectionRefusedError(111, "connection refused")

    tunnel = LocalDialTunnel(session_pair_factory, dialer=slow_refusal)
    yield tunnel
    tunnel.close()
