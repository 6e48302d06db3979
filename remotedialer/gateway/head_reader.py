"""First request heads read on the listener's thread.

A front end that owns its listener (:class:`~remotedialer.gateway.frontend.
BoundedThreadedWSGIServer`) registers each accepted plain socket here instead
of starting a request thread for it: one selector, the listener's own, watches
the sockets whose first request head has not arrived, reads them without
blocking (``MSG_DONTWAIT``) and hands each complete head to the front end.
A tunnel's upgrade is then answered on that same thread and only the
session's reader gets a thread; anything else goes to a request thread with
the bytes already read. A head that does not arrive within the timeout is
cut here (Go's ``ReadHeaderTimeout``) without ever holding a thread, so a
slow client delays no other handshake.

:func:`parse_upgrade` picks the heads taken on the listener's thread (a
bodyless ``GET`` asking for a WebSocket); :func:`environ_from_head` builds
the WSGI environ of a parsed head (the request threads use it too).
"""

from __future__ import annotations

import collections
import io
import logging
import selectors
import socket
import sys
import time
import urllib.parse
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..server.wsgi import header_tokens
from ..transports.wsgi import NODELAY_SET
from .http1 import RequestRefused, read_request_fields, request_line_error

__all__ = ["HeadReader", "PendingHead", "parse_upgrade", "environ_from_head", "MAX_LISTENER_HEAD"]

log = logging.getLogger(__name__)

#: A first head longer than this is not waited for on the listener's thread:
#: what arrived goes to a request thread, which reads the rest under the
#: usual limits (an agent's upgrade head is a few hundred bytes).
MAX_LISTENER_HEAD = 16 * 1024
_RECEIVE = 4096
_DONT_WAIT = getattr(socket, "MSG_DONTWAIT", 0)
_EMPTY_INPUT = io.BytesIO(b"")  # wsgi.input of a bodyless upgrade: never read


class PendingHead:
    """An accepted socket whose first head is being read: the bytes so far
    and when it must be complete (``None``: no limit)."""

    __slots__ = ("sock", "address", "data", "deadline", "done")

    def __init__(self, sock: socket.socket, address: Any, deadline: Optional[float]) -> None:
        self.sock = sock
        self.address = address
        self.data = b""
        self.deadline = deadline
        self.done = False  # handed on, cut or closed: the deadline queue skips it


HeadHandler = Callable[[socket.socket, Any, bytes], None]
"""``on_head(sock, address, data)``: a first head is complete (``data``
holds it and whatever followed), or too long to wait for, or the client
ended before completing it (``data`` is then what came, maybe nothing)."""


