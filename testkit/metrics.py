"""Metrics with many client keys, for the test of ``/metrics`` at scale and
the ``agents`` benchmark's scrape time."""

from __future__ import annotations

from typing import Any, List, Tuple

__all__ = ["metrics_with_clients"]


def metrics_with_clients(count: int) -> Tuple[Any, List[Any]]:
    """A Prometheus registry whose observer saw ``count`` sessions (client
    keys ``agent-0``...) start and receive a message each, as the example
    server's ``/metrics`` would after ``count`` agents connected; returns
    ``(registry, sessions)`` (keep the sessions: the observer holds them
    weakly)."""
    from prometheus_client import CollectorRegistry

    from remotedialer.metrics import PrometheusObserver
    from remotedialer.protocol import MessageType
    from remotedialer.session import Session
    from remotedialer.testing import memory_pair

    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    sessions = []
    for index in range(count):
        _client_end, server_end = memory_pair()
        session = Session(server_end, is_client=False, client_key=f"agent-{index}", observer=observer)
        observer.session_started(session)
        observer.message_received(session, MessageType.DATA, 100)
        sessions.append(session)
    return registry, sessions
