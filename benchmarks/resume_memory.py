"""Memory under a stalled peer with resumption on (issue 22):
``python -m benchmarks.resume_memory``.

The server runs in this process (werkzeug, ``Limits(resume_window=30)``),
``remotedialer client --resume-window 30`` in another, with a cutting proxy
(:mod:`testkit.cut_proxy`) between them. ``--connections`` connections are
dialed from the server to a target behind the client, and one writer thread
per connection writes as fast as it can while the peer stalls:

* **cut**: the tunnel's TCP connection is reset and new ones are refused
  for ``--hold`` seconds: the server's session suspends and keeps what the
  writers write, up to the caps (4 MiB per connection, 64 MiB per session),
  then the writers block. The network comes back, the session resumes and
  the writers carry on.
* **silent**: the same with a silent drop (nothing reaches either end).
* **stalled reader**: the tunnel stays up but the target stops reading:
  PAUSE holds the writers back (the client's receive buffers fill to the
  pause threshold), ACKs keep flowing.

For each: the peak growth of this process's RSS over its level before the
writers started, the peak bytes kept for retransmission (the ledger), and
the caps; the client process's RSS growth beside.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.resumable import ResumableSession
from testkit.cut_proxy import CutProxy
from testkit.support import LoopbackListener, TunnelServer

from .procs import Proc

MiB = 1024 * 1024
TIMEOUT = 60.0
LIMITS = Limits(resume_window=30.0)


def rss_bytes() -> int:
    """This process's resident set size (``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Target(LoopbackListener):
    """Accepts connections and reads everything from them while
    ``reading`` is set (clear it to stall the reader)."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.reading.set()
        super().__init__(name="bench-target")

    def handle(self, sock: socket.socket) -> None:
        def drain(sock: socket.socket) -> None:
            with sock:
                try:
                    while self.reading.wait(TIMEOUT) and sock.recv(1 << 20):
                        pass
                except OSError:
                    pass

        self.serve_on_thread(drain, sock)


class Writers:
    """One thread per connection writing ``chunk`` in a loop; a write that
    times out is tried again (a blocked writer) until :meth:`stop`."""

    def __init__(self, conns: List[TunnelConnection], chunk: bytes) -> None:
        self._stop = threading.Event()
        self.failures: List[str] = []
        self.written = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(conn, chunk), daemon=True)
                         for conn in conns]
        for thread in self._threads:
            thread.start()

    def _run(self, conn: TunnelConnection, chunk: bytes) -> None:
        conn.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn.sendall(chunk)
            except TimeoutError:
                continue
            except OSError as exc:
                self.failures.append(str(exc))
                return
            with self._lock:
                self.written += len(chunk)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)


class Stack:
    """The server here, the client in a process, the proxy between."""

    def __init__(self, log_dir: str, window: float) -> None:
        self.tunnel = TunnelServer(limits=LIMITS.replace(resume_window=window))
        self.proxy = CutProxy(("127.0.0.1", self.tunnel.port))
        self.client = Proc.remotedialer("client", [
            "client", "--connect", f"ws://127.0.0.1:{self.proxy.port}/connect", "--id", "foo",
            "--resume-window", f"{window:g}",
        ], log_dir)
        self.client.wait_for_log(r"connected to ")
        deadline = time.monotonic() + TIMEOUT
        while not self.tunnel.server.has_session("foo"):
            if time.monotonic() > deadline:
                raise RuntimeError("the client's session did not come up")
            time.sleep(0.01)

    def kept(self) -> int:
        """Bytes the server's session keeps for retransmission (0 without resumption)."""
        (session,) = self.tunnel.server.sessions("foo")
        return session.ledger.retained if isinstance(session, ResumableSession) else 0

    def close(self) -> None:
        self.client.stop()
        self.proxy.close()
        self.tunnel.close()


def run_case(stack: Stack, name: str, count: int, hold: float,
             stall: Callable[[Target], None], unstall: Callable[[Target], None]) -> Dict[str, float]:
    target = Target()
    conns = [stack.tunnel.server.dial("foo", "tcp", target.address, timeout=TIMEOUT) for _ in range(count)]
    chunk = b"w" * (256 * 1024)
    for conn in conns:
        conn.sendall(b"x")
    time.sleep(0.5)
    base_rss, base_client = rss_bytes(), stack.client.stats().rss_bytes
    peak = {"rss": 0.0, "kept": 0.0, "client": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss_bytes() - base_rss)
            peak["kept"] = max(peak["kept"], stack.kept())
            peak["client"] = max(peak["client"], stack.client.stats().rss_bytes - base_client)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    writers = Writers(conns, chunk)
    time.sleep(0.5)  # in full flow
    stall(target)
    time.sleep(hold)
    kept_stalled = stack.kept()
    unstall(target)
    time.sleep(1.0)
    written_before = writers.written
    time.sleep(1.0)
    flowing = writers.written > written_before
    stop.set()
    sampler.join()
    writers.stop()
    for conn in conns:
        conn.close()
    target.reading.set()
    target.close()
    session_cap = min(count * LIMITS.resume_buffer_per_connection, LIMITS.resume_buffer_per_session)
    print(f"{name:15} {count:4d} writers: server RSS +{peak['rss'] / MiB:6.1f} MiB peak, "
          f"kept {peak['kept'] / MiB:5.1f} MiB peak ({kept_stalled / MiB:5.1f} at the end of the stall; "
          f"cap {session_cap / MiB:.0f} MiB), client RSS +{peak['client'] / MiB:6.1f} MiB; "
          f"writers {'flowing again' if flowing else 'NOT flowing'} after, "
          f"{len(writers.failures)} failed")
    return peak


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resume_memory",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 64],
                        help="writer counts to run (default 4 64)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the peer stalls (default 5)")
    parser.add_argument("--cases", nargs="+", default=["cut", "silent", "stalled-reader"],
                        help="cases to run, in order (default all; the allocator keeps what the "
                             "first one took, so run one per process for each one's own peak)")
    parser.add_argument("--resume-window", type=float, default=30.0,
                        help="resumption window of server and client (default 30; 0: off, for the "
                             "stalled-reader case only: a cut ends the session)")
    args = parser.parse_args(argv)
    print(f"caps: {LIMITS.resume_buffer_per_connection / MiB:.0f} MiB per connection, "
          f"{LIMITS.resume_buffer_per_session / MiB:.0f} MiB per session; "
          f"pause threshold {LIMITS.pause_threshold / MiB:.0f} MiB")
    print(f"resume window {args.resume_window:g} s, stall {args.hold:g} s")
    with tempfile.TemporaryDirectory(prefix="bench-resume-memory-") as log_dir:
        stack = Stack(log_dir, args.resume_window)
        try:
            proxy = stack.proxy

            def cut(_target: Target) -> None:
                proxy.blackhole()  # refuse reconnects during the stall
                proxy.reset()

            cases: List[Tuple[str, Callable[[Target], None], Callable[[Target], None]]] = [
                ("cut", cut, lambda _target: proxy.restore()),
                ("silent", lambda _target: proxy.blackhole(), lambda _target: proxy.restore()),
                ("stalled-reader", lambda target: target.reading.clear(),
                 lambda target: target.reading.set()),
            ]
            for count in args.connections:
                for name, stall, unstall in cases:
                    if name in args.cases:
                            run_case(stack, name, count, args.hold, stall, unstall)
        finally:
            stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
