"""The server end of a tunnel's WebSocket, taken over from a WSGI server.

The connect endpoint runs inside a WSGI server (werkzeug's threaded server,
gunicorn's ``gthread`` worker). Once the request is authorized, the handler
thread takes the raw socket out of the WSGI environ, answers the upgrade
itself and then *is* the session's reader: :class:`ServerWebSocket` reads and
decodes frames on whichever thread calls :meth:`~ServerWebSocket.receive`. No
extra thread per tunnel is started (simple-websocket would start one), received
messages are never queued behind the reader's back, so TCP backpressure reaches
the client, and every write — data, pongs, close frames — goes through one
lock and is written completely (``sendall``).

Pieces, from the bottom (the frame codec itself is :mod:`remotedialer.frames`):

* :func:`is_websocket_request`, :func:`accept_key`, :func:`socket_from_environ`:
  the handshake;
* :class:`ServerWebSocket`: the :class:`~remotedialer.transport.Transport`;
* :func:`finish_taken_over_response`: ends the WSGI call so that the server
  writes nothing more into the socket.

:class:`SimpleWebSocketTransport` adapts simple-websocket instead, for those
who prefer it; it costs one more thread per tunnel.

No subprotocols are negotiated, as with the Go server.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple


from ..addresses import join_host_port
from ..errors import ProtocolError, ReaderReleased
from ..frames import (
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_UNSUPPORTED_DATA,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WebSocketProtocolError,
    close_payload,
    encode_frame,
    encode_frame_header,
    parse_close,
)
from ..protocol import Bytes
from ..singleton import Singleton
from .base import (
    ReceiveSize, TransportClosed, TransportEnded, next_event_from_socket, sendall_parts, wait_for_write,
)

if TYPE_CHECKING:
    from ..frames import WebSocketEvent
    from ..poller import Poller

__all__ = [
    "NODELAY_SET",
    "TAKEN_SOCKET",
    "is_websocket_request",
    "ServerWebSocket",
    "SimpleWebSocketTransport",
    "finish_taken_over_response",
    "UnsupportedServerError",
    "header_tokens",
]

log = logging.getLogger(__name__)

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""The magic GUID of RFC 6455 §1.3."""

#: Bytes asked of ``recv`` at a time (64 KiB measured twice as fast as 4 KiB).
RECEIVE_BYTES = 64 * 1024
#: Bytes asked of ``recv`` after a read that brought less than this (an idle
#: tunnel: pings). A blocked ``recv(n)`` holds an ``n``-byte buffer; asked
#: small, that buffer comes from Python's small-object allocator instead of
#: malloc, where thousands of idle readers' 64 KiB buffers fragmented the
#: heap (server RSS grew ~27 KiB per idle tunnel over its first pings).
IDLE_RECEIVE_BYTES = 256
#: Messages up to this size are joined with their frame header into one
#: write; larger ones go as two parts of one ``sendmsg`` (no copy).
_JOIN_LIMIT = 2 * 1024
#: How long :meth:`ServerWebSocket.close` waits to write its close frame.
_CLOSE_WRITE_TIMEOUT = 1.0
#: WSGI environ key a front end sets to True when the request's socket has
#: ``TCP_NODELAY`` already (the project's front end and worker): the
#: upgrade then spares that system call, one per tunnel accepted.
NODELAY_SET = "remotedialer.tcp_nodelay"
#: The environ key under which a front end that reads request heads itself
#: (no WSGI server, no request thread) hands an app's
#: ``handshake(environ, start_response)`` the client socket.
TAKEN_SOCKET = "remotedialer.socket"
#: MSG_DONTWAIT where there is one: the poller's reads never block.
_DONT_WAIT = getattr(socket, "MSG_DONTWAIT", 0)
# Pongs owed but not written yet, at most this many (the oldest are dropped: a
# pong for the latest ping is enough, RFC 6455 5.5.3).
_MAX_PENDING_PONGS = 64


# ---------------------------------------------------------------- handshake
def header_tokens(value: str) -> List[str]:
    """The lower-cased tokens of a comma-separated header value such as
    ``Connection: keep-alive, Upgrade`` (empty items dropped). Join repeated
    headers with ``","`` first."""
    return [token for token in (item.strip().lower() for item in value.split(",")) if token]


