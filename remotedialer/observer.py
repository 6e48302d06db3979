"""Hooks for metrics and tracing.

Sessions report what happens to an :class:`Observer`. The base class does
nothing; ``remotedialer.metrics`` provides a Prometheus implementation. Hooks
run on the thread that caused the event (often a session's reader thread) and
must be quick and must not raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import TunnelConnection
    from .session import Session

__all__ = ["Observer", "NULL_OBSERVER"]


class Observer:
    """Receives session, connection and traffic events. Override what you need."""

    def session_started(self, session: "Session") -> None:
        """A session began serving."""

    def session_ended(self, session: "Session", reason: str) -> None:
        """A session ended; ``reason`` says why."""

    def connection_added(self, session: "Session", conn: "TunnelConnection") -> None:
        """A connection was registered (dialed by us or by the peer)."""

    def connection_removed(self, session: "Session", conn: "TunnelConnection") -> None:
        """A connection left the session's table."""

    def connection_paused(self, session: "Session", conn: "TunnelConnection") -> None:
        """We asked the peer to pause sending on ``conn``."""

    def connection_resumed(self, session: "Session", conn: "TunnelConnection") -> None:
        """We asked the peer to resume sending on ``conn``."""

    def message_sent(self, session: "Session", message_type: int, payload_size: int) -> None:
        """A protocol message went out."""

    def message_send_failed(self, session: "Session", message_type: int, payload_size: int) -> None:
        """A protocol message could not be sent."""

    def message_received(self, session: "Session", message_type: int, payload_size: int) -> None:
        """A protocol message came in."""

    def session_suspended(self, session: "Session", reason: str) -> None:
        """A resumable session lost its WebSocket and waits to be reattached."""

    def session_resumed(self, session: "Session", resent_bytes: int) -> None:
        """A suspended session was reattached; ``resent_bytes`` of DATA went again."""

    def resume_refused(self, reason: str) -> None:
        """A reattach could not resume its session (``reason``: ``unknown
        token``, ``not offered``, ...); its connections end as today."""

    def peer_connecting(self, peer_id: str) -> None:
        """A server is about to open its link to peer ``peer_id`` (each attempt)."""

    def peer_connected(self, peer_id: str) -> None:
        """A server's link to peer ``peer_id`` came up."""

    def peer_disconnected(self, peer_id: str) -> None:
        """A server's link to peer ``peer_id`` went down."""

    def handshake_refused(self, status: int) -> None:
        """A server refused a tunnel request with HTTP ``status`` (400 bad
        request, 401 bad secret, 403 secret for another key, 429, 503)."""

    def dial_refused(self, client_key: str, reason: str) -> None:
        """A server's dial policy refused a dial through ``client_key``;
        ``reason`` is a :class:`~remotedialer.errors.DialRefusedError` reason."""

    def proxy_refused(self, status: int) -> None:
        """The proxy front end refused a request; ``status`` is the HTTP
        status it answered (or would have: SOCKS5 refusals count under the
        same statuses, e.g. 407 a bad secret, 403 not allowed, 502 no agent)."""

    def credentials_reloaded(self, ok: bool) -> None:
        """A credentials file was read again: ``ok`` if it took effect."""


NULL_OBSERVER = Observer()
"""The do-nothing observer used when none is given."""
