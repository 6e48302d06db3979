"""Resumption's per-message cost in one process: ``python -m benchmarks.resume_cost``.

A client session sends ``--mib`` MiB in 64 KiB writes to a server session
over an in-memory pair (:func:`remotedialer.testing.memory_pair`), the
direction of a download through ``/client/`` (the agent sends). With
``--kind plain`` both are plain sessions, with ``resumable`` both are
:class:`~remotedialer.resumable.ResumableSession`. ``both`` alternates the
two ``--runs`` times and prints CPU seconds per GiB and minor page faults
of each.

For instruction counts, which a loaded machine does not disturb, run one
kind under callgrind and subtract a ``--mib 0`` run (startup)::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python -m benchmarks.resume_cost --kind resumable --mib 64
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
from typing import Dict, List, Optional, Tuple

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.resumable import ResumableSession
from remotedialer.session import Session
from remotedialer.testing import memory_pair

MiB = 1024 * 1024
WRITE = 64 * 1024
TIMEOUT = 60.0


def transfer(kind: str, size: int) -> Tuple[float, int]:
    """Send ``size`` bytes from a client session to a server session of
    ``kind``; return (CPU seconds, minor page faults) of the transfer."""
    limits = Limits(resume_window=30.0 if kind == "resumable" else 0.0)
    block = bytes(WRITE)
    sent = threading.Event()

    def sender(conn: TunnelConnection) -> None:
        def run() -> None:
            with conn:
                left = size
                while left > 0:
                    count = min(left, WRITE)
                    conn.sendall(block[:count] if count < WRITE else block)
                    left -= count
                sent.set()

        threading.Thread(target=run, name="bench-sender", daemon=True).start()

    client_end, server_end = memory_pair()
    make = ResumableSession if kind == "resumable" else Session
    extra: Dict[str, float] = {"resume_window": 30.0} if kind == "resumable" else {}
    client = make(client_end, is_client=True, connect_handler=sender, limits=limits, **extra)
    server = make(server_end, is_client=False, limits=limits, **extra)
    client.start()
    server.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        conn = server.dial("tcp", "127.0.0.1:1", timeout=TIMEOUT)
        got = 0
        while got < size:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        if got != size:
            raise RuntimeError(f"received {got} bytes of {size}")
        if size and not sent.wait(TIMEOUT):
            raise RuntimeError("sender did not finish")
        conn.close()
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        client.close()
        server.close()
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu, after.ru_minflt - before.ru_minflt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resume_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kind", choices=("plain", "resumable", "both"), default="both")
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="runs per kind with --kind both (default 5)")
    args = parser.parse_args(argv)
    size = args.mib * MiB
    if args.kind != "both":
        transfer(args.kind, size)
        return 0
    cpu: Dict[str, List[float]] = {"plain": [], "resumable": []}
    faults: Dict[str, List[int]] = {"plain": [], "resumable": []}
    transfer("plain", size // 4)  # warm up
    for _ in range(args.runs):
        for kind in cpu:
            spent, minflt = transfer(kind, size)
            cpu[kind].append(spent / (size / (1024 * MiB)))
            faults[kind].append(minflt)
    for kind in cpu:
        print(f"{kind:9}: CPU {statistics.median(cpu[kind]):.2f} s/GiB "
              f"[{min(cpu[kind]):.2f}-{max(cpu[kind]):.2f}], "
              f"minor faults {statistics.median(faults[kind]):.0f} per {args.mib} MiB")
    ratio = statistics.median(cpu["resumable"]) / statistics.median(cpu["plain"])
    print(f"resumable/plain CPU: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
