"""remotedialer.singleton: one value per process, made on first use."""

from __future__ import annotations

import threading
import time
from typing import List

from remotedialer import heartbeat, piping
from remotedialer.singleton import Singleton


def test_made_once_on_first_use_even_by_racing_threads() -> None:
    made: List[object] = []
    started = threading.Barrier(8)

    def factory() -> object:
        time.sleep(0.01)  # widens the window in which an unlocked get() would make two
        made.append(object())
        return made[-1]

    shared = Singleton(factory)
    assert made == []
    seen: List[object] = []

    def first_use() -> None:
        started.wait()
        seen.append(shared.get())

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1
    assert seen == made * 8
    assert shared.get() is made[0]


def test_process_wide_defaults_are_shared() -> None:
    assert heartbeat.default() is heartbeat.default()
    assert piping.default_piper() is piping.default_piper()
