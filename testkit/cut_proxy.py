"""A TCP proxy on loopback that cuts its connections on demand.

Sits between an agent and a server to play the network failing under a
tunnel: :meth:`CutProxy.reset` kills every connection with a TCP reset
(both ends see ``ECONNRESET`` at once), :meth:`CutProxy.blackhole` stops
forwarding without telling anyone (a silent drop: both ends see nothing
until their keepalive notices) and refuses new connections until
:meth:`CutProxy.restore`. Only ``127.0.0.1`` is used.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from typing import Callable, List, Tuple

__all__ = ["CutProxy"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (linger on, timeout 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Pair:
    """One proxied connection: the accepted socket and the one to the target."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.done = False


class CutProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; see the module doc.

    One thread moves the bytes of every connection (``selectors``). Use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        # _lock guards _pairs, _blackholed and _closed; the thread takes it
        # for each batch of events, callers for each change.
        self._lock = threading.Lock()
        self._pairs: List[_Pair] = []
        self._blackholed = False
        self._closed = False
        self._actions: List[Tuple[Callable[[], None], threading.Event]] = []
        self.accepted = 0  #: connections accepted so far
        self.bytes_forwarded = 0  #: bytes moved, both directions
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="cut-proxy", daemon=True)
        self._thread.start()

    @property
    def url_host(self) -> str:
        """``127.0.0.1:<port>`` for URLs."""
        return f"127.0.0.1:{self.port}"

    def connections(self) -> int:
        """How many proxied connections are open."""
        with self._lock:
            return len(self._pairs)

    # --------------------------------------------------------------- faults
    def reset(self) -> None:
        """Kill every proxied connection with a TCP reset, both ways."""
        self._on_thread(self._reset_all)

    def blackhole(self) -> None:
        """Stop forwarding silently: open connections stay open and carry
        nothing (what each end sent is lost), new ones are reset at once."""
        with self._lock:
            self._blackholed = True

    def restore(self) -> None:
        """End a blackhole: connections made from now on work. The ones that
        were blackholed are reset (their bytes in flight are gone)."""
        def restore() -> None:
            with self._lock:
                self._blackholed = False
            self._reset_all()

        self._on_thread(restore)

    def _reset_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            self._end(pair, rst=True)

    def _on_thread(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the proxy thread (which owns the sockets) and
        wait for it."""
        done = threading.Event()
        with self._lock:
            self._actions.append((action, done))
        self._wake()
        if not done.wait(10):
            raise TimeoutError("cut proxy thread did not answer")

    # ------------------------------------------------------------------ run
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _end(self, pair: _Pair, rst: bool) -> None:
        if pair.done:
            return
        pair.done = True
        for sock in (pair.downstream, pair.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
            if rst:
                _reset(sock)
            else:
                sock.close()

    def _accept(self) -> None:
        try:
            downstream, _addr = self._listener.accept()
        except OSError:
            return
        with self._lock:
            blackholed = self._blackholed
        if blackholed:
            _reset(downstream)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(downstream)
            return
        for sock in (downstream, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(downstream, upstream)
        with self._lock:
            self._pairs.append(pair)
            self.accepted += 1
        self._selector.register(downstream, selectors.EVENT_READ, (pair, upstream))
        self._selector.register(upstream, selectors.EVENT_READ, (pair, downstream))

    def _forward(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        with self._lock:
            blackholed = self._blackholed
            if pair.done:
                return
        try:
            data = source.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if blackholed and data:
            return  # swallowed: a silent drop
        if not data:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            self._end(pair, rst=False)
            return
        try:
            sink.setblocking(True)
            sink.settimeout(10)
            sink.sendall(data)
            sink.setblocking(False)
        except OSError:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            self._end(pair, rst=True)
            return
        self.bytes_forwarded += len(data)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                for key, _mask in self._selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        with self._lock:
                            actions, self._actions = self._actions, []
                        for action, done in actions:
                            action()
                            done.set()
                    else:
                        pair, sink = key.data
                        self._forward(pair, key.fileobj, sink)  # type: ignore[arg-type]
        except Exception:  # pragma: no cover - a test helper must say why it stopped
            log.exception("cut proxy failed")

    # ------------------------------------------------------------- closing
    def close(self) -> None:
        """Stop the proxy and close every connection."""
        with self._lock:
            self._closed = True
            pairs, self._pairs = self._pairs, []
        self._wake()
        self._thread.join(5)
        for pair in pairs:
            self._end(pair, rst=False)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> "CutProxy":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

