"""A hostile peer for tests: sends hand-made protocol messages (or any
bytes) to a victim session and collects what comes back."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, List, Optional

from remotedialer.protocol import Message, MessageType, decode_message, encode_message
from remotedialer.testing import MemoryTransport

from .support import TIMEOUT

__all__ = ["PROBE_ID", "RawPeer", "memory_raw_peer"]

#: A connection id no victim has: DATA to it is answered "connection not found".
PROBE_ID = 4_242_424


class RawPeer:
    """The attacker's end: sends hand-made messages, collects what comes back
    on a reader thread so that the victim is never blocked by us."""

    def __init__(
        self,
        send_binary: Callable[[bytes], None],
        send_text: Callable[[str], None],
        receive: Callable[[], bytes],
        close: Callable[[], None],
        start: bool = True,
    ) -> None:
        self._send_binary = send_binary
        self._send_text = send_text
        self._receive = receive
        self._close = close
        self._next_id = 1000
        self.inbox: "queue.Queue[Optional[Message]]" = queue.Queue()
        self.received: List[Message] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="raw-peer-reader", daemon=True)
        if start:
            self._thread.start()

    def start_reading(self) -> None:
        """Start collecting what the victim sends (for peers made with ``start=False``)."""
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                self.inbox.put(decode_message(self._receive()))
        except Exception:  # closed, or the victim sent something we cannot read
            pass
        finally:
            self.closed.set()
            self.inbox.put(None)

    def send_raw(self, data: bytes) -> None:
        self._send_binary(data)

    def send_text(self, text: str) -> None:
        self._send_text(text)

    def send(self, message_type: int, conn_id: int, payload: bytes = b"") -> None:
        self._next_id += 1
        self._send_binary(encode_message(self._next_id, conn_id, message_type, payload))

    def expect(
        self, message_type: int, conn_id: Optional[int] = None, timeout: float = TIMEOUT
    ) -> Message:
        """The next message of ``message_type`` (and ``conn_id``), skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {MessageType(message_type).name} {conn_id} within {timeout}s")
            try:
                message = self.inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if message is None:
                self.inbox.put(None)
                raise AssertionError(f"connection closed while waiting for {message_type} {conn_id}")
            self.received.append(message)
            if message.type == message_type and (conn_id is None or message.conn_id == conn_id):
                return message

    def probe(self) -> Message:
        """DATA to an unknown id: a live victim answers "connection not found"."""
        self.send(MessageType.DATA, PROBE_ID, b"probe")
        answer = self.expect(MessageType.ERROR, PROBE_ID)
        assert answer.text.startswith("connection not found"), answer
        return answer

    def wait_closed(self, timeout: float = TIMEOUT) -> None:
        assert self.closed.wait(timeout), "the victim did not close the WebSocket"

    def close(self) -> None:
        try:
            self._close()
        except Exception:
            pass
        if self._thread.is_alive():
            self._thread.join(TIMEOUT)


def memory_raw_peer(end: MemoryTransport) -> RawPeer:
    """A :class:`RawPeer` on one end of an in-memory transport pair."""
    return RawPeer(end.send, end.send_text, end.receive, end.close)
