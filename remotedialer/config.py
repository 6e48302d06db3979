"""Tunable limits and intervals, gathered in one immutable object.

Defaults follow the Go implementation where it has a value (docs/protocol.rst,
"Constants") and add the hard limits it lacks. Use :meth:`Limits.replace` to
derive a variant: ``Limits().replace(max_connections_per_session=100)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["Limits", "DEFAULT_LIMITS"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Limits:
    """Limits and timings of sessions and connections (all sizes in bytes,
    all durations in seconds)."""

    #: We ask the peer to PAUSE once a connection's receive buffer exceeds this.
    pause_threshold: int = 2 * MiB
    #: We ask the peer to RESUME once a read leaves the buffer below this.
    resume_threshold: int = 256 * KiB
    #: A connection whose buffer exceeds this (a peer ignoring PAUSE) is cut.
    #: PAUSE takes effect only after whatever TCP already holds in flight is
    #: delivered (send plus receive buffers, tens of MiB with autotuning), so
    #: this sits far above the pause threshold: at 8 MiB well-behaved peers
    #: were cut on loopback.
    hard_buffer_limit: int = 64 * MiB
    #: Largest payload of one DATA message we send (larger writes are split).
    #: Go's client sends at most 32 KiB; 64 KiB (one piper read) halved the
    #: per-message cost of a bulk download (benchmarks/), and every receiver
    #: accepts messages of any size.
    max_data_message: int = 64 * KiB
    #: Largest WebSocket message we accept; a larger one ends the session.
    max_message_size: int = 16 * MiB
    #: Connections open at once on one session; further CONNECTs are refused.
    max_connections_per_session: int = 16384
    #: Sessions registered under one client key on a server.
    max_sessions_per_key: int = 64
    #: Client WebSocket handshake timeout.
    handshake_timeout: float = 10.0
    #: Client pings this often.
    ping_interval: float = 5.0
    #: A session with no keepalive (pong on the client, ping on the server) for
    #: this long is dead.
    read_deadline: float = 60.0
    #: The client sends SYNC_CONNECTIONS this often.
    sync_interval: float = 60.0
    #: Timeout of a local dial made on the peer's behalf.
    local_dial_timeout: float = 60.0
    #: How long a write of a control message (ERROR, PAUSE, ...) may block.
    control_write_timeout: float = 5.0
    #: Threads that make local dials on the peer's behalf (per process pool).
    dial_workers: int = 16
    #: Seconds a session whose WebSocket was lost stays suspended, waiting
    #: for its client to reattach (the resumption extension,
    #: docs/protocol.rst); 0 turns resumption off (the Go behaviour).
    resume_window: float = 0.0
    #: With resumption: bytes of one connection kept until the peer
    #: acknowledges them; a writer past it waits, as for PAUSE.
    resume_buffer_per_connection: int = 4 * MiB
    #: With resumption: bytes kept for retransmission on one session, all
    #: connections together.
    resume_buffer_per_session: int = 64 * MiB
    #: Server sessions with no connection open hand their socket to the
    #: shared poller (:mod:`remotedialer.poller`), which answers their pings,
    #: and hold no thread until anything else arrives (issue 24; off until
    #: measured beside the plain server).
    park_idle: bool = False

    def replace(self, **changes: Any) -> "Limits":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if not 0 < self.resume_threshold < self.pause_threshold <= self.hard_buffer_limit:
            raise ValueError(
                "need 0 < resume_threshold < pause_threshold <= hard_buffer_limit"
            )
        if self.max_data_message <= 0 or self.max_message_size < self.max_data_message:
            raise ValueError("need 0 < max_data_message <= max_message_size")
        if self.resume_window < 0:
            raise ValueError("resume_window must not be negative")
        if not self.max_data_message <= self.resume_buffer_per_connection <= self.resume_buffer_per_session:
            raise ValueError(
                "need max_data_message <= resume_buffer_per_connection <= resume_buffer_per_session"
            )
        for name in ("max_connections_per_session", "max_sessions_per_key", "dial_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


DEFAULT_LIMITS = Limits()
"""The limits used when none are given."""