def _has_token(environ: Mapping[str, Any], name: str, wanted: str) -> bool:
    """Whether the header ``name`` of ``environ`` lists the token ``wanted``
    (lower case); a value that is that token alone, as every agent sends, is
    taken without splitting."""
    value = str(environ.get(name, ""))
    return value.lower() == wanted or wanted in header_tokens(value)


def is_websocket_request(environ: Mapping[str, Any]) -> Optional[str]:
    """Why ``environ`` is not a valid WebSocket upgrade request (RFC 6455
    §4.2.1), or ``None`` if it is one."""
    if environ.get("REQUEST_METHOD", "GET") != "GET":
        return "websocket: the request method is not GET"
    if not _has_token(environ, "HTTP_UPGRADE", "websocket"):
        return "websocket: the client is not using the websocket protocol: 'upgrade' token not found"
    if not _has_token(environ, "HTTP_CONNECTION", "upgrade"):
        return "websocket: the client is not using the websocket protocol: 'Connection: Upgrade' missing"
    if not _has_token(environ, "HTTP_SEC_WEBSOCKET_VERSION", "13"):
        return "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header"
    key = str(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")).strip()
    try:
        valid_key = len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        return "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header is missing or blank"
    return None


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value answering ``Sec-WebSocket-Key: key``."""
    digest = hashlib.sha1(key.strip().encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def describe_remote(environ: Mapping[str, Any]) -> str:
    """``host:port`` of the client of a WSGI request, for logs."""
    return join_host_port(str(environ.get("REMOTE_ADDR") or "?"), str(environ.get("REMOTE_PORT") or "?"))


class UnsupportedServerError(RuntimeError):
    """The WSGI server does not expose its socket (only werkzeug and gunicorn do)."""


def socket_from_environ(environ: Mapping[str, Any]) -> Tuple[socket.socket, str]:
    """The client socket of the request and the server kind (``"werkzeug"``,
    ``"gunicorn"``, or ``"remotedialer"`` for a front end's own handshake).
    Raises :class:`UnsupportedServerError` otherwise."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        return sock, "werkzeug"
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        return sock, "gunicorn"
    sock = environ.get(TAKEN_SOCKET)
    if sock is not None:
        return sock, "remotedialer"
    raise UnsupportedServerError(
        "this WSGI server does not expose the client socket; "
        "use werkzeug's server or gunicorn with the gthread worker"
    )


class _TakenOver(ConnectionResetError):
    """Raised out of the WSGI app under werkzeug: werkzeug treats a
    ``ConnectionError`` as a dropped connection and writes nothing more."""


def finish_taken_over_response(server_kind: str) -> NoReturn:
    """End a WSGI call whose socket was taken over, so that the WSGI server
    writes nothing more into it; always raises.

    werkzeug writes a status line for any return value but stays silent on a
    ``ConnectionError``; gunicorn closes the connection quietly on
    ``StopIteration`` (the same ways flask-sock ends its responses). The
    socket must already be shut down so that werkzeug's drain of unread
    input ends at once.
    """
    if server_kind == "gunicorn":
        raise StopIteration()
    raise _TakenOver(errno.ECONNRESET, "websocket session ended")


def _ended_socket() -> socket.socket:
    """A socket whose peer has gone: reads see EOF, writes fail, shutdown
    and close do nothing to anyone (see :meth:`ServerWebSocket._take_socket_over`)."""
    ours, theirs = socket.socketpair()
    theirs.close()
    ours.shutdown(socket.SHUT_RDWR)
    return ours


_ENDED_SOCKET = Singleton(_ended_socket)


# ------------------------------------------------------------------ transport
class ServerWebSocket:
    """The server side of an upgraded WebSocket, as a
    :class:`~remotedialer.transport.Transport`.

    :meth:`accept` answers the handshake on the socket of a WSGI request.
    Reading happens on the thread calling :meth:`receive` (the session's
    reader): pings are answered and counted as keepalive there, a close frame
    is answered and ends the stream. ``_send_lock`` guards every write to the
    socket and ``_close_sent``; nothing else is taken while it is held.
    """

    def __init__(
        self,
        sock: socket.socket,
        max_message_size: int,
        description: str = "",
        receive_bytes: int = RECEIVE_BYTES,
        set_nodelay: bool = True,
    ) -> None:
        self.sock = sock
        self.receive_bytes = receive_bytes
        self._receive_size = ReceiveSize(receive_bytes, IDLE_RECEIVE_BYTES)  # reader thread only
        self.last_keepalive = time.monotonic()
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self._reader = FrameReader(max_message_size)
        self._description = description or "websocket"
        self._send_lock = threading.Lock()
        self._close_sent = False  # guarded by _send_lock
        # The 101 answer accept() deferred until open() or the first write
        # (guarded by _send_lock once the transport is shared).
        self._answer: Optional[bytes] = None
        # Pongs: the reader must never block on the socket (a bulk send stuck
        # on a peer that is itself stuck writing to us would deadlock both
        # sides), so it queues its pong in _pending_pongs; writers send what
        # is queued after their own write, and the reader sends it itself only
        # when no writer is around and the socket can take it at once.
        # _pong_lock guards _writers (writers waiting for or holding
        # _send_lock); it is never held together with another lock nor during
        # I/O. Pongs are popped only by whoever holds _send_lock.
        self._pong_lock = threading.Lock()
        self._writers = 0
        # A list, not a deque: an idle tunnel holds it for good, and a deque
        # allocates a 528-byte block at once; it rarely holds more than one.
        self._pending_pongs: List[bytes] = []
        # _close_lock serializes close(): a second caller waits until the
        # first has written the close frame and shut the socket down. It is
        # taken before _send_lock, never after.
        self._close_lock = threading.Lock()
        self._closed = False  # close() began: readers stop
        self._shut_down = False  # close() finished (guarded by _close_lock)
        # Parking (park_when): while _may_park() holds, the reader hands the
        # socket to the poller and its thread leaves (ReaderReleased); the
        # poller owns _reader and _handed until it hands the socket back
        # (resume), which calls _serve_again() for a new reader, the owner
        # of both from then on. _on_poller: parked now (a hint for send()).
        self._may_park: Optional[Callable[[], bool]] = None
        self._poller: Optional["Poller"] = None
        self._serve_again: Optional[Callable[[], None]] = None
        self._on_poller = False
        self._handed: Optional[Tuple[Optional["WebSocketEvent"], Optional[BaseException]]] = None
        # The socket was taken from the WSGI server (the first release): we
        # close it (close_taken_socket), not the server.
        self._owns_socket = False
        # The last frame the reader read itself was a ping: the tunnel is
        # idle, not between two requests (those never wait for a hand-over).
        self._pinged = False
        #: Frames the reader thread read itself (pings included): parked
        #: sessions' pings do not count here (tests watch it).
        self.reader_frames = 0
        if sock.gettimeout() is not None:  # settimeout(None) is a system call even when it is None
            sock.settimeout(None)  # liveness is the heartbeat's job, not a socket timeout
        if set_nodelay:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # not TCP
                pass

    @classmethod
    def accept(
        cls,
        environ: Mapping[str, Any],
        max_message_size: int,
        receive_bytes: int = RECEIVE_BYTES,
        extra_headers: Sequence[Tuple[str, str]] = (),
        deferred: bool = False,
    ) -> "ServerWebSocket":
        """Answer the upgrade request in ``environ`` with ``101 Switching
        Protocols`` (plus ``extra_headers``, ASCII), written straight to the
        socket. Check the request with :func:`is_websocket_request` first.
        Blocks on the socket write; raises ``OSError`` if it fails and
        :class:`UnsupportedServerError` if the server does not expose its
        socket. ``deferred``: the answer waits for :meth:`open` or the first
        write, whichever comes first (register the session in between, so
        that a client that sees the answer finds its session registered)."""
        sock, _kind = socket_from_environ(environ)
        key = str(environ["HTTP_SEC_WEBSOCKET_KEY"])
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        response = (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
            f"{extra}"
            "\r\n"
        ).encode("ascii")
        if not deferred:
            sock.sendall(response)
        transport = cls(sock, max_message_size, describe_remote(environ), receive_bytes,
                        set_nodelay=environ.get(NODELAY_SET) is not True)
        if deferred:
            transport._answer = response
        return transport

    def open(self) -> None:
        """Write the ``101`` answer :meth:`accept` deferred, unless a write
        sent it already. Raises :class:`TransportClosed` if it fails
        (nothing more is written)."""
        if self._answer is None:
            return
        with self._send_lock:
            self._send_answer()

    def _send_answer(self) -> None:
        """Under ``_send_lock``: the deferred ``101`` answer, if still owed."""
        answer, self._answer = self._answer, None
        if answer is None:
            return
        try:
            self.sock.sendall(answer)
        except OSError as exc:
            self._close_sent = True
            raise TransportClosed(f"websocket upgrade failed: {exc}") from exc

    # -- writes
    def _write(self, data: Bytes, payload: Optional[Bytes] = None) -> None:
        """Write ``data`` (then ``payload``) completely, under the send lock,
        then the pongs owed."""
        with self._pong_lock:
            self._writers += 1
        try:
            with self._send_lock:
                if self._close_sent:
                    raise TransportClosed("websocket closed")
                if self._answer is not None:
                    self._send_answer()
                try:
                    if payload is None:
                        self.sock.sendall(data)
                    else:
                        sendall_parts(self.sock, data, payload)
                    while self._pending_pongs:
                        self.sock.sendall(self._pending_pongs.pop(0))
                        self.last_keepalive = time.monotonic()
                except OSError as exc:
                    raise TransportClosed(f"websocket write failed: {exc}") from exc
        finally:
            with self._pong_lock:
                self._writers -= 1
                stranded = not self._writers and bool(self._pending_pongs)
            if stranded:  # a pong queued after our flush, with no writer left
                self._flush_pongs()

    def _answer_ping(self, payload: bytes) -> None:
        """Reader thread: owe a pong and send it if that cannot block."""
        with self._pong_lock:
            if len(self._pending_pongs) >= _MAX_PENDING_PONGS:
                del self._pending_pongs[0]
            self._pending_pongs.append(encode_frame(OP_PONG, payload))
            if self._writers:
                return  # a writer sends it after its write
        self._flush_pongs()

    def _flush_pongs(self) -> None:
        """Send the pongs owed if the socket is free and can take them at
        once; otherwise they go after the next write (or with the next ping).
        Never blocks. Errors show on the next read or write."""
        if not self._send_lock.acquire(blocking=False):
            return  # a writer took the socket since: it sends them
        try:
            if self._close_sent:
                self._pending_pongs.clear()
                return
            while self._pending_pongs:
                if not self._send_pong_now(self._pending_pongs[0]):
                    return
                self._pending_pongs.pop(0)
                self.last_keepalive = time.monotonic()
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    def _send_pong_now(self, frame: bytes) -> bool:
        """With ``_send_lock`` held: write ``frame`` if the socket takes it at
        once; False (nothing written) if it cannot. One ``send`` where
        ``MSG_DONTWAIT`` exists (no ``poll`` first: the poller answers
        thousands of pings a second). A frame taken in part is finished
        within :data:`_CLOSE_WRITE_TIMEOUT`, or the socket is shut down (its
        stream would be corrupt): the reader then ends the session."""
        if not _DONT_WAIT:
            # poll, not select: any descriptor number (select fails past 1023)
            if not wait_for_write(self.sock, timeout=0):
                return False
            self.sock.sendall(frame)
            return True
        try:
            sent = self.sock.send(frame, _DONT_WAIT)
        except BlockingIOError:
            return False
        if sent < len(frame):
            if not wait_for_write(self.sock, timeout=_CLOSE_WRITE_TIMEOUT):
                self._close_sent = True  # nothing more may follow half a frame
                self.sock.shutdown(socket.SHUT_RDWR)
                raise TransportClosed("websocket stuck in the middle of a pong")
            self.sock.sendall(frame[sent:])
        return True

    def send(self, data: Bytes, tail: Bytes = b"") -> None:
        """Send one binary message, ``data`` then ``tail``. Blocks until the
        socket took all of it; raises :class:`TransportClosed` if the
        WebSocket is closed or fails. A large message is written as two
        parts (frame header and ``data``, then ``tail``) of one ``sendmsg``:
        its payload is never copied. A parked transport is handed back
        first (a dial through an idle tunnel: its reader is ready for the
        answer)."""
        if self._on_poller:
            assert self._poller is not None
            self._poller.unpark(self)
        size = len(data) + len(tail)
        header = encode_frame_header(OP_BINARY, size)
        if size <= _JOIN_LIMIT:
            self._write(b"".join((header, data, tail)))
        elif not tail:
            self._write(header, data)
        elif len(data) <= _JOIN_LIMIT:
            self._write(header + bytes(data), tail)
        else:  # pragma: no cover - the session's parts are a header and a payload
            self._write(header, b"".join((data, tail)))

    def send_many(self, messages: Sequence[Bytes]) -> None:
        """Send several binary messages, in order, in one write (the session
        sends what writers queued behind a busy socket this way). Raises
        like :meth:`send`."""
        if self._on_poller:  # parked: send() hands it back first
            for data in messages:
                self.send(data)
            return
        frames: List[Bytes] = []
        for data in messages:
            frames.append(encode_frame_header(OP_BINARY, len(data)))
            frames.append(data)
        self._write(b"".join(frames))

    def ping(self) -> None:
        """Send a ping frame (the client pings; the server need not)."""
        self._write(encode_frame(OP_PING))

    def _send_close(self, code: int, reason: str = "", timeout: Optional[float] = None) -> None:
        """Send a close frame once; best effort, bounded by ``timeout`` for
        the send lock and for the socket to become writable."""
        if not self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            if self._close_sent:
                return
            self._close_sent = True
            frame = encode_frame(OP_CLOSE, close_payload(code, reason))
            if self._answer is not None:  # the deferred 101 answer first
                frame, self._answer = self._answer + frame, None
            if timeout is not None and not wait_for_write(self.sock, timeout=timeout):
                return
            self.sock.sendall(frame)
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    # -- reads
    def receive(self) -> bytes:
        """Block for the next binary message, answering pings on the way.

        Raises :class:`TransportClosed` when the WebSocket closes (a close
        frame, EOF or a socket error) and
        :class:`~remotedialer.errors.ProtocolError` for a text message or a
        frame breaking RFC 6455 (after sending the matching close frame).
        """
        while True:
            try:
                opcode, payload = self._next_event()
            except WebSocketProtocolError as exc:
                self._send_close(exc.close_code, str(exc)[:60], _CLOSE_WRITE_TIMEOUT)
                raise
            self.reader_frames += 1
            self._pinged = opcode == OP_PING
            if opcode == OP_BINARY:
                return payload
            if opcode == OP_PING:
                # Keepalive counts once the pong is out: a peer that pings but
                # never reads cannot be answered and is cut at the read deadline.
                self._answer_ping(payload)
            elif opcode == OP_TEXT:
                self._send_close(CLOSE_UNSUPPORTED_DATA, "text message", _CLOSE_WRITE_TIMEOUT)
                raise ProtocolError("text message received")
            elif opcode == OP_CLOSE:
                self.close_code, self.close_reason = parse_close(payload)
                answer = CLOSE_NORMAL if self.close_code == CLOSE_NO_STATUS else self.close_code
                self._send_close(answer, "", _CLOSE_WRITE_TIMEOUT)
                ended = TransportEnded if self.close_code == CLOSE_NORMAL else TransportClosed
                raise ended(f"websocket closed by the client ({self.close_code})")
            # a pong: nothing to do (the server does not ping on its own)

    def _closing(self) -> bool:
        return self._closed

    def _next_event(self) -> "WebSocketEvent":
        """Reader thread: the next frame, from the poller's hand-over, the
        bytes already read, or the socket (parking first when idle)."""
        while True:
            handed, self._handed = self._handed, None
            if handed is not None:
                event, error = handed
                if error is not None:
                    if self._closed and isinstance(error, TransportClosed):
                        raise TransportClosed("websocket closed") from error
                    raise error
                if event is not None:
                    return event
            if self._closed:
                raise TransportClosed("websocket closed")
            may_park = self._may_park
            if may_park is None or not self._pinged or not may_park():
                return next_event_from_socket(self._reader, self.sock, self._receive_size, self._closing)
            event = self._reader.next_event()  # a frame already read comes first
            if event is not None:
                return event
            self._release()

    # -- parking (see remotedialer.poller)
    def park_when(
        self, may_park: Callable[[], bool], poller: "Poller", serve_again: Callable[[], None]
    ) -> bool:
        """From now on, whenever the reader has just answered a ping and
        ``may_park()`` holds (a session with no connection open), hand the
        socket to ``poller`` and let the reader go (:meth:`receive` raises
        :class:`~remotedialer.errors.ReaderReleased`; no thread waits on a
        parked tunnel). The poller answers pings; when the first other
        frame, close or EOF arrives (with every byte it read kept), or a
        message is sent (:meth:`send`: a dial), ``serve_again()`` is called
        to start a new reader. The first release takes the socket from the
        WSGI server (:meth:`close_taken_socket` closes it then). False
        (nothing changes) for a TLS socket, whose readiness says nothing
        about whole records, and on Windows."""
        if isinstance(self.sock, ssl.SSLSocket) or os.name == "nt":
            return False
        self._poller = poller
        self._serve_again = serve_again
        self._may_park = may_park
        return True

    def _release(self) -> NoReturn:
        """Reader thread: park the socket and leave (raises ReaderReleased)."""
        assert self._poller is not None
        self._take_socket_over()
        if self._closed:  # close() may have shut down the server's object instead of ours
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise TransportClosed("websocket closed")
        self._on_poller = True
        self._poller.park(self)
        # From here on the poller may start the next reader at any moment:
        # this thread touches nothing of the transport any more.
        raise ReaderReleased("parked")

    def _take_socket_over(self) -> None:
        """Reader thread: make the connection ours before this thread leaves
        the WSGI server, which shuts down and closes its socket object when
        the handler returns: we keep a duplicate of the descriptor, and the
        server's object gets an ended socket in its place (``dup2``), on
        which its shutdown and close are harmless."""
        if self._owns_socket:
            return
        with self._send_lock:
            served = self.sock
            ours = socket.socket(served.family, served.type, served.proto, os.dup(served.fileno()))
            os.dup2(_ENDED_SOCKET.get().fileno(), served.fileno(), inheritable=False)
            self.sock = ours
            self._owns_socket = True

    def close_taken_socket(self) -> None:
        """Close the socket if :meth:`park_when` took it from the WSGI server
        (otherwise the server closes it when the handler returns). For the
        last reader, once :meth:`close` returned: nothing writes afterwards."""
        if not self._owns_socket:
            return
        with self._send_lock:
            self._close_sent = True
            self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> bool:
        """Poller thread (see :class:`~remotedialer.poller.Parked`): read what
        arrived, answer pings, keep the first other frame, error or EOF for
        the reader. Partial frames stay in the frame reader, for it."""
        if self._closed:
            return True
        try:
            data = self.sock.recv(self._receive_size.small, _DONT_WAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._handed = (None, TransportClosed(f"websocket read failed: {exc}"))
            return True
        if not data:
            self._handed = (None, TransportClosed("websocket EOF"))
            return True
        self._reader.feed(data)
        while True:
            try:
                event = self._reader.next_event()
            except WebSocketProtocolError as exc:
                self._handed = (None, exc)
                return True
            if event is None:
                return False
            if event[0] == OP_PING:
                self._answer_ping(event[1])
            elif event[0] != OP_PONG:
                self._handed = (event, None)
                return True

    def resume(self) -> None:
        """Start the next reader (see :meth:`park_when`)."""
        assert self._serve_again is not None
        self._on_poller = False
        self._serve_again()

    # -- closing
    def close(self) -> None:
        """Send a close frame (if none went yet) and shut the socket down,
        which ends a blocked :meth:`receive` or :meth:`send` at once. The
        socket itself is closed by the WSGI server once the handler returns,
        so the handler calls this too before returning: if another thread is
        closing, it waits (a few seconds at most) until the close frame is
        out. Idempotent, callable from any thread."""
        self._closed = True
        with self._close_lock:
            if self._shut_down:
                return
            self._send_close(CLOSE_NORMAL, "", _CLOSE_WRITE_TIMEOUT)
            self._shut_down_locked()

    def abort(self) -> None:
        """Shut the socket down without a close frame (see
        :meth:`Transport.abort <remotedialer.transports.base.Transport.abort>`)."""
        self._closed = True
        with self._close_lock:
            if not self._shut_down:
                self._shut_down_locked()

    def _shut_down_locked(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        self._shut_down = True

    def describe(self) -> str:
        return self._description


# ------------------------------------------------------- simple-websocket
class _LockedSocket:
    """Socket proxy given to simple-websocket (through the WSGI environ, where
    it looks for the socket): every write goes through one lock and is
    complete (simple-websocket calls ``send``, which may write part of a
    frame); ``close`` only shuts down (the WSGI server closes). Once
    ``closing`` is set, a write waits at most ``_CLOSE_WRITE_TIMEOUT`` for
    the lock and for the socket to become writable, and fails with
    ``BrokenPipeError`` (what simple-websocket's ``close`` expects) instead
    of blocking on a stuck peer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.closing = False

    def send(self, data: Bytes, *flags: int) -> int:
        if not self._lock.acquire(timeout=_CLOSE_WRITE_TIMEOUT if self.closing else -1):
            raise BrokenPipeError(errno.EPIPE, "websocket closing: the socket is busy")
        try:
            if not self.closing:
                self._sock.sendall(data)
            elif not wait_for_write(self._sock, timeout=_CLOSE_WRITE_TIMEOUT):
                raise BrokenPipeError(errno.EPIPE, "websocket closing: the peer does not read")
            else:
                try:
                    self._sock.sendall(data)
                except OSError as exc:
                    raise BrokenPipeError(errno.EPIPE, f"websocket closing: {exc}") from exc
        finally:
            self._lock.release()
        return len(data)

    sendall = send

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SimpleWebSocketTransport:
    """A :class:`~remotedialer.transport.Transport` over simple-websocket's
    server (``Server(..., websocket="simple-websocket")``), through its
    public API only: ``Server(environ, receive_bytes=, max_message_size=,
    ping_interval=)``, ``send``, ``receive``, ``close`` and ``connected``.

    Not the default; measured against :class:`ServerWebSocket` in
    docs/benchmarks.rst (section "simple-websocket against the built-in
    transport"): it costs a second thread per tunnel (simple-websocket reads
    on a thread of its own), and that thread reads and queues whole messages
    without bound, so a client is never slowed down by TCP backpressure.

    simple-websocket answers the client's pings itself and shows none of them,
    so it cannot report the client's keepalive as the built-in transport
    does. Liveness is simple-websocket's own instead: it pings the client
    every ``ping_interval`` seconds and closes the WebSocket (1008) when a
    pong did not come back by the next ping; :attr:`last_keepalive` reads
    "now" while the WebSocket is open. :meth:`ping` sends nothing (there is no
    public call for it; server sessions never ping).
    """

    def __init__(
        self,
        environ: Dict[str, Any],
        max_message_size: int,
        receive_bytes: int = RECEIVE_BYTES,
        ping_interval: float = 30.0,
    ) -> None:
        import simple_websocket  # type: ignore[import-untyped,unused-ignore]

        sock, kind = socket_from_environ(environ)
        self._sock = sock
        self._locked = _LockedSocket(sock)
        environ = dict(environ)
        environ[f"{kind}.socket"] = self._locked
        self._closed_error = simple_websocket.ConnectionClosed
        self._close_lock = threading.Lock()  # serializes close(), see ServerWebSocket.close
        self._shut_down = False
        self._last_keepalive = time.monotonic()
        self.ws = simple_websocket.Server(
            environ, receive_bytes=receive_bytes, max_message_size=max_message_size,
            ping_interval=ping_interval,
        )
        self._description = f"{describe_remote(environ)} (simple-websocket)"

    @property
    def last_keepalive(self) -> float:
        """Now while the WebSocket is open (simple-websocket checks liveness
        with its own pings); the time it was last seen open afterwards."""
        if self.ws.connected:
            self._last_keepalive = time.monotonic()
        return self._last_keepalive

    @last_keepalive.setter
    def last_keepalive(self, value: float) -> None:
        self._last_keepalive = value

    def send(self, data: Bytes, tail: Bytes = b"") -> None:
        try:
            self.ws.send(b"".join((data, tail)))
        except (self._closed_error, OSError) as exc:
            raise TransportClosed(f"websocket write failed: {exc}") from exc

    def receive(self) -> bytes:
        try:
            data = self.ws.receive()
        except (self._closed_error, OSError) as exc:
            raise TransportClosed(f"websocket closed: {exc}") from exc
        if data is None:
            raise TransportClosed("websocket closed")
        if isinstance(data, str):
            raise ProtocolError("text message received")
        return bytes(data)

    def ping(self) -> None:
        """Nothing: simple-websocket pings on its own (``ping_interval``)."""

    def close(self) -> None:
        """Send a close frame (waiting at most a second for a busy or stuck
        socket) and shut the socket down, which ends simple-websocket's reader
        thread and a blocked :meth:`receive` or :meth:`send`."""
        with self._close_lock:
            if self._shut_down:
                return
            self._locked.closing = True
            try:
                self.ws.close()
            except (self._closed_error, OSError):
                pass
            self._locked.close()
            self._shut_down = True

    def abort(self) -> None:
        """As :meth:`close` (resumption is never offered over simple-websocket)."""
        self.close()

    def describe(self) -> str:
        return self._description
