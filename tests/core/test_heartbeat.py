"""The shared heartbeat: sessions are visited when due, never in between."""

from __future__ import annotations

import threading
import time
from typing import Any, List

from remotedialer.heartbeat import Heartbeat

from testkit.support import TIMEOUT, wait_for


class FakeSession:
    """Counts its heartbeat calls and asks for a fixed wait."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.calls: List[float] = []
        self.called = threading.Event()

    def heartbeat(self, now: float) -> float:
        self.calls.append(now)
        self.called.set()
        return self.wait


def _register(heartbeat: Heartbeat, session: Any) -> None:
    heartbeat.register(session)


def _unregister(heartbeat: Heartbeat, session: Any) -> None:
    heartbeat.unregister(session)


def test_idle_sessions_cost_nothing_between_their_deadlines() -> None:
    """2,000 sessions asking to wait a minute are visited once each; the one
    session asking for 20 ms keeps being visited meanwhile."""
    heartbeat = Heartbeat("test-heartbeat")
    idle = [FakeSession(60.0) for _ in range(2000)]
    busy = FakeSession(0.02)
    for session in idle:
        _register(heartbeat, session)
    _register(heartbeat, busy)
    try:
        wait_for(lambda: all(session.calls for session in idle))
        wait_for(lambda: len(busy.calls) >= 60)  # > 1 s of the busy session's rhythm
        assert max(len(session.calls) for session in idle) == 1
        gaps = [b - a for a, b in zip(busy.calls, busy.calls[1:])]
        assert min(gaps) >= 0.015  # visited when due, not earlier
    finally:
        for session in idle + [busy]:
            _unregister(heartbeat, session)


def test_unregistered_session_is_not_visited_and_the_thread_exits() -> None:
    heartbeat = Heartbeat("test-heartbeat-exit")
    gone, staying = FakeSession(0.01), FakeSession(0.01)
    _register(heartbeat, gone)
    _register(heartbeat, staying)
    assert gone.called.wait(TIMEOUT)
    _unregister(heartbeat, gone)
    calls = len(gone.calls)
    before = len(staying.calls)
    wait_for(lambda: len(staying.calls) >= before + 10)
    assert len(gone.calls) <= calls + 1  # at most the call that was running
    _unregister(heartbeat, staying)
    wait_for(lambda: not any(t.name == "test-heartbeat-exit" for t in threading.enumerate()))
    assert len(heartbeat) == 0


def test_a_failing_heartbeat_is_retried_and_does_not_stop_the_others() -> None:
    heartbeat = Heartbeat("test-heartbeat-fail")

    class Failing(FakeSession):
        def heartbeat(self, now: float) -> float:
            super().heartbeat(now)
            raise RuntimeError("bug")

    failing, healthy = Failing(0.01), FakeSession(0.01)
    _register(heartbeat, failing)
    _register(heartbeat, healthy)
    try:
        wait_for(lambda: len(healthy.calls) >= 20)
        wait_for(lambda: len(failing.calls) >= 2, timeout=TIMEOUT)  # retried after a second
    finally:
        _unregister(heartbeat, failing)
        _unregister(heartbeat, healthy)


def test_register_wakes_a_long_wait() -> None:
    """A session registered while the thread sleeps toward a far deadline
    is visited at once."""
    heartbeat = Heartbeat("test-heartbeat-wake")
    far, newcomer = FakeSession(60.0), FakeSession(60.0)
    _register(heartbeat, far)
    try:
        assert far.called.wait(TIMEOUT)
        time.sleep(0.05)  # let the thread settle into its 60 s wait (not synchronisation)
        started = time.monotonic()
        _register(heartbeat, newcomer)
        assert newcomer.called.wait(TIMEOUT)
        assert time.monotonic() - started < 5.0
    finally:
        _unregister(heartbeat, far)
        _unregister(heartbeat, newcomer)


def test_a_registration_due_later_does_not_wake_the_thread() -> None:
    """A server accepting a storm of tunnels registers each for a visit a
    read deadline away: none of them wakes the heartbeat thread, while a
    visit due sooner than the one it sleeps until does (and happens)."""
    heartbeat = Heartbeat("test-heartbeat-wake")
    first = FakeSession(20.0)  # then sleeps until its next visit, 20 s on
    heartbeat.register(first)
    assert first.called.wait(TIMEOUT)
    wakes: List[int] = []
    wake = heartbeat._wake
    original_set = wake.set

    def counting_set() -> None:
        wakes.append(1)
        original_set()

    wake.set = counting_set  # type: ignore[method-assign]
    later = [FakeSession(60.0) for _ in range(100)]
    early = FakeSession(60.0)
    try:
        for session in later:
            heartbeat.register(session, delay=30.0)
        assert wakes == []
        heartbeat.register(early, delay=0.0)
        assert wakes == [1]
        assert early.called.wait(TIMEOUT)
        assert not any(session.calls for session in later)
    finally:
        for session in [first, early, *later]:
            heartbeat.unregister(session)
