"""remotedialer.testing: the in-memory WebSocket pair."""

from __future__ import annotations

import pytest

from remotedialer.testing import MemoryTransport, memory_pair
from testkit.support import TIMEOUT


def test_memory_transport_contract() -> None:
    a, b = memory_pair()
    a.send(b"one")
    assert b.receive(timeout=TIMEOUT) == b"one"
    b.ping()
    with pytest.raises(TimeoutError):
        a.receive(timeout=0.01)
    assert a.pings_received == 1
    a.close()
    a.close()
    with pytest.raises(OSError):
        b.send(b"x")
    assert isinstance(a, MemoryTransport) and a.describe() == "memory-client"
