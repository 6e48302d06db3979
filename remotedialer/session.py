"""One WebSocket's worth of multiplexed connections.

A :class:`Session` owns a :class:`~remotedialer.transports.base.Transport`, a table of
:class:`~remotedialer.connection.TunnelConnection` objects keyed by connection
id, and the thread that reads messages (whoever calls :meth:`Session.serve`).
It handles every message type as docs/protocol.rst describes.

Locks, in the order they may nest:

* ``_lock`` guards the connection table, the id counter and ``_closed``;
* ``_write_lock`` serializes ``transport.send``;
* ``_control_lock`` guards the queue of outgoing messages and
  ``_queued_bytes``; taken last, and only for a moment.

A connection's own ``_cond`` is never held while any of them is taken.

The reader thread never writes to the socket. If both ends' readers could
block on a write while both ends' writers wait for the other side to read,
neither would read again: a classic stall. Control messages (PAUSE, RESUME,
ERROR, ...) therefore go through a queue; the reader only enqueues them, and
other threads send them inline when the socket is free, else a short-lived
flusher thread waits for the write lock and sends them in order.

A DATA writer that finds the socket busy does not wait for it
either, while little is queued: it queues its message behind the control
messages and returns, and whoever holds ``_write_lock`` sends it before
releasing the lock (:meth:`Session._release_socket`). Ten request threads
writing through one WebSocket would otherwise take turns on the lock, each
turn a sleep and a wake-up and a hand-off of the GIL.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, ClassVar, Deque, Dict, FrozenSet, List, Optional, Tuple

from . import heartbeat as heartbeat_module
from .config import DEFAULT_LIMITS, Limits
from .connection import TunnelConnection, end_all, remote_error
from .errors import (
    ConnectNotAllowedError,
    LimitExceededError,
    ProtocolError,
    ReaderReleased,
    TunnelClosedError,
    TransportClosed,
    TransportEnded,
    TunnelTimeoutError,
    error_text,
)
from .observer import NULL_OBSERVER, Observer
from .protocol import (
    GLOBAL_MESSAGE_IDS,
    TUNNEL_DISCONNECT_TEXT,
    Bytes,
    Message,
    MessageType,
    decode_message,
    decode_sync_payload,
    encode_data_header,
    encode_message,
    encode_sync_payload,
    split_client_address,
)

if TYPE_CHECKING:
    from .transports.base import Transport

__all__ = ["Session", "ConnectHandler", "ClientListener", "RELEASED"]

log = logging.getLogger(__name__)
trace_log = logging.getLogger("remotedialer.trace")

ConnectHandler = Callable[[TunnelConnection], None]
"""Called on the reader thread with a new connection the peer dialed (its
``proto`` and ``address`` say where to). Must not block: it hands the work to
another thread, and closes or aborts the connection to refuse it."""

ClientListener = Callable[["Session", bool, str, int], None]
"""Called with ``(session, added, client_key, session_key)`` for each
ADD_CLIENT (``added`` true) and REMOVE_CLIENT message (peering)."""

# Connection ids: a server's counter starts at 1 and is incremented before use
# (the first connection gets id 2, as in Go). A client dialing the server counts
# from far above, so dials in both directions never collide.
_SERVER_DIAL_ID_START = 1

MAX_QUEUED_CONTROL_MESSAGES = 65536
"""Control messages waiting for the socket; more means the peer stopped
reading while still sending to us, and the session is closed."""
_CLIENT_DIAL_ID_START = 1 << 32

RELEASED = "reader released"
"""What :meth:`Session.serve` returns when its transport let the reader
thread go (:class:`~remotedialer.errors.ReaderReleased`): the session lives
on, and the transport starts a new reader when it must."""


def tracing_enabled() -> bool:
    """Whether ``CATTLE_TUNNEL_DATA_DEBUG=true`` asks to log every message."""
    return os.environ.get("CATTLE_TUNNEL_DATA_DEBUG", "").lower() == "true"


class Session:
    """A multiplexed tunnel over one WebSocket.

    ``is_client`` is true on the side that opened the WebSocket: it pings and
    sends SYNC_CONNECTIONS. ``connect_handler`` serves CONNECTs from the peer;
    without one every CONNECT is answered with ERROR on that connection alone.
    """

    #: Whether this is a link from a peer server (the metrics' ``peer`` label),
    #: for whoever knows better than the session's role; None: from the role.
    is_peer: Optional[bool] = None

    def __init__(
        self,
        transport: Transport,
        *,
        is_client: bool,
        client_key: str = "",
        session_key: Optional[int] = None,
        connect_handler: Optional[ConnectHandler] = None,
        client_listener: Optional[ClientListener] = None,
        limits: Limits = DEFAULT_LIMITS,
        observer: Optional[Observer] = None,
        heartbeat: Optional["heartbeat_module.Heartbeat"] = None,
    ) -> None:
        self.transport = transport
        self.is_client = is_client
        self.client_key = client_key
        self.session_key = random.getrandbits(63) if session_key is None else session_key
        self.connect_handler = connect_handler
        self.client_listener = client_listener
        self.limits = limits
        self.observer = observer or NULL_OBSERVER
        self._heartbeat = heartbeat or heartbeat_module.default()
        self._trace = tracing_enabled()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._control_lock = threading.Lock()
        # (message, type, payload size, bytes counted in _queued_bytes);
        # created by the first message queued (a deque allocates a 528-byte
        # block at once, for each idle session)
        self._control_queue: Optional[Deque[Tuple[bytes, int, int, int]]] = None
        self._queued_bytes = 0  # of messages writers queued behind the socket's holder
        self._flusher_running = False
        self._reader_thread: Optional[threading.Thread] = None
        self._connections: Dict[int, TunnelConnection] = {}
        self._next_conn_id = _CLIENT_DIAL_ID_START if is_client else _SERVER_DIAL_ID_START
        self._closed = False
        self._close_reason = ""
        # Held from here until close() releases it: wait_closed() passes once
        # it can take it (an Event costs ten times as much per session).
        self._open_gate = threading.Lock()
        self._open_gate.acquire()
        self._close_callbacks: List[Callable[["Session"], None]] = []
        self._sync_seen: FrozenSet[int] = frozenset()  # conn ids present at the last SYNC received
        self._sync_listed: FrozenSet[int] = frozenset()  # open conn ids the peer listed in a SYNC
        self._serving = False  # serve() ran once (a resumed session serves again)
        now = time.monotonic()
        self.started_at = now  #: ``time.monotonic()`` when the session was made
        #: DATA payload bytes sent (only added to with ``_write_lock`` held).
        self.bytes_sent = 0
        #: DATA payload bytes received (only added to by the reader thread).
        self.bytes_received = 0
        self._next_ping = now
        self._next_sync = now + limits.sync_interval

    def __repr__(self) -> str:
        state = f"closed: {self._close_reason}" if self._closed else "open"
        return (
            f"<Session {self.client_key or '-'}/{self.session_key} "
            f"{'client' if self.is_client else 'server'} {self.transport.describe()} {state}>"
        )

    # ------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        """Whether the session ended."""
        return self._closed

    @property
    def accepting_dials(self) -> bool:
        """Whether new dials should use this session (a resumable session
        that lost its WebSocket still holds its connections, but is skipped)."""
        return not self._closed

    def wait_accepting_dials(self, timeout: Optional[float]) -> bool:
        """Block until :attr:`accepting_dials` (a suspended resumable session
        resumes) or the session ends, at most ``timeout`` seconds (``None``:
        no limit); return :attr:`accepting_dials`. A plain session never
        waits."""
        return self.accepting_dials

    @property
    def close_reason(self) -> str:
        """Why the session ended ("" while open)."""
        return self._close_reason

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the session ends or ``timeout`` passes; True if it ended."""
        if not self._open_gate.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return False
        self._open_gate.release()  # for the next waiter
        return True

    def add_close_callback(self, callback: Callable[["Session"], None]) -> None:
        """Call ``callback(session)`` once the session ended (at once if it has)."""
        with self._lock:
            if not self._closed:
                self._close_callbacks.append(callback)
                return
        callback(self)

    def serve(self, transport: Optional["Transport"] = None) -> str:
        """Read and handle messages on the calling thread until the session
        ends; return the reason it ended. Never raises for network or protocol
        trouble: those end the session.

        Returns :data:`RELEASED` instead when the transport lets the reader
        go (a parked server WebSocket, :mod:`remotedialer.poller`); the
        session lives on, and the next reader calls ``serve(transport)``
        with that transport (default: the session's current one)."""
        self._reader_thread = threading.current_thread()
        if not self._serving:
            self._serving = True
            self.observer.session_started(self)
            self._heartbeat.register(self, self._first_heartbeat())
        reason = "closed"
        if transport is None:
            transport = self.transport
        kept = False  # the session lives on without this transport (resumption)
        try:
            while not self._closed:
                data = transport.receive()
                if not self._handle_from(transport, data):
                    kept = True  # the session moved to another transport
                    break
        except ReaderReleased:
            kept = True
            reason = RELEASED
        except TransportClosed as exc:
            reason = error_text(exc) or "websocket closed"
            # the peer ending the session on purpose ends it here too
            ended = isinstance(exc, TransportEnded) and transport is self.transport
            kept = not ended and self._transport_lost(transport, reason)
        except ProtocolError as bad:  # (one name per except type: mypyc types a name once)
            reason = f"protocol error: {bad}"
            log.warning("%s: %s", self, reason)
        except Exception as error:  # a bug or an OS error must still end the session
            reason = f"{type(error).__name__}: {error}"
            log.exception("%s: reader failed", self)
        finally:
            if not kept:
                self.close(reason)
        if kept:
            return RELEASED if reason is RELEASED else f"suspended: {reason}"
        return self._close_reason

    def start(self, name: Optional[str] = None) -> threading.Thread:
        """Run :meth:`serve` on a new daemon thread and return it."""
        thread = threading.Thread(
            target=self.serve, name=name or f"remotedialer-session-{self.session_key}", daemon=True
        )
        thread.start()
        return thread

    def close(self, reason: str = "closed") -> None:
        """End the session: close the WebSocket and fail every connection with
        "tunnel disconnect" at once. Idempotent, callable from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason
            connections = list(self._connections.values())
            self._connections.clear()
            callbacks, self._close_callbacks = self._close_callbacks, []
        log.debug("%s ended: %s", self, reason)
        self._heartbeat.unregister(self)
        try:
            self.transport.close()
        except Exception:  # pragma: no cover - closing must not fail the caller
            log.debug("closing transport failed", exc_info=True)
        end_all(connections, TUNNEL_DISCONNECT_TEXT)
        for conn in connections:
            self.observer.connection_removed(self, conn)
        self._open_gate.release()
        self.observer.session_ended(self, reason)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("session close callback failed")

    # ---------------------------------------------------------------- dialing
    def dial(self, proto: str, address: str, timeout: Optional[float] = None) -> TunnelConnection:
        """Open a connection to ``proto/address`` on the far side.

        Does not wait for the far side: a failed dial there shows up as the
        first read raising :class:`~remotedialer.errors.RemoteError`. The
        connection's timeout starts as ``timeout``, as with
        ``socket.create_connection``. Raises
        :class:`~remotedialer.errors.TunnelClosedError` at once if the session
        has ended and :class:`~remotedialer.errors.LimitExceededError` when the
        session holds its maximum number of connections.
        """
        if "/" in proto:
            raise ValueError(f"proto may not contain '/': {proto!r}")
        with self._lock:
            if self._closed:
                raise TunnelClosedError(f"session ended: {self._close_reason}")
            if len(self._connections) >= self.limits.max_connections_per_session:
                raise LimitExceededError("too many connections on this session")
            self._next_conn_id += 1
            conn = TunnelConnection(self, self._next_conn_id, proto, address, timeout)
            self._connections[conn.conn_id] = conn
        self.observer.connection_added(self, conn)
        payload = f"{proto}/{address}".encode()
        try:
            self._send_connect(conn, payload, timeout)
        except BaseException:
            self.remove_connection(conn)
            conn.end(TunnelClosedError("dial failed"))
            raise
        return conn

    def _send_connect(self, conn: TunnelConnection, payload: bytes, timeout: Optional[float]) -> None:
        """Send the CONNECT of a connection we dial."""
        self._write(MessageType.CONNECT, conn.conn_id, payload, timeout)

    def connections(self) -> List[TunnelConnection]:
        """A snapshot of the open connections."""
        with self._lock:
            return list(self._connections.values())

    def connection_count(self) -> int:
        """How many connections are open."""
        with self._lock:
            return len(self._connections)

    def connection_ids(self) -> List[int]:
        """The sorted ids of the open connections."""
        with self._lock:
            return sorted(self._connections)

    # ------------------------------------------------------------ peering API
    def send_client_added(self, client_key: str, session_key: int) -> None:
        """Send ADD_CLIENT ``client_key/session_key`` (a server telling a peer)."""
        self.send_control(MessageType.ADD_CLIENT, 0, f"{client_key}/{session_key}".encode())

    def send_client_removed(self, client_key: str, session_key: int) -> None:
        """Send REMOVE_CLIENT ``client_key/session_key``."""
        self.send_control(MessageType.REMOVE_CLIENT, 0, f"{client_key}/{session_key}".encode())

    def send_sync(self, timeout: Optional[float] = None) -> bool:
        """Send SYNC_CONNECTIONS with the ids of every open connection. Waits
        at most ``timeout`` (default ``limits.control_write_timeout``) for a
        busy WebSocket; False if it could not go out."""
        return self.send_control(
            MessageType.SYNC_CONNECTIONS, 0, encode_sync_payload(self.connection_ids()), timeout
        )

    # -------------------------------------------------------------- heartbeat
    def _first_heartbeat(self) -> float:
        """Seconds until the heartbeat's first visit: at once on the client
        side (it pings), else when the read deadline could first pass (at
        most a ping interval away): nothing is due before, so a server
        accepting a storm of tunnels does not wake the heartbeat per tunnel."""
        if self.is_client:
            return 0.0
        silent = time.monotonic() - self.transport.last_keepalive
        return max(0.0, min(self.limits.read_deadline - silent, self.limits.ping_interval))

    def heartbeat(self, now: float) -> float:
        """Called periodically by the heartbeat thread: end a session whose
        peer went silent, ping and sync on the client side. Returns the
        longest the caller may wait before calling again."""
        if self._closed:
            return self.limits.ping_interval
        silent = now - self.transport.last_keepalive
        if silent > self.limits.read_deadline:
            # Closing may block for a while on a stuck socket (a close frame
            # that cannot be written): never stall the one heartbeat thread
            # that keeps every other session of the process alive.
            threading.Thread(
                target=self._lose_transport, args=(self.transport, f"no keepalive for {silent:.1f}s"),
                name="remotedialer-expire", daemon=True,
            ).start()
            return self.limits.ping_interval
        wait = self.limits.read_deadline - silent
        if self.is_client:
            if now >= self._next_ping:
                self._next_ping = now + self.limits.ping_interval
                self._ping()
            if now >= self._next_sync:
                self._next_sync = now + self.limits.sync_interval
                # Never hold up the shared heartbeat thread behind a stuck socket.
                self.send_sync(timeout=min(1.0, self.limits.ping_interval))
            wait = min(wait, self._next_ping - now, self._next_sync - now)
        return max(wait, 0.0)

    def _handle_from(self, transport: "Transport", data: bytes) -> bool:
        """Handle a message read from ``transport``; False (not handled) if
        the session no longer reads from it."""
        self._handle(data)
        return True

    def _lose_transport(self, transport: "Transport", reason: str) -> None:
        """The peer went silent on ``transport``: end the session (unless
        :meth:`_transport_lost` keeps it)."""
        if not self._transport_lost(transport, reason):
            self.close(reason)

    def _transport_lost(self, transport: "Transport", reason: str) -> bool:
        """``transport`` failed or closed under the session. True if the
        session lives on without it (resumption); the base class ends."""
        return False

    def _ping(self) -> None:
        if not self._write_lock.acquire(timeout=min(1.0, self.limits.ping_interval)):
            return  # the socket is busy or stuck; the read deadline decides
        try:
            self.transport.ping()
        except Exception as exc:
            failure: Optional[BaseException] = exc
        else:
            failure = None
        finally:
            self._release_socket()
        if failure is not None:
            self._lose_transport(self.transport, f"ping failed: {failure}")

    # ------------------------------------------------------------------ writes
    def _write(self, message_type: int, conn_id: int, payload: Bytes, timeout: Optional[float]) -> None:
        """Encode and send one message, waiting at most ``timeout`` for the socket."""
        message_id = GLOBAL_MESSAGE_IDS.next()
        data = encode_message(message_id, conn_id, message_type, payload)
        self._send_bytes(data, message_type, len(payload), timeout)

    def send_data(self, conn: TunnelConnection, payload: memoryview, timeout: Optional[float]) -> None:
        """Send one DATA message for ``conn``. Raises ``BrokenPipeError`` if the
        connection's ERROR already went out: data never follows a close.
        The header and ``payload`` go to the transport as two parts (never
        joined: a copy of the payload less per message)."""
        header = encode_data_header(GLOBAL_MESSAGE_IDS.next(), conn.conn_id)
        self._send_bytes(header, MessageType.DATA, len(payload), timeout, conn, payload)

    def send_control(
        self, message_type: int, conn_id: int, payload: bytes = b"", timeout: Optional[float] = None
    ) -> bool:
        """Queue a control message and see that it goes out in order; False if
        the session has ended. Never blocks the reader thread; another caller
        waits at most ``timeout`` (default ``limits.control_write_timeout``)
        to send it inline, after which the flusher takes over."""
        if self._closed:
            return False
        data = encode_message(GLOBAL_MESSAGE_IDS.next(), conn_id, message_type, payload)
        with self._control_lock:
            if self._control_queue is None:
                self._control_queue = deque()
            overflow = len(self._control_queue) >= MAX_QUEUED_CONTROL_MESSAGES
            if not overflow:
                self._control_queue.append((data, message_type, len(payload), 0))
        if overflow:
            self.close("too many control messages queued: the peer is not reading")
            return False
        if threading.current_thread() is not self._reader_thread:
            if timeout is None:
                timeout = self.limits.control_write_timeout
            if self._write_lock.acquire(timeout=timeout):
                try:
                    self._drain_control_locked()
                finally:
                    self._release_socket()
        self._start_flusher_if_needed()
        return not self._closed

    def _drain_control_locked(self) -> None:
        """With ``_write_lock`` held: send every queued message, in order;
        several at once in one write where the transport offers
        ``send_many(messages)`` (a writer holding the socket often finds a
        dozen others queued behind it)."""
        while True:
            with self._control_lock:
                queue = self._control_queue
                if not queue:
                    return
                if len(queue) == 1:
                    data, message_type, payload_size, queued = queue.popleft()
                    self._queued_bytes -= queued
                    batch = None
                else:
                    batch = list(queue)
                    queue.clear()
                    self._queued_bytes = 0
            if batch is None:
                failure = self._transmit_locked(data, message_type, payload_size)
            else:
                failure = self._transmit_batch_locked(batch)
            if failure is not None:
                return

    def _transmit_batch_locked(self, batch: List[Tuple[bytes, int, int, int]]) -> Optional[BaseException]:
        """With ``_write_lock`` held: as :meth:`_transmit_locked` for several
        queued messages, in one ``send_many`` if the transport has it."""
        transport = self.transport
        send_many: Optional[Callable[[List[bytes]], None]] = getattr(transport, "send_many", None)
        if send_many is None:
            for data, message_type, payload_size, _ in batch:
                failure = self._transmit_locked(data, message_type, payload_size, transport)
                if failure is not None:
                    return failure
            return None
        try:
            if self._trace:
                for data, _, _, _ in batch:
                    trace_log.debug("%s send %r", self, decode_message(data))
            send_many([data for data, _, _, _ in batch])
        except (TransportClosed, OSError) as exc:
            for _, message_type, payload_size, _ in batch:
                self.observer.message_send_failed(self, message_type, payload_size)
            return self._write_failed(transport, exc)
        for _, message_type, payload_size, _ in batch:
            if message_type == MessageType.DATA:
                self.bytes_sent += payload_size
            self.observer.message_sent(self, message_type, payload_size)
        return None

    def _transmit_locked(
        self, data: Bytes, message_type: int, payload_size: int, transport: Optional["Transport"] = None,
        tail: Bytes = b"",
    ) -> Optional[BaseException]:
        """With ``_write_lock`` held: send one encoded message, ``data``
        followed by ``tail``, on ``transport`` (default: the current one)
        and tell the observer. A failed write ends the session (or suspends
        it); the failure is returned."""
        if transport is None:
            transport = self.transport
        try:
            if self._trace:
                trace_log.debug("%s send %r", self, decode_message(b"".join((data, tail))))
            if tail:
                transport.send(data, tail)
            else:
                transport.send(data)
        except (TransportClosed, OSError) as exc:
            self.observer.message_send_failed(self, message_type, payload_size)
            return self._write_failed(transport, exc)
        if message_type == MessageType.DATA:
            self.bytes_sent += payload_size
        self.observer.message_sent(self, message_type, payload_size)
        return None

    def _write_failed(self, transport: "Transport", exc: BaseException) -> BaseException:
        """A write on ``transport`` failed: drop what is queued and end (or
        suspend) the session; return ``exc``."""
        with self._control_lock:
            self._control_queue = None
            self._queued_bytes = 0
        self._lose_transport(transport, f"write failed: {exc}")
        return exc

    def _start_flusher_if_needed(self) -> None:
        with self._control_lock:
            if not self._control_queue or self._flusher_running or self._closed:
                return
            self._flusher_running = True
        threading.Thread(
            target=self._flush_control, name=f"remotedialer-flush-{self.session_key}", daemon=True
        ).start()

    def _flush_control(self) -> None:
        """Flusher thread: wait for the socket and send what is queued; exits
        once the queue is empty (or the session ended, which frees the lock)."""
        while True:
            self._write_lock.acquire()
            try:
                self._drain_control_locked()
            finally:
                self._release_socket()
            with self._control_lock:
                if self._closed:
                    self._control_queue = None
                    self._queued_bytes = 0
                if not self._control_queue:
                    self._flusher_running = False
                    return

    def _send_bytes(
        self,
        data: bytes,
        message_type: int,
        payload_size: int,
        timeout: Optional[float],
        conn: Optional[TunnelConnection] = None,
        tail: Bytes = b"",
    ) -> None:
        if self._closed:
            raise TunnelClosedError(f"session ended: {self._close_reason}")
        if self._write_lock.acquire(False):
            self._prepare_locked(conn)
        elif conn is not None and self._queue_behind_holder(data + tail, message_type, payload_size, conn):
            return  # queued joined: the caller's payload may change once this returns
        else:
            self._take_socket(timeout, message_type, payload_size, conn)
        try:
            failure = self._transmit_locked(data, message_type, payload_size, None, tail)
        finally:
            self._release_socket()
        if failure is not None:
            raise TunnelClosedError(f"session ended: {failure}") from failure

    def _queue_behind_holder(
        self, data: bytes, message_type: int, payload_size: int, conn: TunnelConnection
    ) -> bool:
        """The socket is busy: queue ``conn``'s DATA for the lock's holder to send,
        unless the queue holds a message's worth already; True if queued.
        Raises like :meth:`TunnelConnection.check_can_send
        <remotedialer.connection.TunnelConnection.check_can_send>`. The
        check and the append are one step under ``_control_lock``, so the
        connection's ERROR (queued under it after ``conn`` was marked closed)
        is never overtaken."""
        size = len(data)
        with self._control_lock:
            queued = self._queued_bytes
            if self._closed or (queued and queued + size > self.limits.max_data_message):
                return False
            conn.check_can_send()
            if self._control_queue is None:
                self._control_queue = deque()
            self._control_queue.append((data, message_type, payload_size, size))
            self._queued_bytes = queued + size
        # The holder may have let go before the append: then nobody would send it.
        if self._write_lock.acquire(False):
            try:
                self._drain_control_locked()
            finally:
                self._release_socket()
        return True

    def _release_socket(self) -> None:
        """Release ``_write_lock``, then send what writers queued behind its
        holder meanwhile (each writer that queued tries the lock once after
        queueing; whoever releases it checks again, so nothing is stranded)."""
        lock = self._write_lock
        lock.release()
        while self._queued_bytes and lock.acquire(False):
            try:
                self._drain_control_locked()
            finally:
                lock.release()

    def _take_socket(
        self, timeout: Optional[float], message_type: int, payload_size: int,
        conn: Optional[TunnelConnection],
    ) -> None:
        """Take ``_write_lock`` (waiting at most ``timeout``), send the control
        messages queued before, and check that ``conn`` may still send (data
        never follows the connection's ERROR); the caller releases the lock."""
        if not self._write_lock.acquire(timeout=-1 if timeout is None else timeout):
            self.observer.message_send_failed(self, message_type, payload_size)
            raise TunnelTimeoutError("timed out waiting to write to the tunnel")
        self._prepare_locked(conn)

    def _prepare_locked(self, conn: Optional[TunnelConnection]) -> None:
        """With ``_write_lock`` just taken: send what is queued, and check
        that ``conn`` may still send; releases the lock if either raises."""
        try:
            if self._control_queue:
                self._drain_control_locked()  # control messages first, in order
            if conn is not None:
                conn.check_can_send()
        except BaseException:
            self._release_socket()
            raise

    # ------------------------------------------------------------------- reads
    def _handle(self, data: bytes) -> None:
        """Dispatch one received WebSocket message."""
        if len(data) > self.limits.max_message_size:
            raise ProtocolError(f"message of {len(data)} bytes over the limit")
        message = decode_message(data)
        if self._trace:
            trace_log.debug("%s recv %r", self, message)
        self.observer.message_received(self, message.type, len(message.payload))
        handler = self._HANDLERS.get(message.type)
        if handler is not None:
            handler(self, message)
        # unknown types are ignored, as in Go

    def _on_data(self, message: Message) -> None:
        conn = self._connections.get(message.conn_id)
        if conn is None:
            text = f"connection not found {self.client_key}/{self.session_key}/{message.conn_id}"
            self.send_control(MessageType.ERROR, message.conn_id, text.encode())
            return
        self.bytes_received += len(message.payload)
        conn.deliver(message.payload)

    def _on_connect(self, message: Message) -> None:
        conn_id = message.conn_id
        refusal = ""
        conn = None
        with self._lock:
            if self._closed:
                return
            if conn_id in self._connections:
                refusal = "connection id already in use"
            elif len(self._connections) >= self.limits.max_connections_per_session:
                refusal = "too many connections"
            elif self.connect_handler is None:
                refusal = "connect not allowed"
            else:
                conn = TunnelConnection(self, conn_id, message.proto, message.address)
                self._connections[conn_id] = conn
        if conn is None:
            log.info("%s: refused CONNECT %d %s: %s", self, conn_id, message.text, refusal)
            self.send_control(MessageType.ERROR, conn_id, refusal.encode())
            return
        self.observer.connection_added(self, conn)
        assert self.connect_handler is not None
        try:
            self.connect_handler(conn)
        except ConnectNotAllowedError as exc:
            conn.abort(exc)
        except Exception as error:  # (not 'exc': mypyc types a name once)
            log.exception("%s: connect handler failed", self)
            conn.abort(ConnectNotAllowedError(f"connect failed: {error}"))

    def _on_error(self, message: Message) -> None:
        with self._lock:
            conn = self._connections.pop(message.conn_id, None)
        if conn is not None:
            conn.end(remote_error(message.text))
            self.observer.connection_removed(self, conn)

    def _on_pause(self, message: Message) -> None:
        conn = self._connections.get(message.conn_id)
        if conn is not None:
            conn.set_peer_paused(message.type == MessageType.PAUSE)

    def _on_client_change(self, message: Message) -> None:
        parsed = split_client_address(message.address)
        if parsed is None:
            log.warning("%s: invalid remote session %r", self, message.address)
            return
        if self.client_listener is not None:
            self.client_listener(self, message.type == MessageType.ADD_CLIENT, *parsed)

    def _on_sync(self, message: Message) -> None:
        """Close connections the peer no longer has, never one created after
        the peer took its snapshot. A snapshot may arrive long after it was
        taken, and several may be in flight at once, so being open at the
        previous SYNC is not enough: a missing connection is closed only if
        an earlier SYNC listed it (the peer knew it, then dropped it) or, never
        listed, it is older than the read deadline (its CONNECT was refused
        and the ERROR lost)."""
        active = set(decode_sync_payload(message.payload))
        too_old = time.monotonic() - self.limits.read_deadline
        with self._lock:
            stale = [
                conn for conn_id, conn in self._connections.items()
                if conn_id not in active and conn_id in self._sync_seen
                and (conn_id in self._sync_listed or conn.created_at < too_old)
            ]
            for conn in stale:
                del self._connections[conn.conn_id]
            self._sync_seen = frozenset(self._connections)
            self._sync_listed = frozenset(
                conn_id for conn_id in self._sync_listed | active if conn_id in self._connections
            )
        for conn in stale:
            log.debug("%s: %s closed by SYNC_CONNECTIONS", self, conn)
            conn.end(TunnelClosedError("closed by connection sync"))
            self.observer.connection_removed(self, conn)

    #: The handler of each message type (set below the class: a class compiled by
    #: mypyc has no methods in its namespace while its body runs).
    _HANDLERS: ClassVar[Dict[int, Callable[["Session", Message], None]]]

    # ---------------------------- for connections (connection.ConnectionOwner)
    def remove_connection(self, conn: TunnelConnection) -> bool:
        """Forget ``conn`` (it closed); False if it was already forgotten."""
        with self._lock:
            if self._connections.get(conn.conn_id) is not conn:
                return False
            del self._connections[conn.conn_id]
        self.observer.connection_removed(self, conn)
        return True

    def flow_control_sent(self, conn: TunnelConnection, paused: bool) -> None:
        """``conn`` sent PAUSE (``paused``) or RESUME: tell the observer."""
        if paused:
            self.observer.connection_paused(self, conn)
        else:
            self.observer.connection_resumed(self, conn)


Session._HANDLERS = {
    MessageType.DATA: Session._on_data,
    MessageType.CONNECT: Session._on_connect,
    MessageType.ERROR: Session._on_error,
    MessageType.PAUSE: Session._on_pause,
    MessageType.RESUME: Session._on_pause,
    MessageType.ADD_CLIENT: Session._on_client_change,
    MessageType.REMOVE_CLIENT: Session._on_client_change,
    MessageType.SYNC_CONNECTIONS: Session._on_sync,
}
