"""A session whose connections survive the loss of its WebSocket.

:class:`ResumableSession` is the :class:`~remotedialer.session.Session` of a
tunnel that negotiated the resumption extension (docs/protocol.rst,
"Resumption extension"); the bookkeeping is :mod:`remotedialer.resume`'s
:class:`~remotedialer.resume.ResumeLedger`. A session without the extension
is a plain :class:`~remotedialer.session.Session` and pays nothing for it.

States (``resume_state``): ``attached`` (a WebSocket; DATA is kept until
acknowledged), ``suspended`` (the WebSocket was lost: writes are kept up to
the caps, then block; the heartbeat ends the session when the resume window
passes), ``resumed`` (:meth:`ResumableSession.reattach` gave it a new
WebSocket and sent REATTACH; writers wait until the peer's REATTACH has been
answered with what it misses), then ``attached`` again.

Locks: ``_reader_lock`` is held by the reader thread while it handles one
message, and by :meth:`ResumableSession.reattach` while it swaps the
WebSocket and counts what was received: no message of the old WebSocket is
handled after that count. It is taken before ``_write_lock``.
``_resume_lock`` (``_resume_cond``'s lock; the per-message paths take it
bare) guards the ledger, the state and the deferred messages. It nests
inside the session's ``_write_lock`` (taken after it, never before it) and
nothing is sent while it is held. Writers wait on ``_resume_cond`` for room
in the retransmit buffers and for the state to settle.

The per-message cost is kept low: a DATA write that finds the session
attached and room in the caps takes the socket and the ledger once each
(:meth:`ResumableSession.send_data`), and the ACKs the reader owes go out
through one flusher thread that waits up to ``FLUSHER_LINGER`` seconds for
the next one instead of a new thread per ACK.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, ClassVar, Dict, List, Optional, Tuple

from .config import DEFAULT_LIMITS, Limits
from .errors import ProtocolError, TunnelClosedError, TunnelTimeoutError
from .protocol import (
    GLOBAL_MESSAGE_IDS,
    Bytes,
    Message,
    MessageType,
    decode_varint,
    encode_data_header,
    encode_message,
)
from .resume import (
    ReattachPlan,
    ResumeLedger,
    ResumeMessageType,
    decode_ack,
    decode_reattach,
    encode_ack,
    encode_reattach,
)
from .observer import Observer
from .session import ClientListener, ConnectHandler, Session

if TYPE_CHECKING:
    from .connection import TunnelConnection
    from .heartbeat import Heartbeat
    from .transports.base import Transport

__all__ = ["ResumableSession", "ATTACHED", "SUSPENDED", "RESUMED", "keepable"]

log = logging.getLogger(__name__)

ATTACHED = "attached"
"""State: the session has a WebSocket."""
SUSPENDED = "suspended"
"""State: the WebSocket was lost; waiting for a reattach."""
RESUMED = "resumed"
"""State: reattached, the REATTACH exchange is under way."""

_LOST_TEXT = "connection lost while the tunnel was down"

FLUSHER_LINGER = 1.0
"""Seconds the control flusher of a resumable session waits for the next
control message (an ACK, during a transfer) before its thread ends."""


class ResumableSession(Session):
    """A :class:`~remotedialer.session.Session` with the resumption extension.

    ``resume_window`` (seconds, above 0) is how long it stays suspended
    without a WebSocket before it ends. Takes the other arguments of
    :class:`~remotedialer.session.Session`.
    """

    def __init__(
        self,
        transport: "Transport",
        *,
        resume_window: float,
        is_client: bool,
        client_key: str = "",
        session_key: Optional[int] = None,
        connect_handler: Optional[ConnectHandler] = None,
        client_listener: Optional[ClientListener] = None,
        limits: Limits = DEFAULT_LIMITS,
        observer: Optional[Observer] = None,
        heartbeat: Optional["Heartbeat"] = None,
    ) -> None:
        # Session's arguments spelt out, not forwarded as **kwargs: compiled by
        # mypyc (2.4), a forwarded **kwargs arrives as Session's first keyword
        super().__init__(
            transport, is_client=is_client, client_key=client_key, session_key=session_key,
            connect_handler=connect_handler, client_listener=client_listener, limits=limits,
            observer=observer, heartbeat=heartbeat)
        if resume_window <= 0:
            raise ValueError("resume_window must be above 0")
        self.resume_window = resume_window
        self.ledger = ResumeLedger(
            self.limits.resume_buffer_per_connection, self.limits.resume_buffer_per_session
        )
        self._reader_lock = threading.Lock()
        self._resume_lock = threading.Lock()
        self._resume_cond = threading.Condition(self._resume_lock)
        # the flusher waits here for the next control message (see _flush_control)
        self._control_ready = threading.Condition(self._control_lock)
        self._state = ATTACHED
        self._suspended_at = 0.0
        self._awaiting_reattach = False  # the peer's REATTACH is the next message
        # (type, conn id, payload): control messages to send once attached
        # again (ERRORs, and whatever was said after our REATTACH)
        self._deferred: List[Tuple[int, int, bytes]] = []

    @property
    def resume_state(self) -> str:
        """``attached``, ``suspended`` or ``resumed`` (``expired`` once closed)."""
        return "expired" if self.closed else self._state

    @property
    def accepting_dials(self) -> bool:
        """Whether new dials should use this session: open and not suspended
        (while resumed, a dial's CONNECT waits for the reattach to complete)."""
        return not self.closed and self._state != SUSPENDED

    def wait_accepting_dials(self, timeout: Optional[float]) -> bool:
        """Block while suspended: until a reattach, the end of the session
        (the resume window passed) or ``timeout``; return
        :attr:`accepting_dials`."""
        with self._resume_cond:
            self._resume_cond.wait_for(lambda: self.closed or self._state != SUSPENDED, timeout)
        return self.accepting_dials

    @property
    def suspended_for(self) -> float:
        """Seconds since the WebSocket was lost (0 while attached)."""
        if self._state == ATTACHED:
            return 0.0
        return time.monotonic() - self._suspended_at

    # ------------------------------------------------------------ suspension
    def _transport_lost(self, transport: "Transport", reason: str) -> bool:
        with self._resume_cond:
            if self.closed:
                return False
            if self.transport is not transport or self._state == SUSPENDED:
                return True  # replaced by a reattach, or already suspended
            self._state = SUSPENDED
            self._suspended_at = time.monotonic()
            self._awaiting_reattach = False
            self._resume_cond.notify_all()
        with self._control_lock:
            self._control_queue = None  # ERRORs are in the ledger; the rest is restated
        try:
            transport.abort()  # no close frame: the peer must suspend too, not end
        except Exception:  # pragma: no cover - closing must not fail the caller
            log.debug("closing transport failed", exc_info=True)
        log.info("%s suspended for up to %.0fs: %s", self, self.resume_window, reason)
        self.observer.session_suspended(self, reason)
        return True

    def suspend(self, reason: str = "suspended") -> bool:
        """Drop the current WebSocket and wait for a reattach, as if it had
        been lost; False if the session has ended."""
        return self._transport_lost(self.transport, reason)

    def reattach(self, transport: "Transport", timeout: float = 5.0) -> None:
        """Carry on over ``transport``: replace the current WebSocket (closing
        it if it still looks alive) and send our REATTACH, the first message
        on it. Then call :meth:`serve` on the new reader thread. Raises
        :class:`~remotedialer.errors.TunnelClosedError` if the session ended
        and :class:`~remotedialer.errors.TunnelTimeoutError` if the old
        WebSocket's writer does not let go within ``timeout``."""
        if not self._reader_lock.acquire(timeout=timeout):
            raise TunnelTimeoutError("timed out taking over the tunnel's reader for a reattach")
        try:
            self._reattach_locked(transport, timeout)
        finally:
            self._reader_lock.release()

    def _reattach_locked(self, transport: "Transport", timeout: float) -> None:
        pausing = [conn.conn_id for conn in self.connections() if conn.we_paused_peer]
        if not self._write_lock.acquire(timeout=timeout):
            raise TunnelTimeoutError("timed out taking over the tunnel for a reattach")
        try:
            with self._resume_cond:
                if self.closed:
                    raise TunnelClosedError(f"session ended: {self.close_reason}")
                old, self.transport = self.transport, transport
                if self._state == ATTACHED:
                    self._suspended_at = time.monotonic()
                self._state = RESUMED
                self._awaiting_reattach = True
                state = self.ledger.local_state(pausing)
                self._resume_cond.notify_all()
            with self._control_lock:
                self._control_queue = None
            if old is not transport:
                try:
                    old.abort()  # its reader sees the transport replaced and leaves
                except Exception:  # pragma: no cover
                    log.debug("closing the replaced transport failed", exc_info=True)
            message = encode_message(
                GLOBAL_MESSAGE_IDS.next(), 0, ResumeMessageType.REATTACH, encode_reattach(state)
            )
            self._transmit_locked(message, ResumeMessageType.REATTACH, len(message), transport)
        finally:
            self._write_lock.release()

    def heartbeat(self, now: float) -> float:
        """As :meth:`Session.heartbeat`, and: end the session once suspended
        past the window, send the ACKs due, and (client) treat two missed
        pongs as a lost WebSocket."""
        if self.closed:
            return self.limits.ping_interval
        if self._state == SUSPENDED:
            left = self._suspended_at + self.resume_window - now
            if left <= 0:
                threading.Thread(
                    target=self.close, args=("resume window passed",),
                    name="remotedialer-expire", daemon=True,
                ).start()
                return self.limits.ping_interval
            # not the whole window: a reattach does not reschedule the tick,
            # and the resumed session must ping (and watch for pongs) at once
            return min(left, self.limits.ping_interval)
        if self._state == ATTACHED:
            with self._resume_cond:
                due = self.ledger.due_acks()
            for conn_id, received in due:
                self.send_control(ResumeMessageType.ACK, conn_id, encode_ack(received), timeout=0)
        silent = now - self.transport.last_keepalive
        if self.is_client and silent > 2 * self.limits.ping_interval:
            threading.Thread(
                target=self._lose_transport,
                args=(self.transport, f"no pong for {silent:.1f}s"),
                name="remotedialer-suspend", daemon=True,
            ).start()
            return self.limits.ping_interval
        return min(super().heartbeat(now), self.limits.ping_interval)

    def close(self, reason: str = "closed") -> None:
        super().close(reason)
        with self._resume_cond:
            self._resume_cond.notify_all()  # writers waiting for room see the end
        with self._control_lock:
            self._control_ready.notify_all()  # a lingering flusher ends

    # ---------------------------------------------------------------- writes
    def _wait_to_send(
        self, conn: Optional["TunnelConnection"], size: int, deadline: Optional[float]
    ) -> None:
        """With ``_resume_cond`` held: wait until the state is settled (not
        ``resumed``) and the caps leave room for ``size`` bytes of ``conn``."""
        while True:
            if self.closed:
                raise TunnelClosedError(f"session ended: {self.close_reason}")
            if conn is not None:
                conn.check_can_send()
            if self._state != RESUMED and (
                conn is None or self.ledger.has_room(conn.conn_id, size)
            ):
                return
            if deadline is None:
                self._resume_cond.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TunnelTimeoutError("timed out waiting for the tunnel")
            self._resume_cond.wait(remaining)

    def _send_kept(
        self,
        data: bytes,
        message_type: int,
        payload_size: int,
        timeout: Optional[float],
        conn: Optional["TunnelConnection"],
        record: Callable[[], None],
        tail: Bytes = b"",
    ) -> None:
        """Send ``data`` (then ``tail``, the message's second part) if
        attached, after ``record`` (under the resume lock) put it in the
        ledger; while suspended only record it: the reattach sends it. A
        write that fails suspends the session and returns."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._resume_cond:
                self._wait_to_send(conn, payload_size, deadline)
                if self._state == SUSPENDED:
                    record()
                    return
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self._take_socket(remaining, message_type, payload_size, conn)
            try:
                with self._resume_cond:
                    state, transport = self._state, self.transport
                    if state == ATTACHED:
                        record()
                if state == ATTACHED:
                    self._transmit_locked(data, message_type, payload_size, transport, tail)
                    return
            finally:
                self._write_lock.release()
            # the WebSocket changed under us: decide again

    def send_data(self, conn: "TunnelConnection", payload: memoryview, timeout: Optional[float]) -> None:
        """Send one DATA message for ``conn`` and keep it until acknowledged.
        Blocks while the retransmit buffers are full (up to ``timeout``);
        while suspended the message is only kept."""
        if self._closed:
            raise TunnelClosedError(f"session ended: {self.close_reason}")
        conn_id = conn.conn_id
        header = encode_data_header(GLOBAL_MESSAGE_IDS.next(), conn_id)
        kept = keepable(payload, self.limits.max_data_message)
        size = len(kept)
        # Fast path, the common case: attached, with room in the caps. The
        # locks are taken with acquire/release: half the cost of ``with``.
        started = 0.0 if timeout is None else time.monotonic()
        self._take_socket(timeout, MessageType.DATA, size, conn)
        try:
            resume_lock = self._resume_lock
            resume_lock.acquire()
            try:
                transport = self.transport
                fast = self._state == ATTACHED and self.ledger.record_if_room(conn_id, kept, size)
            finally:
                resume_lock.release()
            if fast:
                self._transmit_locked(header, MessageType.DATA, size, transport, kept)
                return  # a failed write suspended the session: the reattach sends it
        finally:
            self._write_lock.release()
        if timeout is not None:
            timeout = max(timeout - (time.monotonic() - started), 0.0)

        def record() -> None:
            self.ledger.record_sent(conn_id, kept, size)

        self._send_kept(header, MessageType.DATA, size, timeout, conn, record, kept)

    def _send_connect(self, conn: "TunnelConnection", payload: bytes, timeout: Optional[float]) -> None:
        data = encode_message(GLOBAL_MESSAGE_IDS.next(), conn.conn_id, MessageType.CONNECT, payload)

        def record() -> None:
            self.ledger.add(conn.conn_id, dialed_here=True, connect=payload)

        self._send_kept(data, MessageType.CONNECT, len(payload), timeout, None, record)

    def send_control(
        self, message_type: int, conn_id: int, payload: bytes = b"", timeout: Optional[float] = None
    ) -> bool:
        """As :meth:`Session.send_control`; an ERROR also makes a tombstone.
        While resumed (our REATTACH is out), every control message waits for
        the reattach to complete: it says something newer than our REATTACH.
        While suspended only ERRORs wait; the others are dropped, as the
        REATTACH, made later, states the same afresh (counts, PAUSE)."""
        if self.closed:
            return False
        with self._resume_cond:
            if message_type == MessageType.ERROR:
                self.ledger.close(conn_id, payload.decode("utf-8", "replace"))
            if self._state != ATTACHED:
                if message_type == MessageType.ERROR or self._state == RESUMED:
                    self._deferred.append((message_type, conn_id, payload))
                return True
        return super().send_control(message_type, conn_id, payload, timeout)

    def _drain_control_locked(self) -> None:
        if self._state == ATTACHED:
            super()._drain_control_locked()

    def _start_flusher_if_needed(self) -> None:
        with self._control_lock:
            if self._flusher_running:
                self._control_ready.notify()  # the lingering flusher sends it
                return
        super()._start_flusher_if_needed()

    def _flush_control(self) -> None:
        """Flusher thread: as :meth:`Session._flush_control`, but once the
        queue is empty it waits up to ``FLUSHER_LINGER`` seconds for more
        (the next ACK of a transfer) before it ends."""
        while True:
            with self._write_lock:
                self._drain_control_locked()
            with self._control_lock:
                if not self._control_queue and not self._closed:
                    self._control_ready.wait(FLUSHER_LINGER)
                if self._closed:
                    self._control_queue = None
                if not self._control_queue:
                    self._flusher_running = False
                    return

    # ----------------------------------------------------------------- reads
    def _on_data_kept(self, message: Message) -> None:
        conn_id = message.conn_id
        conn = self._connections.get(conn_id)
        if conn is None:
            with self._resume_cond:
                tombstone = self.ledger.is_tombstone(conn_id)
            if not tombstone:
                Session._on_data(self, message)  # not found: answered with ERROR
            return
        size = len(message.payload)
        resume_lock = self._resume_lock
        resume_lock.acquire()
        try:
            ledger = self.ledger
            ack = ledger.record_received(conn_id, size)
            due = ledger.due_acks() if ack is None and ledger.acks_due else None
        finally:
            resume_lock.release()
        self.bytes_received += size
        conn.deliver(message.payload)
        if ack is not None:
            self.send_control(ResumeMessageType.ACK, conn_id, encode_ack(ack))
        elif due:
            for owed_id, received in due:  # the session's share passed its threshold
                self.send_control(ResumeMessageType.ACK, owed_id, encode_ack(received))

    def _on_connect_kept(self, message: Message) -> None:
        # Counted first: a refusal's ERROR then leaves a tombstone like any close.
        with self._resume_cond:
            if message.conn_id not in self.ledger:
                self.ledger.add(message.conn_id, dialed_here=False)
        Session._on_connect(self, message)

    def _on_error_kept(self, message: Message) -> None:
        with self._resume_cond:
            echo = self.ledger.peer_closed(message.conn_id)
            self._resume_cond.notify_all()  # its writers end; its bytes free room
        Session._on_error(self, message)
        if echo:
            self.send_control(MessageType.ERROR, message.conn_id, bytes(message.payload))

    def _on_ack(self, message: Message) -> None:
        received = decode_ack(message.payload)
        with self._resume_lock:
            if self.ledger.acknowledge(message.conn_id, received):
                self._resume_cond.notify_all()

    def _on_reattach(self, message: Message) -> None:
        if not self._awaiting_reattach:
            raise ProtocolError("REATTACH outside a reattach")
        entries = decode_reattach(message.payload)
        with self._resume_cond:
            self._awaiting_reattach = False
            plan = self.ledger.plan_reattach(entries)
            transport = self.transport
        for conn_id, paused in plan.peer_pausing.items():
            conn = self._connections.get(conn_id)
            if conn is not None:
                conn.set_peer_paused(paused)
        for conn_id in plan.reset:
            with self._lock:
                conn = self._connections.pop(conn_id, None)
            if conn is not None:
                conn.end(TunnelClosedError(_LOST_TEXT))
                self.observer.connection_removed(self, conn)
        # Sending may block on the socket: never on the reader thread.
        threading.Thread(
            target=self._send_plan, args=(plan, transport),
            name=f"remotedialer-reattach-{self.session_key}", daemon=True,
        ).start()

    def _send_plan(self, plan: ReattachPlan, transport: "Transport") -> None:
        """Send what the peer misses, then let writers go."""
        with self._write_lock:
            for message_type, conn_id, payload in _plan_messages(plan):
                data = encode_message(GLOBAL_MESSAGE_IDS.next(), conn_id, message_type, payload)
                if self._transmit_locked(data, message_type, len(payload), transport) is not None:
                    return  # lost again: the next reattach sends it all
            with self._resume_cond:
                if self.transport is not transport or self._state != RESUMED:
                    return
                self._state = ATTACHED
                deferred, self._deferred = self._deferred, []
                self._resume_cond.notify_all()
            for message_type, conn_id, payload in deferred:
                data = encode_message(GLOBAL_MESSAGE_IDS.next(), conn_id, message_type, payload)
                if self._transmit_locked(data, message_type, len(payload), transport) is not None:
                    return
            self._drain_control_locked()
        log.info("%s resumed, %d bytes sent again", self, plan.resent_bytes)
        self.observer.session_resumed(self, plan.resent_bytes)

    def _handle_from(self, transport: "Transport", data: bytes) -> bool:
        reader_lock = self._reader_lock
        reader_lock.acquire()  # per message: acquire/release cost half of ``with``
        try:
            if self.transport is not transport:
                return False  # reattached: the old WebSocket's messages are dropped
            self._handle(data)
        finally:
            reader_lock.release()
        return True

    def _handle(self, data: bytes) -> None:
        if self._awaiting_reattach and _message_type(data) != ResumeMessageType.REATTACH:
            raise ProtocolError("the first message after a reattach must be REATTACH")
        Session._handle(self, data)

    #: Session's handlers with the resumption's (set below the class, as Session's).
    _HANDLERS: ClassVar[Dict[int, Callable[[Session, Message], None]]]


ResumableSession._HANDLERS = {
    **Session._HANDLERS,
    MessageType.DATA: ResumableSession._on_data_kept,  # type: ignore[dict-item]
    MessageType.CONNECT: ResumableSession._on_connect_kept,  # type: ignore[dict-item]
    MessageType.ERROR: ResumableSession._on_error_kept,  # type: ignore[dict-item]
    ResumeMessageType.ACK: ResumableSession._on_ack,  # type: ignore[dict-item]
    ResumeMessageType.REATTACH: ResumableSession._on_reattach,  # type: ignore[dict-item]
}


def keepable(payload: Bytes, limit: int) -> Bytes:
    """``payload`` as the ledger may keep it until acknowledged: the same
    object when nothing can change it (``bytes``, or a view of a ``bytes``
    object of at most ``limit`` bytes, such as the agent's pipes read:
    kept by reference, no copy), else a copy. A view of a larger object is
    copied, so that a small kept slice never holds a large buffer alive
    beyond what the caps count."""
    if type(payload) is memoryview:
        base = payload.obj
        if type(base) is bytes and len(base) <= limit:
            return payload
    elif type(payload) is bytes:
        return payload
    return bytes(payload)


def _plan_messages(plan: ReattachPlan) -> List[Tuple[int, int, Bytes]]:
    """The messages of a reattach plan, in order: CONNECTs, DATA, ERRORs."""
    messages: List[Tuple[int, int, Bytes]] = []
    messages += [(MessageType.CONNECT, conn_id, connect) for conn_id, connect in plan.redial]
    messages += [(MessageType.DATA, conn_id, payload) for conn_id, payload in plan.resend]
    messages += [(MessageType.ERROR, conn_id, text.encode()) for conn_id, text in plan.errors]
    return messages


def _message_type(data: bytes) -> int:
    """The type of an encoded message (a malformed one decodes to -1)."""
    try:
        _id, offset = decode_varint(data, 0)
        _conn, offset = decode_varint(data, offset)
        message_type, _ = decode_varint(data, offset)
    except ProtocolError:
        return -1
    return message_type
