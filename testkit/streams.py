"""Byte streams for transfer tests: seeded payloads, a loopback server that
streams one to every connection, and reading a socket to its end (EOF or a
reset)."""

from __future__ import annotations

import random
import socket
import threading
from typing import Optional, Tuple

from .support import LoopbackListener

__all__ = ["MiB", "payload", "SourceServer", "recv_to_end"]

MiB = 1 << 20


def payload(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same ``seed``."""
    return random.Random(seed).randbytes(size)


class SourceServer(LoopbackListener):
    """Sends ``payload`` to every connection, counting bytes handed to the
    kernel, then closes (unless ``hold`` is set: then it waits for EOF)."""

    def __init__(self, payload: bytes, sndbuf: Optional[int] = None, hold: bool = False) -> None:
        self.payload = payload
        self.sndbuf = sndbuf
        self.hold = hold
        self.sent = 0
        self.finished = threading.Event()
        self.peer_closed = threading.Event()
        super().__init__(name="test-source")

    def handle(self, sock: socket.socket) -> None:
        self.serve_on_thread(self._send, sock)

    def _send(self, sock: socket.socket) -> None:
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        view = memoryview(self.payload)
        try:
            while True:
                for start in range(0, len(view), 64 * 1024):
                    sock.sendall(view[start : start + 64 * 1024])
                    self.sent += len(view[start : start + 64 * 1024])
                self.finished.set()
                if not self.hold:
                    break
        except OSError:
            pass
        finally:
            if self.hold:
                self.peer_closed.set()
            sock.close()


def recv_to_end(sock: socket.socket) -> Tuple[bytes, Optional[BaseException]]:
    """Read until EOF or a reset; return the bytes and the error, if any."""
    got = bytearray()
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return bytes(got), None
            got += data
    except ConnectionResetError as exc:
        return bytes(got), exc
