"""remotedialer.receive_buffer: the buffer of received bytes, the PAUSE/RESUME
accounting and the readiness signal, apart from any session or socket."""

from __future__ import annotations

import select

from remotedialer.config import Limits
from remotedialer.receive_buffer import Fill, ReadinessSignal, ReceiveBuffer

LIMITS = Limits(resume_threshold=4, pause_threshold=10, hard_buffer_limit=20)


def test_append_asks_for_pause_once_past_the_threshold() -> None:
    buffer = ReceiveBuffer(LIMITS)
    assert buffer.append(b"x" * 10) is Fill.OK  # at the threshold: not past it
    assert not buffer.we_paused_peer
    assert buffer.append(b"x") is Fill.PAUSE
    assert buffer.we_paused_peer
    assert buffer.append(b"x") is Fill.OK  # already paused: not asked again
    assert buffer.buffered == 12


def test_append_past_the_hard_limit_is_an_overflow() -> None:
    buffer = ReceiveBuffer(LIMITS)
    buffer.append(b"x" * 20)
    assert buffer.append(b"x") is Fill.OVERFLOW


def test_an_empty_payload_keeps_nothing() -> None:
    buffer = ReceiveBuffer(LIMITS)
    assert buffer.append(b"") is Fill.OK
    assert buffer.buffered == 0


def test_take_hands_out_whole_chunks_and_splits_across_them() -> None:
    buffer = ReceiveBuffer(LIMITS)
    for chunk in (b"abc", b"defg", b"h"):
        buffer.append(chunk)
    assert buffer.take(3) == b"abc"  # a whole chunk
    assert buffer.take(2) == b"de"  # part of one
    assert buffer.take(10) == b"fgh"  # the rest of it and the next
    assert buffer.buffered == 0


def test_take_into_fills_a_view_across_chunks() -> None:
    buffer = ReceiveBuffer(LIMITS)
    buffer.append(b"ab")
    buffer.append(bytearray(b"cde"))
    out = bytearray(4)
    assert buffer.take_into(memoryview(out), 4) == 4
    assert out == b"abcd"
    assert buffer.buffered == 1
    assert buffer.take_into(memoryview(out), 4) == 1
    assert out[:1] == b"e"


def test_resume_is_due_once_a_read_drains_below_the_resume_threshold() -> None:
    buffer = ReceiveBuffer(LIMITS)
    assert not buffer.resume_due()  # never paused
    buffer.append(b"x" * 11)
    assert buffer.we_paused_peer
    buffer.take(7)  # 4 left: not below the resume threshold
    assert not buffer.resume_due()
    buffer.take(1)
    assert buffer.resume_due()
    assert not buffer.we_paused_peer
    assert not buffer.resume_due()  # once


def test_clear_drops_everything() -> None:
    buffer = ReceiveBuffer(LIMITS)
    buffer.append(b"abc")
    buffer.take(1)
    buffer.clear()
    assert buffer.buffered == 0
    buffer.append(b"z")
    assert buffer.take(5) == b"z"  # no stale offset into a dropped chunk


def test_the_peer_paused_flag_is_separate() -> None:
    buffer = ReceiveBuffer(LIMITS)
    buffer.peer_paused_us = True
    assert not buffer.we_paused_peer
    buffer.append(b"x" * 11)
    assert buffer.we_paused_peer and buffer.peer_paused_us


def _readable(signal: ReadinessSignal) -> bool:
    return bool(select.select([signal.fileno()], [], [], 0)[0])


def test_readiness_signal_is_readable_exactly_while_set() -> None:
    signal = ReadinessSignal()
    try:
        assert not _readable(signal)
        signal.update(True)
        signal.update(True)  # idempotent: still one byte
        assert _readable(signal)
        signal.update(False)
        assert not _readable(signal)
        signal.update(False)
        assert not _readable(signal)
    finally:
        signal.close()
    assert signal.fileno() == -1  # closed
