"""Raw TCP port forwarding through a tunnel, like ``ssh -R`` or chisel's ``R:``.

A :class:`PortForward` listens on a local TCP address. For every connection it
accepts it calls a *dial function* (typically
``lambda: server.dial("foo", "tcp", "127.0.0.1:8125")``) and hands the
accepted socket and the resulting
:class:`~remotedialer.connection.TunnelConnection` to a
:class:`~remotedialer.piping.Piper`, which copies both ways on its one
selector thread. One forward therefore costs one accept thread, whatever the
number of connections; all forwards of a process share the piper thread.

Flow control carries end to end: while the far side has paused us the piper
stops reading the accepted socket (so the local sender's TCP window closes),
and while the accepted socket does not drain it stops reading the tunnel,
whose receive buffer then sends PAUSE to the far side. Nothing is buffered
without bound.

The wire protocol has no half-close: a FIN from either side, the tunnel
going away or :meth:`PortForward.stop` ends both directions, after the bytes
already received are passed on; docs/forwarding.rst spells each case out.

A dial that fails at once (no session for the client key, the session is
full or ended) closes the accepted socket at once and logs a warning. So does
a dial the far side could not make (target refused, unreachable, not
allowed): the warning names the forward, the client key, the target and the
far side's reason. At most :data:`WARNING_BURST` such warnings per forward go
out in :data:`WARNING_WINDOW` seconds; the next one after a quiet spell says
how many were left out.

Only stream protocols a client can dial can be forwarded
(:data:`FORWARD_PROTOS`): a forward listens on TCP and pipes a byte stream.

:func:`parse_forward_spec` reads the command-line form
``LISTEN=CLIENT_KEY:PROTO:ADDRESS``, e.g.
``127.0.0.1:9125=foo:tcp:127.0.0.1:8125``.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Set, Tuple

from ..addresses import join_host_port, parse_listen_address
from ..connection import TunnelConnection
from ..errors import RemoteError, error_text
from ..piping import Piper, Waker, default_piper

__all__ = [
    "FORWARD_PROTOS",
    "ForwardSpec",
    "KeyDialer",
    "PortForward",
    "TunnelDialFunc",
    "accept_pending",
    "parse_forward_spec",
    "start_forward",
]

log = logging.getLogger(__name__)

TunnelDialFunc = Callable[[], TunnelConnection]
"""``() -> TunnelConnection``: opens the tunneled side of one forwarded connection."""

ListenAddress = Tuple[str, int]

DEFAULT_LISTEN_HOST = "127.0.0.1"
# Back off this long after accept() fails (e.g. out of file descriptors), so
# the loop does not spin while the condition lasts.
ACCEPT_ERROR_DELAY = 0.1
#: The protocols a forward can serve: byte streams a client dials.
FORWARD_PROTOS = ("tcp", "tcp4", "tcp6", "unix")
#: Failed-dial warnings: at most WARNING_BURST per forward in WARNING_WINDOW seconds.
WARNING_BURST = 5
WARNING_WINDOW = 10.0


class KeyDialer(Protocol):
    """Anything that dials through a client by key, like the server's ``dial``."""

    def dial(
        self, client_key: str, proto: str, address: str, timeout: Optional[float] = None
    ) -> TunnelConnection:
        """Open ``proto/address`` through the client ``client_key``."""


# --------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ForwardSpec:
    """One forward: listen on ``listen`` here, reach ``proto/address`` through
    the client registered as ``client_key``."""

    listen: ListenAddress
    client_key: str
    proto: str
    address: str

    def __str__(self) -> str:
        return f"{join_host_port(*self.listen)}={self.client_key}:{self.proto}:{self.address}"


def parse_forward_spec(text: str) -> ForwardSpec:
    """Parse ``LISTEN=CLIENT_KEY:PROTO:ADDRESS``; ``LISTEN`` is a listen address
    (:func:`~remotedialer.addresses.parse_listen_address`) whose bare ``PORT``
    form listens on ``127.0.0.1``.

    ``ADDRESS`` is everything after the second colon of the right-hand side,
    so it may hold colons itself (``[::1]:22``, ``127.0.0.1:8125``); the
    client key and the proto may not. Raises ``ValueError`` with the reason.
    """
    listen_text, sep, target = text.partition("=")
    if not sep:
        raise ValueError(f"forward {text!r}: want LISTEN=CLIENT_KEY:PROTO:ADDRESS")
    try:
        listen = parse_listen_address(listen_text, DEFAULT_LISTEN_HOST)
    except ValueError as exc:
        raise ValueError(f"forward {text!r}: {exc}") from None
    client_key, sep1, rest = target.partition(":")
    proto, sep2, address = rest.partition(":")
    if not (sep1 and sep2) or not client_key or not proto or not address:
        raise ValueError(f"forward {text!r}: want LISTEN=CLIENT_KEY:PROTO:ADDRESS")
    if "/" in proto:
        raise ValueError(f"forward {text!r}: proto may not contain '/'")
    check_forward_proto(proto, f"forward {text!r}")
    return ForwardSpec(listen, client_key, proto, address)


