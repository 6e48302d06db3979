"""Write batches: a thread that moves bytes for many connections (the
piper) lets its small DATA messages wait in their session's batch and sends
them at the end of its turn, one write per session, instead of one write per
message. The session keeps the batch in order and sends it before any other
message of its own (see :class:`~remotedialer.session.Session`); this module
only remembers, per thread, which sessions hold batched messages.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Protocol

__all__ = ["BatchHolder", "batch_writes", "batching", "flush_writes"]


class BatchHolder(Protocol):
    """What holds a batch: a session."""

    def flush_batch(self) -> None:
        """Send what is batched; never raises."""


# .holders: the sessions holding DATA this thread batched (None: not batching)
_state = threading.local()


def batch_writes() -> None:
    """From now on this thread's small DATA messages wait in their session's
    batch until :func:`flush_writes` (or another message of the session)
    sends them. The caller must call :func:`flush_writes` at its turn's end."""
    _state.holders = []


def batching() -> Optional[List[BatchHolder]]:
    """The list a session adds itself to when it starts a batch for this
    thread; ``None`` when this thread does not batch."""
    holders: Optional[List[BatchHolder]] = getattr(_state, "holders", None)
    return holders


def flush_writes() -> None:
    """Send every batch this thread holds, one write per session, and stop
    batching. Blocks for each session's write lock, as a send would. Never
    raises: a failed write ends its session, as any failed write does."""
    holders = batching()
    _state.holders = None
    if holders:
        for holder in holders:
            holder.flush_batch()
