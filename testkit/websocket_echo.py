"""A WebSocket echo server on a free loopback port, built on wsproto (an
implementation independent of this library's frame codec).

Each connection is served on its own daemon thread: every message comes back
unchanged, except the text message ``"close-please"``, which the server
answers with a close frame (code 1000) before it closes the connection.
``targets`` keeps the request target of every handshake and ``closes`` how
each connection ended: ``"client"`` (the client sent a close frame),
``"server"`` (the server did), ``"eof"`` (the connection ended without one)
or ``"error"``.
"""

from __future__ import annotations

import socket
import threading
from typing import Dict, List, Optional

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from .support import LoopbackListener

__all__ = ["WebSocketEchoServer", "CLOSE_PLEASE"]

#: The text message the server answers by closing the connection.
CLOSE_PLEASE = "close-please"

_RECV = 256 * 1024


class WebSocketEchoServer(LoopbackListener):
    """The echo server; ``ended`` (a condition) guards ``targets`` and ``closes``."""

    def __init__(self) -> None:
        self.targets: List[str] = []
        self.closes: List[str] = []
        self.ended = threading.Condition()
        super().__init__(name="test-websocket-echo")

    def handle(self, sock: socket.socket) -> None:
        self.serve_on_thread(self._serve, sock)

    def wait_closes(self, count: int, timeout: float) -> List[str]:
        """Block until ``count`` connections ended (at most ``timeout``
        seconds); how each one ended."""
        with self.ended:
            self.ended.wait_for(lambda: len(self.closes) >= count, timeout)
            return list(self.closes)

    def _serve(self, sock: socket.socket) -> None:
        ending = "error"
        try:
            ending = self._echo(sock, WSConnection(ConnectionType.SERVER))
        except OSError:
            pass
        finally:
            sock.close()
            with self.ended:
                self.closes.append(ending)
                self.ended.notify_all()

    def _echo(self, sock: socket.socket, ws: WSConnection) -> str:
        parts: Dict[bool, List[bytes]] = {True: [], False: []}  # is text -> pieces of the message
        while True:
            data = sock.recv(_RECV)
            if not data:
                return "eof"
            ws.receive_data(data)
            out: List[bytes] = []
            ending: Optional[str] = None
            for event in ws.events():
                if isinstance(event, Request):
                    with self.ended:
                        self.targets.append(event.target)
                    out.append(ws.send(AcceptConnection()))
                elif isinstance(event, Message):
                    text = isinstance(event, TextMessage)
                    piece = event.data.encode() if isinstance(event.data, str) else bytes(event.data)
                    parts[text].append(piece)
                    if not event.message_finished:
                        continue
                    whole, parts[text] = b"".join(parts[text]), []
                    if text and whole == CLOSE_PLEASE.encode():
                        out.append(ws.send(CloseConnection(code=1000, reason="as asked")))
                        ending = "server"
                        break
                    echo = TextMessage(data=whole.decode()) if text else BytesMessage(data=whole)
                    out.append(ws.send(echo))
                elif isinstance(event, Ping):
                    out.append(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    out.append(ws.send(event.response()))
                    ending = "client"
                    break
            if out:
                sock.sendall(b"".join(out))
            if ending is not None:
                return ending
