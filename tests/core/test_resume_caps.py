"""The retransmit caps of resumption (docs/protocol.rst, "Resumption
extension"): what a session keeps for a peer that does not acknowledge
(a stalled or cut WebSocket) stays within the per-connection and the
per-session cap, however many writers there are; writers past a cap block.
Kept bytes are counted by the ledger, not by RSS (benchmarks/resume_memory.py
measures RSS)."""

from __future__ import annotations

import threading
import time
from typing import List, Optional

import pytest

from remotedialer.config import Limits
from remotedialer.connection import TunnelConnection
from remotedialer.errors import TunnelClosedError
from remotedialer.resume import ResumeLedger
from remotedialer.resumable import SUSPENDED, ResumableSession
from remotedialer.testing import memory_pair

KiB = 1024
CONNECTION_CAP = 64 * KiB
SESSION_CAP = 256 * KiB
LIMITS = Limits(
    resume_window=30.0, max_data_message=16 * KiB, ping_interval=0.1,
    resume_buffer_per_connection=CONNECTION_CAP, resume_buffer_per_session=SESSION_CAP,
)
WRITERS = 32  # 32 x 64 KiB = 8 x the session cap
TIMEOUT = 30.0


def test_the_session_cap_holds_for_connections_with_nothing_kept_yet() -> None:
    ledger = ResumeLedger(connection_cap=4, session_cap=8)
    for conn_id in range(4):
        ledger.add(conn_id, dialed_here=True)
    assert ledger.record_if_room(0, b"1234") and ledger.record_if_room(1, b"1234")
    assert ledger.retained == 8
    # connection 2 keeps nothing yet, but the session is full
    assert not ledger.has_room(2, 1)
    assert not ledger.record_if_room(2, b"x")
    assert ledger.retained == 8
    ledger.acknowledge(0, 4)
    assert ledger.has_room(2, 4) and ledger.record_if_room(2, b"abcd")
    # a session keeping nothing always takes one message (it cannot wait for an ACK)
    empty = ResumeLedger(connection_cap=4, session_cap=8)
    empty.add(0, dialed_here=True)
    assert empty.has_room(0, 100)


def _sink(conn: TunnelConnection) -> None:
    """The far side's handler: read and drop everything."""

    def run() -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                return

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("stall", ["cut", "stalled"])
def test_many_writers_to_a_stalled_peer_keep_within_the_caps(stall: str) -> None:
    """``cut``: the WebSocket is lost, the session suspends, writers go on;
    ``stalled``: the WebSocket stays up but the peer stops reading it (its
    reader is stuck), so nothing is acknowledged. Either way the kept bytes
    stay within both caps while 32 writers push 8 times the session cap,
    and every writer ends up blocked (timing out), not failed."""
    client_end, server_end = memory_pair()
    client_end.capacity = 16 * SESSION_CAP  # room in flight: the caps bind, not the pipe
    server = ResumableSession(server_end, resume_window=30.0, is_client=False, limits=LIMITS)
    client = ResumableSession(client_end, resume_window=30.0, is_client=True, connect_handler=_sink,
                              limits=LIMITS)
    threads = [server.start(), client.start()]
    conns = [server.dial("tcp", f"127.0.0.1:{1000 + i}", timeout=TIMEOUT) for i in range(WRITERS)]
    for conn in conns:
        conn.sendall(b"x")  # the CONNECTs are through
    deadline = time.monotonic() + TIMEOUT
    while server.ledger.retained:  # acknowledged at a tick: every connection keeps nothing
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stuck = threading.Event()
    if stall == "cut":
        client_end.cut()
        deadline = time.monotonic() + TIMEOUT
        while server.resume_state != SUSPENDED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    else:
        # the client's reader takes the next message and blocks before handling it
        # (its transport's receive is wrapped: a session compiled by mypyc takes
        # no per-instance method)
        original = client_end.receive

        def stuck_receive(timeout: Optional[float] = None) -> bytes:
            data = original(timeout)
            stuck.wait(TIMEOUT)
            return data

        client_end.receive = stuck_receive  # type: ignore[method-assign]
    outcomes: List[str] = []
    peak = {"session": 0, "connection": 0}
    stop = threading.Event()

    def write(conn: TunnelConnection) -> None:
        conn.settimeout(1.0)
        try:
            conn.sendall(b"w" * (8 * CONNECTION_CAP))
            outcomes.append("sent")
        except TimeoutError:
            outcomes.append("blocked")
        except TunnelClosedError as exc:  # pragma: no cover - reported below
            outcomes.append(f"failed: {exc}")

    def watch() -> None:
        while not stop.is_set():
            peak["session"] = max(peak["session"], server.ledger.retained)
            for conn in conns:
                peak["connection"] = max(peak["connection"], server.ledger.unacked(conn.conn_id))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    writers = [threading.Thread(target=write, args=(conn,), daemon=True) for conn in conns]
    try:
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(TIMEOUT)
        stop.set()
        watcher.join(TIMEOUT)
        assert outcomes == ["blocked"] * WRITERS
        assert server.ledger.retained <= SESSION_CAP
        assert peak["session"] <= SESSION_CAP, peak
        assert peak["connection"] <= CONNECTION_CAP, peak
        assert server.ledger.retained >= SESSION_CAP - LIMITS.max_data_message  # filled, then held
    finally:
        stuck.set()
        server.close()
        client.close()
        for thread in threads:
            thread.join(5)
