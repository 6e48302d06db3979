"""A connection tunneled through a session, usable wherever a blocking socket is.

:class:`TunnelConnection` is what :meth:`Session.dial` returns: the socket
façade. What it received waits in a
:class:`~remotedialer.receive_buffer.ReceiveBuffer` (with the flow-control
flags, see :mod:`remotedialer.receive_buffer`); readers block on it with the
connection's timeout.

A connection and its session talk through named methods only.
:class:`ConnectionOwner` is what the connection needs from its session
(sending, forgetting it, the limits); the session drives the connection with
its session-facing methods: :meth:`~TunnelConnection.deliver`,
:meth:`~TunnelConnection.set_peer_paused`, :meth:`~TunnelConnection.end` and
:meth:`~TunnelConnection.check_can_send`.

Locking: ``_cond`` (the receive buffer's condition) guards the buffer, both
flow-control flags and the end state. It is never held while calling into
the session (which takes the session's locks), so messages are sent only
after ``_cond`` is released.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple, Union, cast

from .addresses import split_host_port
from .config import Limits
from .errors import (
    LimitExceededError,
    TunnelClosedError,
    TunnelTimeoutError,
    error_text,
    remote_error as _remote_error,
    socket_error,
)
from .protocol import EOF_TEXT, TUNNEL_DISCONNECT_TEXT, Bytes, MessageType
from .receive_buffer import Fill, ReadinessSignal, ReceiveBuffer

if TYPE_CHECKING:
    from .session import Session

__all__ = ["TunnelConnection", "ConnectionOwner"]

log = logging.getLogger(__name__)

Listener = Callable[["TunnelConnection"], None]
Sink = Callable[[Bytes], bool]
"""``(payload) -> taken``: an event loop's offer to pass a DATA payload on at
once instead of buffering it (see :meth:`TunnelConnection.set_sink`)."""


class ConnectionOwner(Protocol):
    """What a :class:`TunnelConnection` needs from the session carrying it
    (:class:`~remotedialer.session.Session` is the one implementation)."""

    limits: Limits

    def send_data(self, conn: "TunnelConnection", payload: memoryview, timeout: Optional[float]) -> None:
        """Send one DATA message for ``conn``, waiting at most ``timeout`` for
        the WebSocket; raise if ``conn`` ended on the wire or the session did."""

    def send_control(
        self, message_type: int, conn_id: int, payload: bytes = b"", timeout: Optional[float] = None
    ) -> bool:
        """Queue a control message (PAUSE, RESUME, ERROR) in order, without
        blocking the reader thread; False if the session ended."""

    def remove_connection(self, conn: "TunnelConnection") -> bool:
        """Forget ``conn``; False if it was already forgotten."""

    def flow_control_sent(self, conn: "TunnelConnection", paused: bool) -> None:
        """We sent PAUSE (``paused``) or RESUME for ``conn`` (for the observer)."""


class TunnelConnection:
    """A stream connection carried by a :class:`~remotedialer.session.Session`.

    Behaves like a connected blocking ``socket.socket``: ``recv``,
    ``recv_into``, ``send``, ``sendall``, ``makefile``, timeouts, ``shutdown``,
    ``close`` and use as a context manager. Reads return ``b""`` once the far
    side closed cleanly and raise :class:`~remotedialer.errors.RemoteError`
    with the far side's text when it closed with an error
    (:class:`~remotedialer.errors.RemoteRefusedError`, a
    ``ConnectionRefusedError``, when its dial of the target was refused), or
    :class:`~remotedialer.errors.TunnelClosedError` when the session ended.
    """

    def __init__(
        self,
        owner: ConnectionOwner,
        conn_id: int,
        proto: str,
        address: str,
        timeout: Optional[float] = None,
    ) -> None:
        self._owner = owner
        self.conn_id = conn_id
        self.proto = proto
        self.address = address
        self.family = _family_of(proto, address)
        self.type = socket.SOCK_STREAM
        self.created_at = time.monotonic()
        self._timeout = timeout
        self._buffer = ReceiveBuffer(owner.limits)
        self._cond = self._buffer.cond
        # Serializes sending PAUSE/RESUME so the last one sent always matches
        # we_paused_peer (a RESUME must never overtake the PAUSE it answers).
        # Taken before _cond, never while _cond is held; guards _pause_sent.
        self._flow_lock = threading.Lock()
        self._pause_sent = False
        self._read_error: Optional[BaseException] = None  # readers get it once drained
        self._write_error: Optional[BaseException] = None  # writers get it at once
        self._read_shut = False  # shutdown(SHUT_RD): reads see EOF
        self._wire_closed = False  # an ERROR went (or is not owed) either way
        self._close_requested = False  # close() was called
        self._closed = False  # really closed: close() and no makefile objects left
        self._io_refs = 0  # open makefile() objects, as in socket.socket
        self._listener: Optional[Listener] = None
        self._sink: Optional[Sink] = None
        self._signal: Optional[ReadinessSignal] = None
        self._sockopts: Dict[Tuple[int, int], Any] = {}

    # ------------------------------------------------------------------ state
    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ended" if self._read_error else "open")
        return f"<TunnelConnection {self.conn_id} {self.proto}/{self.address} {state}>"

    @property
    def session(self) -> "Session":
        """The session carrying the connection."""
        return cast("Session", self._owner)

    @property
    def closed(self) -> bool:
        """Whether the connection was closed on this side."""
        return self._closed

    @property
    def ended(self) -> bool:
        """Whether the connection ended, on either side or with the session."""
        return self._read_error is not None

    @property
    def error(self) -> Optional[BaseException]:
        """What ended the connection: the far side's error
        (:class:`~remotedialer.errors.RemoteError` and its kinds), the end of
        the session, or a local close; ``None`` while open or after a clean EOF."""
        error = self._read_error
        return None if isinstance(error, EOFError) else error

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._buffer.buffered

    @property
    def we_paused_peer(self) -> bool:
        """Whether we asked the peer to pause (our buffer is full)."""
        return self._buffer.we_paused_peer

    @property
    def peer_paused_us(self) -> bool:
        """Whether the peer asked us to pause (our writers wait)."""
        return self._buffer.peer_paused_us

    def set_listener(self, listener: Optional[Listener]) -> None:
        """Call ``listener(self)`` after each change an event loop may care
        about: data arrived, the peer resumed us, or the connection ended. The
        listener runs on the session's reader thread and must not block."""
        self._listener = listener

    def set_sink(self, sink: Optional[Sink]) -> None:
        """Offer each DATA payload that arrives while nothing is buffered to
        ``sink(payload)`` first; when it returns True the payload was taken
        (an event loop wrote it to its socket, or keeps it in order ahead of
        anything buffered later) and is neither buffered nor announced to the
        listener. Runs on the session's reader thread and must not block."""
        self._sink = sink

    # --------------------------------------------------------- socket timeouts
    def settimeout(self, timeout: Optional[float]) -> None:
        """As ``socket.settimeout``: ``None`` blocks, ``0`` never blocks."""
        if timeout is not None:
            timeout = float(timeout)
            if timeout < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def _deadline(self) -> Optional[float]:
        return None if not self._timeout else time.monotonic() + self._timeout

    def _wait(self, deadline: Optional[float]) -> None:
        """With ``_cond`` held: one wait step honouring the timeout mode."""
        if self._timeout == 0.0:
            raise socket_error(errno.EAGAIN)
        if deadline is None:
            self._cond.wait()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TunnelTimeoutError("timed out")
        self._cond.wait(remaining)

    # ------------------------------------------------------------------ reads
    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read up to ``bufsize`` bytes; block per the timeout while none are buffered."""
        _check_flags(flags)
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        with self._cond:
            if bufsize == 0 or not self._wait_readable():
                return b""
            data = self._take(bufsize)
            resume = self._resume_due()
        self._after_read(resume)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Read into a writable buffer; return the number of bytes read (0 at EOF)."""
        _check_flags(flags)
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(view):
            raise ValueError("buffer too small for requested bytes")
        if nbytes == 0:
            nbytes = len(view)
        with self._cond:
            if nbytes == 0 or not self._wait_readable():
                return 0
            written = self._buffer.take_into(view, nbytes)
            self._update_signal()
            resume = self._resume_due()
        self._after_read(resume)
        return written

    def read_available(self, max_bytes: int) -> Optional[bytes]:
        """Non-blocking read for event loops: buffered bytes, ``b""`` at EOF, or
        ``None`` when nothing is buffered yet. Raises like :meth:`recv`."""
        with self._cond:
            if not self._buffer.buffered and not self.readable_now():
                return None
            if not self._wait_readable():
                return b""
            data = self._take(max_bytes)
            resume = self._resume_due()
        self._after_read(resume)
        return data

    def readable_now(self) -> bool:
        """Whether a read would return at once (data, EOF or an error pending)."""
        return bool(self._buffer.buffered) or self._read_error is not None or self._read_shut or self._closed

    def _wait_readable(self) -> bool:
        """With ``_cond`` held: wait until data is buffered; False means EOF."""
        deadline = self._deadline()
        while not self._buffer.buffered:
            if self._closed:
                raise socket_error(errno.EBADF)
            if self._read_shut:
                return False
            if self._read_error is not None:
                if isinstance(self._read_error, EOFError):
                    return False
                raise self._read_error
            self._wait(deadline)
        return True

    def _take(self, limit: int) -> bytes:
        """With ``_cond`` held and data buffered: remove up to ``limit`` bytes."""
        data = self._buffer.take(limit)
        self._update_signal()
        return data

    def _resume_due(self) -> bool:
        """With ``_cond`` held: whether this read should send RESUME."""
        return self._buffer.resume_due() and not self._wire_closed

    def _after_read(self, resume: bool) -> None:
        if resume:
            self._send_flow_control()

    def _send_flow_control(self) -> None:
        """Send PAUSE or RESUME if the last one sent differs from ``we_paused_peer``.

        Flags change under ``_cond`` but messages go out after it is released,
        so a reader's RESUME could otherwise overtake the reader thread's PAUSE
        and leave the peer paused for good. Never blocks: the message is
        queued in order and sent now if the socket is free, else by the
        session's flusher."""
        with self._flow_lock:
            with self._cond:
                paused = self._buffer.we_paused_peer
                if paused == self._pause_sent or self._wire_closed:
                    return
            self._pause_sent = paused
            message_type = MessageType.PAUSE if paused else MessageType.RESUME
            self._owner.send_control(message_type, self.conn_id, timeout=0)
        self._owner.flow_control_sent(self, paused)

    # ----------------------------------------------------------------- writes
    def send(self, data: Bytes, flags: int = 0) -> int:
        """Send up to one DATA message worth of ``data``; return how much was sent.

        Blocks while the peer has paused us, bounded by the timeout.
        """
        _check_flags(flags)
        view = memoryview(data).cast("B")
        deadline = self._deadline()
        self._wait_writable(deadline)
        if not len(view):
            return 0
        count = min(len(view), self._owner.limits.max_data_message)
        self._owner.send_data(self, view[:count], _remaining(deadline))
        return count

    def sendall(self, data: Bytes, flags: int = 0) -> None:
        """Send all of ``data``; the timeout bounds the whole call."""
        _check_flags(flags)
        view = memoryview(data).cast("B")
        deadline = self._deadline()
        sent = 0
        while sent < len(view):
            self._wait_writable(deadline)
            count = min(len(view) - sent, self._owner.limits.max_data_message)
            self._owner.send_data(self, view[sent : sent + count], _remaining(deadline))
            sent += count

    def try_send(self, data: Bytes) -> int:
        """For event loops: send one DATA message worth of ``data`` unless the
        peer has paused us; return the bytes sent (0 while paused). Raises like
        :meth:`send` once the connection ended."""
        with self._cond:
            if self._closed:
                raise socket_error(errno.EBADF)
            if self._write_error is not None:
                raise self._write_error
            if self._buffer.peer_paused_us:
                return 0
        view = memoryview(data).cast("B")
        count = min(len(view), self._owner.limits.max_data_message)
        self._owner.send_data(self, view[:count], None)
        return count

    def writable_now(self) -> bool:
        """Whether a send would not block on flow control."""
        return not self._buffer.peer_paused_us or self._write_error is not None or self._closed

    def _wait_writable(self, deadline: Optional[float]) -> None:
        with self._cond:
            while True:
                if self._closed:
                    raise socket_error(errno.EBADF)
                if self._write_error is not None:
                    raise self._write_error
                if not self._buffer.peer_paused_us:
                    return
                self._wait(deadline)

    # ------------------------------------ session-facing: events from the session
    def deliver(self, payload: Bytes) -> None:
        """Reader thread: a DATA payload arrived for this connection."""
        sink = self._sink
        if (
            sink is not None and not self._buffer.buffered and self._read_error is None
            and not self._closed and not self._read_shut and sink(payload)
        ):
            return  # passed on at once: nothing to buffer, nobody to wake
        pause = overflow = False
        with self._cond:
            if self._read_error is not None or self._closed or self._read_shut:
                return
            fill = self._buffer.append(payload)
            overflow, pause = fill is Fill.OVERFLOW, fill is Fill.PAUSE
            self._cond.notify_all()
            self._update_signal()
        if overflow:
            log.warning(
                "%s: peer ignored PAUSE, buffer over %d bytes; cutting the connection",
                self, self._owner.limits.hard_buffer_limit,
            )
            self.abort(LimitExceededError("receive buffer limit exceeded"))
            return
        if pause:
            self._send_flow_control()
        self._notify()

    def set_peer_paused(self, paused: bool) -> None:
        """Reader thread: the peer sent PAUSE (True) or RESUME (False)."""
        with self._cond:
            self._buffer.peer_paused_us = paused
            self._cond.notify_all()
        if not paused:
            self._notify()

    def end(self, error: BaseException, peer_gone: bool = True) -> bool:
        """The connection ended: readers get ``error`` once the buffer drains,
        writers at once. ``peer_gone`` means the far side already knows (it
        sent ERROR, or the session ended), so no ERROR is owed. True if it was
        still open."""
        with self._cond:
            if peer_gone:
                self._wire_closed = True
            if self._read_error is not None:
                return False
            self._read_error = error
            if self._write_error is None:
                eof = isinstance(error, EOFError)
                self._write_error = socket_error(errno.EPIPE) if eof else error
            self._cond.notify_all()
            self._update_signal()
        self._notify()
        return True

    def check_can_send(self) -> None:
        """The session, about to write DATA for this connection: raise if its
        ERROR already went out (data never follows a close): the session's
        end as it was reported here, else ``BrokenPipeError``."""
        if self._wire_closed:
            if isinstance(self._write_error, TunnelClosedError):
                raise self._write_error  # the session ended under this write
            raise socket_error(errno.EPIPE)

    def _notify(self) -> None:
        listener = self._listener
        if listener is not None:
            try:
                listener(self)
            except Exception:  # a listener bug must not kill the reader thread
                log.exception("connection listener failed for %s", self)

    def _update_signal(self) -> None:
        if self._signal is not None:
            self._signal.update(self.readable_now())

    # ---------------------------------------------------------------- closing
    def shutdown(self, how: int) -> None:
        """``SHUT_RD`` discards further data, ``SHUT_WR`` refuses further sends,
        ``SHUT_RDWR`` also ends the connection on the wire. The protocol has no
        half-close, so the far side learns nothing from ``SHUT_WR`` alone."""
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError("invalid shutdown mode")
        with self._cond:
            if self._closed:
                raise socket_error(errno.EBADF)
            if how != socket.SHUT_WR:
                self._read_shut = True
                self._buffer.clear()
            if how != socket.SHUT_RD and self._write_error is None:
                self._write_error = socket_error(errno.EPIPE)
            self._cond.notify_all()
            self._update_signal()
        if how == socket.SHUT_RDWR:
            self._finish(EOF_TEXT)
        self._notify()

    def close(self) -> None:
        """Close this side: sends ``ERROR EOF`` unless the connection already
        ended. As with ``socket.close``, objects from :meth:`makefile` keep the
        connection usable until they are closed too."""
        with self._cond:
            self._close_requested = True
            if self._io_refs > 0:
                return  # deferred until the last makefile object closes
        self._real_close()

    def abort(self, error: BaseException) -> None:
        """End the connection at once: local readers and writers get ``error``
        and the peer gets its text as ERROR."""
        self.end(error, peer_gone=False)
        self._finish(error_text(error) or EOF_TEXT)

    def _real_close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._buffer.clear()
            self._cond.notify_all()
            signal, self._signal = self._signal, None
        if signal is not None:
            signal.close()
        self._finish(EOF_TEXT)
        self._notify()

    def _finish(self, text: str) -> None:
        """Forget the connection and, unless the peer already knows it ended,
        send it ``ERROR text`` (at most once)."""
        with self._cond:
            owed = not self._wire_closed
            self._wire_closed = True
            if self._read_error is None:
                self._read_error = TunnelClosedError("connection closed")
                self._write_error = self._write_error or socket_error(errno.EPIPE)
                self._cond.notify_all()
                self._update_signal()
        self._owner.remove_connection(self)
        if owed:
            self._owner.send_control(MessageType.ERROR, self.conn_id, text.encode())

    def _decref_socketios(self) -> None:
        """Called by ``socket.SocketIO.close`` (makefile objects)."""
        with self._cond:
            self._io_refs -= 1
            run_close = self._close_requested and self._io_refs <= 0
        if run_close:
            self._real_close()

    def __enter__(self) -> "TunnelConnection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------- socket extras
    def makefile(
        self,
        mode: str = "r",
        buffering: Optional[int] = None,
        *,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        newline: Optional[str] = None,
    ) -> Any:
        """A file object over the connection, with ``socket.makefile`` semantics."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        with self._cond:
            self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffer
        text = io.TextIOWrapper(buffer, encoding, errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def fileno(self) -> int:
        """A descriptor that polls readable exactly when :meth:`recv` would not
        block; -1 once closed."""
        with self._cond:
            if self._closed:
                return -1
            if self._signal is None:
                self._signal = ReadinessSignal()
                self._signal.update(self.readable_now())
            return self._signal.fileno()

    def as_socket(self) -> Any:
        """A real OS socket bridged to this connection, which it then owns; see
        :func:`remotedialer.bridge.as_socket`."""
        from .bridge import as_socket

        return as_socket(self)

    def getpeername(self) -> Union[Tuple[str, int], Tuple[str, int, int, int], str]:
        """The dialed address, shaped as ``socket.getpeername`` would be:
        ``(host, port)``, or ``(host, port, 0, 0)`` for IPv6 (names are not resolved)."""
        peer = _split_address(self.proto, self.address)
        if self.family == socket.AF_INET6 and isinstance(peer, tuple):
            return (peer[0], peer[1], 0, 0)
        return peer

    def getsockname(self) -> Union[Tuple[str, int], Tuple[str, int, int, int], str]:
        """There is no local address on this side of a tunnel: an unspecified one."""
        if self.family == socket.AF_UNIX:
            return ""
        return ("::", 0, 0, 0) if self.family == socket.AF_INET6 else ("0.0.0.0", 0)

    def setsockopt(self, level: int, option: int, value: Any, *args: Any) -> None:
        """Accepted and remembered; socket options have no effect on a tunnel."""
        self._sockopts[(level, option)] = value

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> Any:
        return self._sockopts.get((level, option), 0)


def _check_flags(flags: int) -> None:
    if flags:
        raise ValueError("flags are not supported on a tunneled connection")


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _split_address(proto: str, address: str) -> Union[Tuple[str, int], str]:
    if proto == "unix":
        return address
    try:
        return split_host_port(address)
    except ValueError:
        return address, 0


def _family_of(proto: str, address: str) -> int:
    if proto == "unix":
        return getattr(socket, "AF_UNIX", socket.AF_INET)
    return socket.AF_INET6 if address.startswith("[") else socket.AF_INET


def end_all(connections: List[TunnelConnection], reason: str = TUNNEL_DISCONNECT_TEXT) -> None:
    """Fail every connection at once (session end): no call stays blocked."""
    for conn in connections:
        conn.end(TunnelClosedError(reason))


def remote_error(text: str) -> BaseException:
    """What local readers see for a peer's ERROR text (``EOF`` is a clean end)."""
    return EOFError() if text == EOF_TEXT else _remote_error(text)