def check_forward_proto(proto: str, what: str = "forward") -> None:
    """Raise ``ValueError`` unless ``proto`` is one a forward can serve."""
    if proto not in FORWARD_PROTOS:
        raise ValueError(
            f"{what}: cannot forward proto {proto!r}: a forward pipes a TCP byte stream, "
            f"so the target must be one of {', '.join(FORWARD_PROTOS)}"
        )


class WarningLimiter:
    """Lets at most ``burst`` warnings through per ``window`` seconds and
    counts the rest. Thread-safe; ``clock`` is for tests."""

    def __init__(
        self, burst: int = WARNING_BURST, window: float = WARNING_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()  # guards the three fields below
        self._window_start = float("-inf")
        self._sent = 0
        self._suppressed = 0

    def admit(self) -> Optional[int]:
        """``None``: stay quiet (counted). Otherwise log now; the value is how
        many warnings were left out since the last one admitted."""
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self.window:
                self._window_start, self._sent = now, 0
            if self._sent >= self.burst:
                self._suppressed += 1
                return None
            self._sent += 1
            left_out, self._suppressed = self._suppressed, 0
            return left_out


# ------------------------------------------------------------------ forwards
class PortForward:
    """Listens on ``listen`` and forwards every accepted connection through a
    tunnel opened by ``dial`` (see the module doc for data flow and closing).

    The constructor binds (raising ``OSError`` if it cannot) and starts the
    accept thread; :meth:`stop` ends it. Accepted sockets get ``TCP_NODELAY``.
    Use as a context manager to stop on exit. ``piper`` defaults to the
    process-wide one; ``target`` describes where connections go, for logs
    (``name`` is ``forward HOST:PORT=TARGET``, with the bound port).
    """

    def __init__(
        self,
        dial: TunnelDialFunc,
        listen: ListenAddress = (DEFAULT_LISTEN_HOST, 0),
        *,
        piper: Optional[Piper] = None,
        target: str = "",
        backlog: int = 128,
    ) -> None:
        self._dial = dial
        self.piper = piper or default_piper()
        self._listener = _bind(listen, backlog)
        self._address: ListenAddress = self._listener.getsockname()[:2]
        self.name = f"forward {_show(self._address)}" + (f"={target}" if target else "")
        # _lock guards _live, _stopping and the counters; it is never held
        # while calling into a connection, the piper or the dial function.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when _live shrinks
        self._live: Set[TunnelConnection] = set()
        self._stopping = False
        self._stop_event = threading.Event()  # set by stop(); for waits without the lock
        self._accepted = 0
        self._failed = 0
        self._warnings = WarningLimiter()
        self._waker = Waker()
        self._selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._waker.reader, selectors.EVENT_READ)
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"remotedialer-{self.name}", daemon=True
        )
        self._thread.start()
        log.info("%s: listening", self.name)

    def __repr__(self) -> str:
        state = "stopped" if self._stopping else f"{self.active} active"
        return f"<PortForward {_show(self._address)} {state}>"

    @property
    def address(self) -> ListenAddress:
        """The bound ``(host, port)``, with the real port when 0 was asked for."""
        return self._address

    @property
    def active(self) -> int:
        """Forwarded connections currently piping."""
        with self._lock:
            return len(self._live)

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._accepted

    @property
    def failed(self) -> int:
        """Accepted connections whose dial failed, here (closed at once) or on
        the far side (which ended the connection with an error)."""
        return self._failed

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping

    def connections(self) -> Set[TunnelConnection]:
        """A snapshot of the tunneled connections currently piping."""
        with self._lock:
            return set(self._live)

    def stop(self, close_connections: bool = True, timeout: Optional[float] = 5.0) -> bool:
        """Close the listener; with ``close_connections`` also close every live
        forwarded connection (the far side gets ``ERROR EOF``). Blocks until
        the accept thread ended and, when closing connections, until their
        pipes finished, each bounded by ``timeout``. Returns whether all of
        that happened in time. Idempotent."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
        self._stop_event.set()
        if first:
            self._waker.wake()
        done = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            done = not self._thread.is_alive()
        if close_connections:
            for conn in self.connections():
                conn.close()  # the piper sees it and closes the accepted socket
            done = self.wait_idle(timeout) and done
        return done

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until no forwarded connection is piping or ``timeout`` passed;
        True if idle."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._live, timeout)

    def __enter__(self) -> "PortForward":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _warn(self, message: str, *args: object) -> None:
        """Log a failure at WARNING, rate-limited per forward."""
        left_out = self._warnings.admit()
        if left_out is None:
            return
        if left_out:
            message += " (%d similar warnings left out)"
            args += (left_out,)
        log.warning(message, *args)

    # -------------------------------------------------------- accept thread
    def _accept_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                for key, _mask in self._selector.select():
                    if key.fileobj is self._listener:
                        self._accept_ready()
        except Exception:  # pragma: no cover - a bug here must be loud
            log.exception("%s: accept loop failed", self.name)
        finally:
            self._selector.close()
            self._listener.close()
            self._waker.close()
            log.info("%s: stopped listening", self.name)

    def _accept_ready(self) -> None:
        """Accept every pending connection (the listener is non-blocking)."""
        for sock, peer in accept_pending(self._listener, self.name, self._stop_event.wait):
            self._accepted += 1
            self._forward(sock, peer)

    def _forward(self, sock: socket.socket, peer: object) -> None:
        """Dial through the tunnel for one accepted socket and start piping."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - not TCP
            pass
        try:
            conn = self._dial()
        except Exception as exc:
            with self._lock:
                self._failed += 1
            self._warn(
                "%s: dial for %s failed, closing it: %s: %s",
                self.name, _show(peer), type(exc).__name__, error_text(exc),
            )
            _end_with_eof(sock)
            return
        log.debug("%s: %s -> %s", self.name, _show(peer), conn)
        with self._lock:
            self._live.add(conn)

        def done() -> None:
            error = conn.error
            if isinstance(error, RemoteError):  # the far side ended it with a reason
                # Logged before the counters change: whoever sees them sees the line.
                self._warn(
                    "%s: connection from %s failed at client %s, target %s/%s: %s",
                    self.name, _show(peer), conn.session.client_key, conn.proto, conn.address,
                    error.remote_message,
                )
            with self._lock:
                self._live.discard(conn)
                self._failed += isinstance(error, RemoteError)
                self._idle.notify_all()

        try:
            self.piper.pipe_socket(sock, conn, on_done=done)
        except RuntimeError as exc:  # the piper was stopped
            log.warning("%s: cannot pipe %s: %s", self.name, _show(peer), exc)
            conn.close()
            _close_quietly(sock)
            done()


