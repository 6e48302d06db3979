"""A value created on first use and shared by the whole process.

The process-wide heartbeat thread and piper are made this way: a program
that never opens a tunnel never starts their threads.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Optional, TypeVar

__all__ = ["Singleton"]

T = TypeVar("T")


class Singleton(Generic[T]):
    """Holds the one ``factory()`` of the process, made by the first
    :meth:`get` (thread-safe: concurrent first calls get the same object)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()  # guards _value while it is made
        self._value: Optional[T] = None

    def get(self) -> T:
        """The shared value, made now if this is the first call."""
        value = self._value
        if value is None:
            with self._lock:
                value = self._value
                if value is None:
                    value = self._value = self._factory()
        return value
