"""What the fault-injection tests share: a TCP relay in front of a server
that can reset or black-hole the connections under a tunnel, and the probe
that waits for a tunnel to recover and records how long that took."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Tuple

from .support import TIMEOUT, LoopbackListener

__all__ = ["RECOVERY", "Relay", "wait_recovered"]

RECOVERY: Dict[str, List[float]] = {}
"""Recovery times measured by :func:`wait_recovered`: scenario -> seconds."""


class Relay(LoopbackListener):
    """A TCP relay on a free loopback port in front of ``upstream``. ``cut()``
    resets every relayed connection (the TCP under a WebSocket dies);
    ``blackhole()`` keeps them open but drops every byte from now on."""

    def __init__(self, upstream: Tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._pairs: List[Tuple[socket.socket, socket.socket, threading.Event]] = []
        super().__init__(name="test-relay")

    def handle(self, down: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=TIMEOUT)
            up.settimeout(None)
        except OSError:
            down.close()
            return
        drop = threading.Event()
        with self._lock:
            self._pairs.append((down, up, drop))
        ended = [0]
        for src, dst in ((down, up), (up, down)):
            threading.Thread(target=self._pump, args=(src, dst, drop, ended), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, drop: threading.Event, ended: List[int]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not drop.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        if drop.is_set():
            return  # cut or black-holed: the cutter decides what the peers see
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            ended[0] += 1
            if ended[0] < 2:
                return
            self._pairs = [p for p in self._pairs if p[0] is not src and p[0] is not dst]
        src.close()
        dst.close()

    def cut(self) -> None:
        """Reset every relayed connection (RST both ways)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        linger = struct.pack("ii", 1, 0)
        for down, up, drop in pairs:
            drop.set()
            for sock in (down, up):
                try:
                    # linger 0: close() sends RST. SHUT_RD first wakes the
                    # pump blocked in recv (it holds the file open until then).
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    sock.shutdown(socket.SHUT_RD)
                    sock.close()
                except OSError:
                    pass

    def blackhole(self) -> None:
        """Silently drop everything on the current connections (kept open)."""
        with self._lock:
            pairs = list(self._pairs)
        for _, _, drop in pairs:
            drop.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def wait_recovered(
    attempt: Callable[[], bool], scenario: str, fault_at: float, timeout: float, interval: float
) -> float:
    """Poll ``attempt`` (a request through the tunnel) until it succeeds;
    fail the test ``timeout`` seconds after ``fault_at``. Returns, records
    and prints the recovery time (fault to first good request)."""
    deadline = fault_at + timeout
    while not attempt():
        assert time.monotonic() < deadline, f"{scenario}: no recovery within {timeout}s"
        time.sleep(interval)
    recovery = time.monotonic() - fault_at
    RECOVERY.setdefault(scenario, []).append(recovery)
    print(f"\n{scenario}: recovered in {recovery * 1000:.0f} ms")
    return recovery