def start_forward(
    dialer: KeyDialer,
    spec: ForwardSpec,
    *,
    dial_timeout: Optional[float] = None,
    piper: Optional[Piper] = None,
) -> PortForward:
    """Start forwarding ``spec.listen`` to ``spec.proto/spec.address`` through
    the client ``spec.client_key`` of ``dialer`` (a server). ``dial_timeout``
    bounds each dial (sending CONNECT). Raises ``ValueError`` for a proto a
    forward cannot serve (see :data:`FORWARD_PROTOS`), ``OSError`` if it
    cannot bind."""
    check_forward_proto(spec.proto)

    def dial() -> TunnelConnection:
        return dialer.dial(spec.client_key, spec.proto, spec.address, timeout=dial_timeout)

    target = f"{spec.client_key}:{spec.proto}:{spec.address}"
    return PortForward(dial, spec.listen, piper=piper, target=target)


# ------------------------------------------------------------------ helpers
def _bind(listen: ListenAddress, backlog: int) -> socket.socket:
    """A listening TCP socket on ``listen`` (IPv4 or IPv6 by the host's form)."""
    host, port = listen
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family = infos[0][0]
    address = infos[0][4]
    return socket.create_server(address[:2], family=family, backlog=backlog)


def accept_pending(
    listener: socket.socket, name: str, pause: Callable[[float], object]
) -> Iterator[Tuple[socket.socket, Any]]:
    """Yield ``(socket, peer)`` for each connection waiting on the
    non-blocking ``listener``. An accept error (out of descriptors, an
    aborted handshake) is logged, ``pause(ACCEPT_ERROR_DELAY)`` is called so
    the caller's loop does not spin while it lasts, and the iteration ends."""
    while True:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: accept failed: %s", name, exc)
            pause(ACCEPT_ERROR_DELAY)
            return
        yield sock, peer


def _show(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return join_host_port(str(address[0]), address[1])
    return str(address)


DRAIN_LIMIT = 256 * 1024
"""Bytes of unread input discarded before closing a connection we refuse
(closing a socket with unread input sends RST instead of FIN)."""


def _end_with_eof(sock: socket.socket) -> None:
    """End an accepted connection with EOF (FIN), even when the local program
    already sent data: send FIN, discard what already arrived (up to
    :data:`DRAIN_LIMIT`; unread input would turn the close into a reset),
    then close. Never blocks."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        drained = 0
        while drained < DRAIN_LIMIT:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:  # nothing (more) to read, or the peer is gone already
        pass
    _close_quietly(sock)


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:  # pragma: no cover
        pass
