"""The agent's end of a tunnel's WebSocket: the connection to the server
(directly or through a proxy, :mod:`~remotedialer.transports.proxy`) and TLS
are ours, websocket-client does the handshake (:func:`open_websocket`),
:class:`WebSocketClientTransport` reads and writes the frames with the
package's own codec (:mod:`remotedialer.frames`).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import websocket

from ..config import Limits
from ..errors import HandshakeError, ProtocolError
from ..frames import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    close_payload,
    encode_masked_frame,
    parse_close,
)
from ..protocol import Bytes
from .base import (  # server_address re-exported: it was defined here
    ReceiveSize, TransportClosed, TransportEnded, connect_tcp, next_event_from_socket, server_address,
    wait_for_write,
)
from .proxy import ProxyURL, connect_through_proxy

__all__ = ["RECEIVE_BYTES", "WebSocketClientTransport", "open_websocket", "server_address"]

log = logging.getLogger(__name__)

_CLOSE_WRITE_TIMEOUT = 1.0
"""Seconds :meth:`WebSocketClientTransport.close` waits to write its close frame."""

RECEIVE_BYTES = 64 * 1024
"""Bytes the client's reader asks the socket for at a time (one DATA message
of the largest size, or many small ones)."""

class WebSocketClientTransport:
    """Adapts a connected ``websocket.WebSocket`` (websocket-client) to the
    :class:`~remotedialer.transports.base.Transport` interface."""

    def __init__(self, ws: websocket.WebSocket, max_message_size: int, description: str = "") -> None:
        self.ws = ws
        self.last_keepalive = time.monotonic()
        self._description = description or "websocket"
        self._closed = False
        self._frames = FrameReader(max_message_size, from_client=False)  # reader thread only
        self._receive_size = ReceiveSize(RECEIVE_BYTES)  # reader thread only

    def send(self, data: Bytes, tail: Bytes = b"") -> None:
        # Frames are built and masked here (numpy when available, see
        # frames.py: websocket-client's masker was half the client's CPU) and
        # written under websocket-client's own write lock, which its pongs
        # and close frames take too. Masking needs a copy anyway: ``data``
        # and ``tail`` are copied once each, into the frame (portable: no
        # sendmsg needed on the agent's side).
        frame = encode_masked_frame(websocket.ABNF.OPCODE_BINARY, data, tail=tail)
        try:
            with self.ws.lock:
                sock = self.ws.sock
                if sock is None:
                    raise TransportClosed("websocket closed")
                sock.sendall(frame)
        except (websocket.WebSocketException, OSError, AttributeError) as exc:
            raise TransportClosed(f"websocket write failed: {exc}") from exc

    def receive(self) -> bytes:
        """Block for the next binary message, answering pings on the way.

        Frames are read here, not by websocket-client: one ``recv`` of up to
        :data:`RECEIVE_BYTES` takes every frame that arrived, where
        websocket-client reads each frame's header, length and payload with a
        ``recv`` of their own (and its per-frame Python was a fifth of the
        client's CPU on small requests). Raises :class:`TransportClosed` when
        the WebSocket closes and :class:`~remotedialer.errors.ProtocolError`
        for a text message or a frame breaking RFC 6455.
        """
        sock, closing = self.ws.sock, lambda: self._closed
        while True:
            opcode, payload = next_event_from_socket(self._frames, sock, self._receive_size, closing)
            if opcode == OP_BINARY:
                return payload
            if opcode == OP_TEXT:
                raise ProtocolError("text message received")
            if opcode == OP_PONG:
                self.last_keepalive = time.monotonic()
            elif opcode == OP_PING:
                self._answer_ping(payload)
            elif opcode == OP_CLOSE:
                code, _reason = parse_close(payload)
                ended = TransportEnded if code == CLOSE_NORMAL else TransportClosed
                raise ended("websocket closed by the server")

    def _answer_ping(self, payload: bytes) -> None:
        try:
            self.ws.pong(payload)
        except (websocket.WebSocketException, OSError, AttributeError) as exc:
            raise TransportClosed(f"websocket pong failed: {exc}") from exc

    def ping(self) -> None:
        """Send a ping unless the socket's send buffer is full: the shared
        heartbeat thread must never block on one stuck tunnel (a tunnel that
        stays stuck goes silent and is ended by its read deadline)."""
        sock = self.ws.sock
        if sock is not None:
            try:
                # poll where there is one: select fails for descriptors past 1023
                writable = wait_for_write(sock, timeout=0)
            except (OSError, ValueError) as exc:
                raise TransportClosed(f"websocket ping failed: {exc}") from exc
            if not writable:
                log.debug("%s: send buffer full, ping skipped", self._description)
                return
        try:
            self.ws.ping()
        except (websocket.WebSocketException, OSError, AttributeError) as exc:
            raise TransportClosed(f"websocket ping failed: {exc}") from exc

    def close(self) -> None:
        """Send a close frame (if the socket takes it within
        ``_CLOSE_WRITE_TIMEOUT``), then :meth:`abort`."""
        if self._closed:
            return
        frame = encode_masked_frame(OP_CLOSE, close_payload(CLOSE_NORMAL))
        lock = self.ws.lock  # a threading.Lock (the WebSocket is opened multithreaded)
        if lock.acquire(timeout=_CLOSE_WRITE_TIMEOUT):
            try:
                sock = self.ws.sock
                if sock is not None and wait_for_write(sock, timeout=_CLOSE_WRITE_TIMEOUT):
                    sock.sendall(frame)
            except (OSError, ValueError):
                pass
            finally:
                lock.release()
        self.abort()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.ws.abort()  # type: ignore[no-untyped-call]  # unblocks a reader in recv
        except Exception:  # pragma: no cover
            pass
        try:
            self.ws.shutdown()  # type: ignore[no-untyped-call]
        except Exception:  # pragma: no cover
            pass

    def describe(self) -> str:
        return self._description


_HANDSHAKE_STATUS = re.compile(r"Handshake status \d+ (.*?) -\+-\+- ")


def _status_message(exc: websocket.WebSocketBadStatusException) -> str:
    """The reason phrase of a refused handshake, from the exception's text:
    websocket-client 1.9.0 (the newest for Python 3.9) keeps it nowhere
    else."""
    match = _HANDSHAKE_STATUS.match(str(exc))
    return match.group(1) if match else ""


def _connect(
    url: str, proxy: Optional[ProxyURL], ssl_context: Optional[ssl.SSLContext], timeout: float,
    socket_options: Sequence[Tuple[Any, ...]] = (),
) -> socket.socket:
    """The stream the handshake runs on: TCP to the server or through
    ``proxy`` (with ``setsockopt(*option)`` for each of ``socket_options``),
    then TLS for ``wss://`` (``ssl_context``, default: the system store, host
    name checked). Each step is bounded by ``timeout``."""
    secure, host, port = server_address(url)
    if proxy is None:
        sock = connect_tcp(host, port, timeout)
    else:
        sock = connect_through_proxy(proxy, host, port, timeout)
    try:
        sock.settimeout(timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - not a TCP socket
            pass
        for option in socket_options:
            sock.setsockopt(*option)
        if secure:
            context = ssl_context if ssl_context is not None else ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


_OWN_CONNECTION_OPTIONS = ("socket", "sslopt", "http_proxy_host")
"""``websocket_options`` with which websocket-client opens the connection
itself, as before the proxy support (its own proxy rules then apply)."""


def open_websocket(
    url: str,
    headers: Optional[Mapping[str, str]],
    limits: Limits,
    ssl_context: Optional[ssl.SSLContext],
    websocket_options: Optional[Dict[str, Any]],
    proxy: Optional[ProxyURL] = None,
) -> websocket.WebSocket:
    """Connect (through ``proxy`` if given) and do the WebSocket handshake,
    within ``limits.handshake_timeout`` per step. HTTP refusals become
    :class:`HandshakeError`, a failing proxy
    :class:`~remotedialer.errors.ProxyError`; other failures raise ``OSError``."""
    options: Dict[str, Any] = dict(websocket_options or {})
    websocket_connects = proxy is None and any(key in options for key in _OWN_CONNECTION_OPTIONS)
    if websocket_connects and ssl_context is not None:
        options.setdefault("sslopt", {})["context"] = ssl_context
    header = [f"{name}: {value}" for name, value in (headers or {}).items()]
    ws = websocket.WebSocket(
        sslopt=options.pop("sslopt", None),
        skip_utf8_validation=True,
        enable_multithread=True,
    )
    if not websocket_connects:
        options["socket"] = _connect(url, proxy, ssl_context, limits.handshake_timeout,
                                     options.pop("sockopt", ()))
    try:
        ws.connect(  # type: ignore[no-untyped-call]
            url, header=header, timeout=limits.handshake_timeout, **options
        )
    except websocket.WebSocketBadStatusException as exc:
        body = exc.resp_body.decode("utf-8", "replace") if exc.resp_body else ""
        reason = str(getattr(exc, "status_message", None) or _status_message(exc))
        raise HandshakeError(exc.status_code, body.strip(), exc, reason=reason) from exc
    except BaseException:
        ws.shutdown()  # type: ignore[no-untyped-call]
        raise
    ws.settimeout(None)  # liveness is the heartbeat's job, not a socket timeout
    if ws.sock is not None:
        try:
            ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - not a TCP socket
            pass
    return ws