class HeadReader:
    """The first heads being read on one selector's thread (see the module
    doc). Only that thread calls its methods; nothing here blocks.

    :meth:`add` an accepted socket; the selector's events for the keys it
    registers (their data is a :class:`PendingHead`) go to :meth:`readable`;
    :meth:`expire` cuts heads past their deadline and says how long until
    the next one. ``timeout`` is the same for every head, so the deadlines
    queue in arrival order."""

    def __init__(self, selector: selectors.BaseSelector, timeout: Optional[float],
                 on_head: HeadHandler) -> None:
        self._selector = selector
        self._timeout = timeout
        self._on_head = on_head
        self._deadlines: Deque[PendingHead] = collections.deque()
        self._waiting: Dict[int, PendingHead] = {}  # by file descriptor: registered with the selector
        #: Connections cut because their head did not arrive in time.
        self.cut = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, sock: socket.socket, address: Any) -> None:
        """Read ``sock``'s first head: at once if it is there (the usual case
        in a reconnect storm: it arrived before the accept), else once the
        selector says it is readable."""
        deadline = time.monotonic() + self._timeout if self._timeout else None
        pending = PendingHead(sock, address, deadline)
        if self._read(pending):
            return
        try:
            self._selector.register(sock, selectors.EVENT_READ, pending)
        except (OSError, ValueError) as exc:
            log.debug("cannot watch an accepted connection: %s", exc)
            _close(sock)
            return
        self._waiting[sock.fileno()] = pending
        if deadline is not None:
            self._deadlines.append(pending)

    def readable(self, pending: PendingHead) -> None:
        """The selector found ``pending``'s socket readable."""
        if not pending.done and self._read(pending):
            self._forget(pending)

    def _read(self, pending: PendingHead) -> bool:
        """Read what is there; True once the head went on (or the socket was
        closed), False to wait for more."""
        try:
            data = pending.sock.recv(_RECEIVE, _DONT_WAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pending.done = True
            _close(pending.sock)
            return True
        if data:
            pending.data += data
            if b"\r\n\r\n" not in pending.data and len(pending.data) <= MAX_LISTENER_HEAD:
                return False
        elif not pending.data:  # closed before sending anything
            pending.done = True
            _close(pending.sock)
            return True
        pending.done = True
        self._on_head(pending.sock, pending.address, pending.data)
        return True

    def _forget(self, pending: PendingHead) -> None:
        self._waiting.pop(pending.sock.fileno(), None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError, OSError):
            pass

    def expire(self) -> Optional[float]:
        """Cut the connections whose head is late; seconds until the next
        deadline (``None``: none pending)."""
        now = time.monotonic()
        queue = self._deadlines
        while queue:
            pending = queue[0]
            if pending.done:
                queue.popleft()
                continue
            assert pending.deadline is not None
            if pending.deadline > now:
                return pending.deadline - now
            queue.popleft()
            pending.done = True
            self._forget(pending)
            self.cut += 1
            log.debug("closed a connection whose request head did not arrive within %gs", self._timeout)
            _close(pending.sock)
        return None

    def close(self) -> None:
        """Close every connection still waiting for its head."""
        for pending in list(self._waiting.values()):
            pending.done = True
            self._forget(pending)
            _close(pending.sock)
        self._deadlines.clear()


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def parse_upgrade(head: bytes) -> Optional[Tuple[str, str, List[Tuple[str, str]]]]:
    """``(path, version, fields)`` of a complete request head (``head`` ends
    with its blank line) that is a bodyless HTTP/1.1 ``GET`` of an
    origin-form target asking to upgrade to ``websocket``; ``None`` for any
    other (including every head the request threads refuse: those are
    refused there, with the same answers as always)."""
    line, _, rest = head.partition(b"\r\n")
    words = line.decode("iso-8859-1").split()
    if len(words) != 3 or words[0] != "GET" or words[2] != "HTTP/1.1":
        return None
    if request_line_error(line + b"\r\n", words[2]) is not None:
        return None
    path = words[1]
    if not path.startswith("/") or path.startswith("//") or "#" in path:
        return None
    try:
        fields = read_request_fields(words[2], io.BytesIO(rest).readline)
    except RequestRefused:
        return None
    upgrade = ""
    for name, value in fields:
        lowered = name.lower()
        if lowered == "transfer-encoding" or (lowered == "content-length" and value != "0"):
            return None
        if lowered == "upgrade":
            upgrade = f"{upgrade},{value}" if upgrade else value
    if upgrade.lower() != "websocket" and "websocket" not in header_tokens(upgrade):
        return None
    return path, words[2], fields


def environ_from_head(
    command: str,
    path: str,
    version: str,
    fields: Sequence[Tuple[str, str]],
    sock: socket.socket,
    client_address: Any,
    server: Any,
    software: str,
    socket_key: str,
    *,
    nodelay: bool,
    rfile: Any = _EMPTY_INPUT,
) -> Dict[str, Any]:
    """The WSGI environ werkzeug's handler would build for a request head
    with an origin-form ``path`` (no ``#``) read from the plain socket
    ``sock``, whose socket is exposed under ``socket_key``; ``server`` is
    the socketserver serving it, ``software`` its ``SERVER_SOFTWARE``;
    ``nodelay``: ``sock`` has ``TCP_NODELAY`` set already."""
    raw_path, _, query = path.partition("?")
    path_info = urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path
    # PEP 3333 strings: werkzeug's UTF-8 bytes read as latin-1
    if not path.isascii():
        path, query = path.encode().decode("latin-1"), query.encode().decode("latin-1")
    if not path_info.isascii():
        path_info = path_info.encode().decode("latin-1")
    environ: Dict[str, Any] = {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": rfile,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": server.multithread,
        "wsgi.multiprocess": server.multiprocess,
        "wsgi.run_once": False,
        socket_key: sock,
        NODELAY_SET: nodelay,
        "SERVER_SOFTWARE": software,
        "REQUEST_METHOD": command,
        "SCRIPT_NAME": "",
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "REQUEST_URI": path,
        "RAW_URI": path,
        "REMOTE_ADDR": client_address[0] if client_address else "<local>",
        "REMOTE_PORT": client_address[1] if client_address else 0,
        "SERVER_NAME": server.server_address[0],
        "SERVER_PORT": str(server.server_address[1]),
        "SERVER_PROTOCOL": version,
    }
    for name, value in fields:
        if "_" in name:  # as werkzeug: such a name could pass for another header
            continue
        key = name.upper().replace("-", "_")
        if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
            key = "HTTP_" + key
            if key in environ:
                value = f"{environ[key]},{value}"
        environ[key] = value
    encoding = environ.get("HTTP_TRANSFER_ENCODING")
    if encoding and "chunked" in header_tokens(encoding):
        environ["wsgi.input_terminated"] = True  # run_wsgi reads the chunked body
    return environ
