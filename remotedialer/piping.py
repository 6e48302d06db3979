"""Moving bytes between tunneled connections and real sockets, without a thread
per connection.

A :class:`Piper` runs one selector thread that copies both ways between pairs
of endpoints: a local socket and a :class:`TunnelConnection` (the client side
of a dial, a forwarded port, ``as_socket``), or two tunneled connections (a
server relaying for a peer). Flow control carries through: while the peer has
paused us we stop reading the local socket, and while the local socket does not
drain we stop reading the tunnel, whose buffer then PAUSEs the peer. Tunnel
bytes for a socket that can take them at once are written by the session's
reader thread as they arrive (:meth:`_SocketPipe.deliver_now`); the piper
thread only takes over what does not fit, EOF and errors.

:class:`LocalDialer` is the client's connect handler: it checks the connect
authorizer, dials the target on a small bounded thread pool, and hands the
result to a :class:`Piper`.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Set, Tuple

from .addresses import split_host_port
from .config import DEFAULT_LIMITS, Limits
from .errors import ConnectNotAllowedError, DialError, RemoteError, TunnelTimeoutError, error_text
from .singleton import Singleton
from .thread_pool import ThreadPool
from .wait import wait_for_write

if TYPE_CHECKING:
    from .connection import TunnelConnection
    from .protocol import Bytes

__all__ = [
    "Piper",
    "Waker",
    "LocalDialer",
    "ConnectAuthorizer",
    "SocketDialer",
    "dial_socket",
    "default_piper",
]

log = logging.getLogger(__name__)

ConnectAuthorizer = Callable[[str, str], bool]
"""``(proto, address) -> allowed``: whether the peer may dial that target here."""

SocketDialer = Callable[[str, str, Optional[float]], socket.socket]
"""``(proto, address, timeout) -> connected socket``: how local targets are dialed."""

CHUNK = 64 * 1024
# Bytes one pipe direction may move per turn before others get theirs.
TURN_BUDGET = 512 * 1024


def dial_socket(proto: str, address: str, timeout: Optional[float]) -> socket.socket:
    """Dial ``proto/address`` locally: ``tcp``/``tcp4``/``tcp6`` ``host:port`` or
    ``unix`` path. TCP sockets get ``TCP_NODELAY``."""
    if proto == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    if proto not in ("tcp", "tcp4", "tcp6"):
        raise DialError(f"dial {proto} {address}: unknown network {proto}")
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        raise DialError(f"dial {proto} {address}: {exc}") from None
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_CONNECT_PENDING = {
    errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, getattr(errno, "WSAEWOULDBLOCK", errno.EWOULDBLOCK),
}


def start_ip_connect(proto: str, address: str) -> Optional[Tuple[socket.socket, bool]]:
    """Begin a TCP connect to an IP-literal ``host:port`` without blocking (no
    name lookup, no wait): ``(socket, connected)``, the socket non-blocking
    with ``TCP_NODELAY``, connected at once or still connecting. ``None`` when
    the address needs :func:`dial_socket` (not TCP, a host name, a bad form).
    Raises ``OSError`` when the connect failed at once (e.g. refused)."""
    if proto not in ("tcp", "tcp4", "tcp6"):
        return None
    try:
        host, port = split_host_port(address)
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (ValueError, OSError, UnicodeError):
        return None
    family, _type, _proto, _name, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        status = sock.connect_ex(sockaddr)
        if status and status not in _CONNECT_PENDING:
            raise OSError(status, os.strerror(status))
        if status:
            try:  # a loopback handshake is over by now: look, without waiting
                finish_connect(sock, 0)
            except socket.timeout:
                pass
            else:
                status = 0
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock, not status


def finish_connect(sock: socket.socket, timeout: Optional[float]) -> None:
    """Wait at most ``timeout`` (0: only look) for a connect
    :func:`start_ip_connect` began to complete. Raises ``socket.timeout``
    or the ``OSError`` the connect failed with."""
    if not wait_for_write(sock, timeout):
        raise socket.timeout("timed out")
    status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if status:
        raise OSError(status, os.strerror(status))


class _Direction:
    """One direction of a pipe: bytes read from the source and not yet written."""

    __slots__ = ("pending", "eof")

    def __init__(self) -> None:
        self.pending: Optional[memoryview] = None
        self.eof = False


class _Pipe:
    """Base of the two pipe kinds; ``service`` runs on the piper thread only."""

    def __init__(self, piper: "Piper", on_done: Optional[Callable[[], None]]) -> None:
        self.piper = piper
        self.on_done = on_done
        self.done = False

    def service(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        self.done = True
        self.piper._forget(self)
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception:
                log.exception("pipe completion callback failed")


def _write_tunnel(conn: TunnelConnection, direction: _Direction) -> bool:
    """Send pending bytes into ``conn`` while the peer lets us; True if all went."""
    while direction.pending is not None:
        sent = conn.try_send(direction.pending)
        if sent == 0:
            return False
        rest = direction.pending[sent:]
        direction.pending = rest if len(rest) else None
    return True


def _read_tunnel(conn: TunnelConnection, direction: _Direction) -> bool:
    """Take buffered bytes from ``conn`` into ``direction``; False if none yet."""
    data = conn.read_available(CHUNK)
    if data is None:
        return False
    if data:
        direction.pending = memoryview(data)
    else:
        direction.eof = True
    return True


class _SocketPipe(_Pipe):
    """Copies between a non-blocking local socket and a tunneled connection."""

    def __init__(
        self,
        piper: "Piper",
        sock: socket.socket,
        conn: TunnelConnection,
        on_done: Optional[Callable[[], None]],
        idle_timeout: Optional[float] = None,
    ) -> None:
        super().__init__(piper, on_done)
        self.sock = sock
        self.conn = conn
        self.to_tunnel = _Direction()
        self.to_socket = _Direction()
        self.events = 0
        self.idle_timeout = idle_timeout
        self.last_active = time.monotonic()  # when a byte last moved either way
        # Guards ``to_socket`` and writes to ``sock``: the piper thread and
        # :meth:`deliver_now` (on the session's reader thread) both deliver
        # tunnel bytes to the socket. Also guards ``closing``, so that no
        # write reaches a descriptor that was closed (and maybe reused).
        self._to_socket_lock = threading.Lock()
        self.closing = False

    def __repr__(self) -> str:
        return f"<pipe {self.sock.fileno()} <-> {self.conn}>"

    def service(self) -> None:
        try:
            more = self._socket_to_tunnel() | self._tunnel_to_socket()
        except (RemoteError, ConnectionError, OSError) as exc:
            self._close(exc)
            return
        if self.to_tunnel.eof and self.to_tunnel.pending is None:
            self._close(None)  # local side ended and everything read was sent
            return
        if self.to_socket.eof and self.to_socket.pending is None:
            self._close(None)  # far side ended and everything was delivered
            return
        wanted = 0
        if (
            self.to_tunnel.pending is None and not self.to_tunnel.eof
            and not self.conn.ended and self.conn.writable_now()
        ):
            wanted |= selectors.EVENT_READ
        if self.to_socket.pending is not None:
            wanted |= selectors.EVENT_WRITE
        self.piper._set_interest(self, self.sock, wanted)
        if more:
            self.piper._mark(self)

    def _socket_to_tunnel(self) -> bool:
        """Local socket -> tunnel. True if the turn's budget ran out."""
        moved = 0
        direction = self.to_tunnel
        drained = False
        while moved < TURN_BUDGET:
            if self.conn.ended:
                # The far side ended: stop reading here and let the other
                # direction deliver what it already sent, then close both.
                direction.pending = None
                return False
            if not _write_tunnel(self.conn, direction):
                return False
            if direction.eof or drained:
                return False
            try:
                data = self.sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                direction.eof = True
                return False
            direction.pending = memoryview(data)
            moved += len(data)
            self.last_active = time.monotonic()
            # A short read drained the socket: send it and let the
            # (level-triggered) selector say when more arrives, sparing a
            # recv that would only fail with EAGAIN.
            drained = len(data) < CHUNK
        return True

    def _tunnel_to_socket(self) -> bool:
        """Tunnel -> local socket. True if the turn's budget ran out."""
        moved = 0
        direction = self.to_socket
        if direction.pending is None and not direction.eof and not self.conn.readable_now():
            # Nothing to deliver: spare the lock. Only this thread takes
            # pending bytes from the buffer, and the reader calls the
            # listener after any change, so nothing is missed.
            return False
        with self._to_socket_lock:
            while moved < TURN_BUDGET:
                if direction.pending is None:
                    if direction.eof or not _read_tunnel(self.conn, direction):
                        return False
                    continue
                try:
                    sent = self.sock.send(direction.pending)
                except (BlockingIOError, InterruptedError):
                    return False
                moved += sent
                self.last_active = time.monotonic()
                rest = direction.pending[sent:]
                direction.pending = rest if len(rest) else None
            return True

    def _claim_idle_socket(self) -> bool:
        """Off the piper's turn: take ``_to_socket_lock`` without waiting if
        the socket direction is idle (nothing pending, no EOF, not closing).
        True: taken, the caller releases it."""
        if not self._to_socket_lock.acquire(blocking=False):
            return False
        direction = self.to_socket
        if self.closing or direction.pending is not None or direction.eof:
            self._to_socket_lock.release()
            return False
        return True

    def take_payload(self, payload: Bytes) -> bool:
        """The connection's sink (session's reader thread): a DATA payload
        arrived with nothing buffered before it; write it straight to the
        socket, sparing the receive buffer, its lock and the listener. True
        when taken: sent whole, or the rest kept as the pending bytes the
        piper writes once the socket drains (at most one message, ahead of
        anything buffered later). False leaves it to the buffer: the piper
        holds the lock, bytes are pending, the pipe is closing, or the send
        failed (the piper meets the error again and closes). Never blocks."""
        if not self._claim_idle_socket():
            return False
        try:
            direction = self.to_socket
            try:
                sent = self.sock.send(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return False
            self.last_active = time.monotonic()
            if sent == len(payload):
                return True
            direction.pending = memoryview(payload)[sent:]
        finally:
            self._to_socket_lock.release()
        self.piper._mark(self)  # the piper waits for the socket to drain
        return True

    def deliver_now(self) -> bool:
        """Any thread (the session's reader, right after it fed ``conn``):
        write what ``conn`` has buffered straight to the socket, sparing the
        hand-off to the piper thread and its wake-up. Never blocks (the socket
        is non-blocking, the lock is only tried). True when all of it went
        and the piper has nothing to do; False asks for a turn of the piper:
        nothing to deliver (a RESUME or the end arrived), EOF, an error, a full
        socket, more than one read's worth, or the piper holding the lock."""
        if not self._claim_idle_socket():
            return False
        try:
            direction = self.to_socket
            try:
                if not _read_tunnel(self.conn, direction) or direction.pending is None:
                    return False  # nothing buffered, or EOF (now recorded)
                sent = self.sock.send(direction.pending)
            except (BlockingIOError, InterruptedError):
                return False  # the piper waits for the socket to drain
            except (RemoteError, ConnectionError, OSError):
                return False  # the piper meets the error again and closes
            self.last_active = time.monotonic()
            rest = direction.pending[sent:]
            direction.pending = rest if len(rest) else None
            return direction.pending is None and not self.conn.readable_now()
        finally:
            self._to_socket_lock.release()

    def _close(self, error: Optional[BaseException]) -> None:
        with self._to_socket_lock:
            self.closing = True
        self.piper._set_interest(self, self.sock, 0)
        self.conn.set_listener(None)
        self.conn.set_sink(None)
        if error is None or self.conn.ended:
            self.conn.close()
        else:
            self.conn.abort(error)  # a local socket error: tell the peer its text
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
        self._finish()


class _TunnelPipe(_Pipe):
    """Copies between two tunneled connections (a server relaying for a peer)."""

    def __init__(
        self,
        piper: "Piper",
        first: TunnelConnection,
        second: TunnelConnection,
        on_done: Optional[Callable[[], None]],
    ) -> None:
        super().__init__(piper, on_done)
        self.ends = ((first, second, _Direction()), (second, first, _Direction()))

    def service(self) -> None:
        more = False
        for source, target, direction in self.ends:
            moved = 0
            try:
                while moved < TURN_BUDGET:
                    if direction.pending is not None and not _write_tunnel(target, direction):
                        break
                    if direction.eof:
                        self._close(source, target, None)
                        return
                    if not _read_tunnel(source, direction):
                        break
                    moved += len(direction.pending) if direction.pending is not None else 0
                else:
                    more = True
            except (RemoteError, ConnectionError, OSError) as exc:
                self._close(source, target, exc)
                return
        if more:
            self.piper._mark(self)

    def _close(
        self, source: TunnelConnection, target: TunnelConnection, error: Optional[BaseException]
    ) -> None:
        for conn in (source, target):
            conn.set_listener(None)
        if isinstance(error, RemoteError):
            target.abort(RemoteError(error.remote_message))
        else:
            target.close()
        source.close()
        self._finish()


class Waker:
    """Wakes a selector loop from other threads: register :attr:`reader` for
    reading; :meth:`wake` makes it readable, :meth:`drain` empties it. Never
    blocks (a full pipe already holds a wake-up)."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        """Any thread: make :attr:`reader` readable."""
        try:
            self._writer.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def drain(self) -> None:
        """Loop thread: read every pending wake-up."""
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


class Piper:
    """One selector thread copying between endpoint pairs (see the module doc).

    Pipes are serviced when their socket is ready or their tunneled
    connection signals (data, resume, end). Each turn moves a bounded number
    of bytes per direction so one busy pipe cannot starve the others.
    """

    def __init__(self, name: str = "remotedialer-piper") -> None:
        self._name = name
        # guards _dirty, _pipes, _timed, _idle_check, _wake_sent, _thread, _stopped
        self._lock = threading.Lock()
        self._dirty: Set[_Pipe] = set()
        self._wake_sent = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._selector = selectors.DefaultSelector()
        self._waker = Waker()
        self._selector.register(self._waker.reader, selectors.EVENT_READ, None)
        self._pipes: Set[_Pipe] = set()  # added by pipe_*(), forgotten when done
        self._timed: Set[_SocketPipe] = set()  # the pipes with an idle timeout
        self._idle_check = 1.0  # seconds between idle checks
        # Piper-thread state:
        self._interest: Dict[int, int] = {}

    @property
    def active_pipes(self) -> int:
        """Pipes currently copying."""
        return len(self._pipes)

    def pipe_socket(
        self,
        sock: socket.socket,
        conn: TunnelConnection,
        on_done: Optional[Callable[[], None]] = None,
        idle_timeout: Optional[float] = None,
    ) -> None:
        """Copy both ways between ``sock`` and ``conn`` until either ends, then
        close both. Takes ownership of both; ``sock`` is made non-blocking.
        With ``idle_timeout``, the pipe is cut (``conn`` aborted with a
        :class:`~remotedialer.errors.TunnelTimeoutError`) once no byte moved
        either way for that many seconds (checked within a quarter of it, at
        least once a second)."""
        sock.setblocking(False)
        pipe = _SocketPipe(self, sock, conn, on_done, idle_timeout)
        if idle_timeout is not None:
            with self._lock:
                self._timed.add(pipe)
                self._idle_check = min(self._idle_check, max(0.01, idle_timeout / 4))
        self._add(pipe, conn)

    def pipe_tunnels(
        self,
        first: TunnelConnection,
        second: TunnelConnection,
        on_done: Optional[Callable[[], None]] = None,
    ) -> None:
        """Copy both ways between two tunneled connections until either ends."""
        pipe = _TunnelPipe(self, first, second, on_done)
        self._add(pipe, first, second)

    def stop(self) -> None:
        """Stop the thread; pipes still open are closed."""
        with self._lock:
            self._stopped = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _add(self, pipe: _Pipe, *conns: TunnelConnection) -> None:
        def listener(_conn: TunnelConnection) -> None:
            if not (isinstance(pipe, _SocketPipe) and pipe.deliver_now()):
                self._mark(pipe)

        for conn in conns:
            conn.set_listener(listener)
        with self._lock:
            if self._stopped:
                raise RuntimeError("piper stopped")
            self._pipes.add(pipe)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        if isinstance(pipe, _SocketPipe):
            pipe.conn.set_sink(pipe.take_payload)
        self._mark(pipe)

    def _mark(self, pipe: _Pipe) -> None:
        """Ask for ``pipe`` to be serviced soon (any thread)."""
        with self._lock:
            self._dirty.add(pipe)
            if self._wake_sent or threading.current_thread() is self._thread:
                return
            self._wake_sent = True
        self._wake()

    def _wake(self) -> None:
        self._waker.wake()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)
            if isinstance(pipe, _SocketPipe):
                self._timed.discard(pipe)

    def _cut_idle(self, now: float) -> None:
        """Piper thread: cut the pipes idle past their timeout."""
        with self._lock:
            timed = list(self._timed)
        for pipe in timed:
            timeout = pipe.idle_timeout
            if timeout is not None and not pipe.done and now - pipe.last_active >= timeout:
                log.info("%r: no bytes either way for %gs; closing", pipe, timeout)
                pipe._close(TunnelTimeoutError(f"idle for {timeout:g}s"))

    def _set_interest(self, pipe: _Pipe, sock: socket.socket, events: int) -> None:
        """Piper thread: (un)register ``sock`` for ``events``."""
        fd = sock.fileno()
        if fd < 0:
            return
        current = self._interest.get(fd, 0)
        if events == current:
            return
        if not events:
            self._selector.unregister(fd)
            del self._interest[fd]
        elif not current:
            self._selector.register(fd, events, pipe)
            self._interest[fd] = events
        else:
            self._selector.modify(fd, events, pipe)
            self._interest[fd] = events

    def _run(self) -> None:
        try:
            next_check = 0.0
            while True:
                with self._lock:
                    stopped = self._stopped
                    busy = bool(self._dirty)
                    timed = bool(self._timed)
                    interval = self._idle_check
                if stopped:
                    break
                wait: Optional[float] = 0 if busy else None
                if timed:
                    now = time.monotonic()
                    if now >= next_check:
                        if next_check:
                            self._cut_idle(now)
                        next_check = now + interval
                    wait = min(next_check - now, interval) if wait is None else wait
                for key, _mask in self._selector.select(wait):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        with self._lock:
                            self._dirty.add(key.data)
                with self._lock:
                    dirty, self._dirty = self._dirty, set()
                for pipe in dirty:
                    if not pipe.done:
                        pipe.service()
        except Exception:  # pragma: no cover - a bug here must be loud
            log.exception("piper thread failed")
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        # Drain first, then clear the flag: clearing first lets a _mark() in
        # between send a byte that this drain swallows, leaving the flag set
        # with no byte queued, so every later _mark() skips the wake (lost wakeup).
        self._waker.drain()
        with self._lock:
            self._wake_sent = False

    def _shutdown(self) -> None:
        # Every pipe added, serviced yet or not: one added just before stop()
        # must not be left open.
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            if isinstance(pipe, _SocketPipe):
                pipe._close(None)
            elif isinstance(pipe, _TunnelPipe):
                first, second, _ = pipe.ends[0]
                pipe._close(first, second, None)
        self._selector.close()
        self._waker.close()
        with self._lock:
            self._thread = None


_default_piper = Singleton(Piper)


def default_piper() -> Piper:
    """The process-wide piper used when none is given."""
    return _default_piper.get()


class LocalDialer:
    """The client-side connect handler: authorize, dial locally, pipe.

    ``authorizer`` of ``None`` refuses everything (as in Go), but only the
    connection concerned fails. Dials run on a thread pool of
    ``limits.dial_workers`` threads, each bounded by ``limits.local_dial_timeout``.
    """

    def __init__(
        self,
        authorizer: Optional[ConnectAuthorizer],
        dialer: Optional[SocketDialer] = None,
        limits: Limits = DEFAULT_LIMITS,
        piper: Optional[Piper] = None,
    ) -> None:
        self.authorizer = authorizer
        self.dialer = dialer or dial_socket
        self.limits = limits
        self.piper = piper or default_piper()
        self._pool = ThreadPool(limits.dial_workers, "remotedialer-dial")

    def __call__(self, conn: TunnelConnection) -> None:
        allowed = False
        if self.authorizer is not None:
            try:
                allowed = bool(self.authorizer(conn.proto, conn.address))
            except Exception:
                log.exception("connect authorizer failed for %s/%s", conn.proto, conn.address)
        if not allowed:
            log.info("connect not allowed: %s/%s", conn.proto, conn.address)
            raise ConnectNotAllowedError("connect not allowed")
        if self.dialer is dial_socket:
            # An IP literal needs no name lookup: the connect starts here, on
            # the reader thread, without blocking; only one still under way
            # goes to the pool to wait.
            try:
                started = start_ip_connect(conn.proto, conn.address)
            except OSError as exc:
                self._abort(conn, exc)
                return
            if started is not None:
                sock, connected = started
                if connected:
                    self._pipe(sock, conn)
                else:
                    self._pool.submit(self._finish_and_pipe, sock, conn)
                return
        self._pool.submit(self._dial_and_pipe, conn)

    def shutdown(self) -> None:
        """Stop taking dials; running ones finish."""
        self._pool.shutdown()

    def _dial_and_pipe(self, conn: TunnelConnection) -> None:
        if conn.ended and not conn.buffered:
            return  # ended before the dial with nothing to deliver
        try:
            sock = self.dialer(conn.proto, conn.address, self.limits.local_dial_timeout)
        except OSError as exc:
            self._abort(conn, exc)
            return
        self._pipe(sock, conn)

    def _finish_and_pipe(self, sock: socket.socket, conn: TunnelConnection) -> None:
        """Pool thread: wait for a connect begun on the reader thread."""
        try:
            finish_connect(sock, self.limits.local_dial_timeout)
        except OSError as exc:
            sock.close()
            self._abort(conn, exc)
            return
        self._pipe(sock, conn)

    def _pipe(self, sock: socket.socket, conn: TunnelConnection) -> None:
        # Even if the far side already ended, what it sent while we dialed is
        # delivered first: the pipe writes the buffer, then closes both.
        try:
            self.piper.pipe_socket(sock, conn)
        except RuntimeError:  # the piper was stopped
            sock.close()
            conn.close()
            raise

    @staticmethod
    def _abort(conn: TunnelConnection, exc: OSError) -> None:
        """The dial failed: end ``conn`` with a :class:`DialError` naming the
        target and the reason (sent to the far side as ERROR)."""
        if not isinstance(exc, DialError):
            reason = error_text(exc) or type(exc).__name__
            exc = DialError(f"dial {conn.proto} {conn.address}: {reason}", exc)
        conn.abort(exc)

