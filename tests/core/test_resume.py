"""The resumption bookkeeping (remotedialer.resume), without I/O.

Besides unit tests of the encodings and the ledger, a simulation runs two
ledgers over a lossy "wire" of messages: whatever is sent, acknowledged or
closed, and wherever the WebSocket is cut (everything in flight lost, both
ways), after the REATTACH exchange each receiver holds exactly the byte
stream its peer sent on every connection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings, strategies as st

from remotedialer.errors import ProtocolError
from remotedialer.protocol import encode_varint
from remotedialer.resume import (
    RESET_TEXT,
    ReattachEntry,
    ResumeLedger,
    ResumeMessageType,
    decode_ack,
    decode_reattach,
    encode_ack,
    encode_reattach,
    new_token,
    token_digest,
    tokens_match,
)


# ------------------------------------------------------------------ encodings
def test_message_types_do_not_collide_with_go() -> None:
    from remotedialer.protocol import MessageType

    assert not {int(t) for t in ResumeMessageType} & {int(t) for t in MessageType}
    assert min(ResumeMessageType) > max(MessageType)


@pytest.mark.parametrize("count", [0, 1, 63, 64, 15000, 1 << 40, (1 << 63) - 1])
def test_ack_round_trip(count: int) -> None:
    assert decode_ack(encode_ack(count)) == count


def test_ack_bytes() -> None:
    assert encode_ack(1) == b"\x02"
    assert encode_ack(15000) == b"\xb0\xea\x01"


@pytest.mark.parametrize("payload", [b"", b"\x80", b"\x02\x02", encode_varint(-1)])
def test_bad_ack_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_ack(payload)


@settings(deadline=None)  # a loaded CI machine is slow, not wrong
@given(
    st.dictionaries(
        st.integers(0, (1 << 63) - 1),
        st.tuples(st.integers(0, (1 << 63) - 1), st.booleans(), st.booleans()),
        max_size=20,
    )
)
def test_reattach_round_trip(entries: Dict[int, Tuple[int, bool, bool]]) -> None:
    state = [ReattachEntry(c, r, closed, pausing) for c, (r, closed, pausing) in entries.items()]
    assert decode_reattach(encode_reattach(state)) == state


def test_reattach_bytes() -> None:
    payload = encode_reattach([ReattachEntry(2, 1, closed=True), ReattachEntry(3, 0, pausing=True)])
    assert payload == b"\x04\x02\x02" + b"\x06\x00\x04"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x04\x02",  # a truncated entry
        b"\x04" + encode_varint(-5) + b"\x00",  # negative count
        b"\x04\x02\x10",  # unknown flag 8
        b"\x04\x02\x00\x04\x04\x00",  # the same id twice
    ],
)
def test_bad_reattach_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reattach(payload)


def test_tokens_are_unguessable_and_checked_by_digest() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert len(token) == 43 and "=" not in token
    digest = token_digest(token)
    assert token not in repr(digest)
    assert tokens_match(digest, token)
    assert not tokens_match(digest, tokens.pop())
    assert not tokens_match(digest, token[:-1])


# --------------------------------------------------------------------- ledger
def test_acknowledge_frees_whole_and_partial_chunks() -> None:
    ledger = ResumeLedger(connection_cap=100, session_cap=1000)
    ledger.add(2, dialed_here=True)
    for part in (b"abcd", b"efgh", b"ij"):
        ledger.record_sent(2, part)
    assert ledger.unacked(2) == 10 and ledger.retained == 10
    assert ledger.acknowledge(2, 6) == 6
    assert ledger.unacked(2) == 4 and ledger.retained == 4
    plan = ledger.plan_reattach([ReattachEntry(2, 7)])
    assert b"".join(bytes(p) for _c, p in plan.resend) == b"hij"
    assert plan.resent_bytes == 3
    assert ledger.retained == 3


def test_kept_messages_resend_only_their_payload_from_the_acknowledged_offset() -> None:
    # A session keeps each DATA message whole: header and payload; the ledger
    # knows the payload is its last ``size`` bytes.
    ledger = ResumeLedger(connection_cap=100, session_cap=1000)
    ledger.add(2, dialed_here=True)
    for header, payload in ((b"H1", b"abcd"), (b"HDR2", b"efgh"), (b"H", b"ij")):
        assert ledger.record_if_room(2, header + payload, len(payload))
    assert ledger.unacked(2) == 10 and ledger.retained == 10
    assert ledger.acknowledge(2, 3) == 3  # inside the first message: nothing dropped
    assert ledger.acknowledge(2, 5) == 2  # inside the second: the first dropped
    plan = ledger.plan_reattach([ReattachEntry(2, 6)])
    assert [bytes(p) for _c, p in plan.resend] == [b"gh", b"ij"]
    assert ledger.retained == 4
    assert ledger.acknowledge(2, 10) == 4 and ledger.retained == 0  # all of it at once
    ledger.record_sent(2, b"HEAD" + b"klm", 3)
    plan = ledger.plan_reattach([ReattachEntry(2, 11)])
    assert [bytes(p) for _c, p in plan.resend] == [b"lm"]


def test_acknowledging_more_than_sent_or_backwards_is_a_protocol_error() -> None:
    ledger = ResumeLedger(connection_cap=100, session_cap=1000)
    ledger.add(2, dialed_here=True)
    ledger.record_sent(2, b"abc")
    with pytest.raises(ProtocolError):
        ledger.acknowledge(2, 4)
    ledger.acknowledge(2, 2)
    assert ledger.acknowledge(2, 1) == 0  # a late ACK: ignored
    assert ledger.unacked(2) == 1
    with pytest.raises(ProtocolError):
        ledger.plan_reattach([ReattachEntry(2, 9)])
    with pytest.raises(ProtocolError):
        ledger.plan_reattach([ReattachEntry(2, 1)])  # a REATTACH must not go backwards


def test_has_room_honours_both_caps() -> None:
    ledger = ResumeLedger(connection_cap=10, session_cap=15)
    ledger.add(2, dialed_here=True)
    ledger.add(4, dialed_here=True)
    assert ledger.has_room(2, 50)  # an empty buffer takes one write of any size
    ledger.record_sent(2, b"x" * 8)
    assert ledger.has_room(2, 2) and not ledger.has_room(2, 3)  # per connection
    ledger.record_sent(4, b"y" * 6)
    assert not ledger.has_room(4, 2)  # per session: 8 + 6 + 2 > 15
    assert ledger.has_room(4, 1)
    ledger.acknowledge(2, 8)
    assert ledger.has_room(4, 4)
    assert ledger.has_room(99, 1 << 30)  # not counted: no limit


def test_record_if_room_checks_both_caps_then_records() -> None:
    ledger = ResumeLedger(connection_cap=10, session_cap=15)
    ledger.add(2, dialed_here=True)
    ledger.add(4, dialed_here=True)
    assert ledger.record_if_room(2, b"x" * 50)  # an empty buffer takes any size
    ledger.acknowledge(2, 50)
    assert ledger.record_if_room(2, b"x" * 8) and ledger.unacked(2) == 8
    assert not ledger.record_if_room(2, b"x" * 3)  # per connection: 8 + 3 > 10
    assert ledger.unacked(2) == 8 and ledger.sent(2) == 58  # nothing recorded
    assert ledger.record_if_room(4, b"y" * 6)
    assert not ledger.record_if_room(4, b"y" * 2)  # per session: 8 + 6 + 2 > 15
    assert ledger.record_if_room(4, b"y") and ledger.retained == 15
    assert ledger.record_if_room(99, b"z")  # not counted: no limit
    assert ledger.retained == 15


def test_ack_is_due_at_an_eighth_of_the_cap_and_at_ticks() -> None:
    ledger = ResumeLedger(connection_cap=80, session_cap=800)
    ledger.add(2, dialed_here=False)
    assert ledger.record_received(2, 9) is None
    assert ledger.record_received(2, 1) == 10
    assert ledger.record_received(2, 3) is None
    assert not ledger.acks_due
    assert ledger.due_acks() == [(2, 13)]
    assert ledger.due_acks() == []


def test_acks_are_due_once_the_session_received_an_eighth_of_its_cap() -> None:
    """Many connections, each under its own threshold: the session's share
    makes every connection's ACK due (else they wait for a tick while the
    peer's session cap fills)."""
    ledger = ResumeLedger(connection_cap=80, session_cap=160)  # thresholds 10 and 20
    for conn_id in (2, 3, 4):
        ledger.add(conn_id, dialed_here=False)
    assert ledger.record_received(2, 9) is None
    assert ledger.record_received(3, 9) is None
    assert not ledger.acks_due
    assert ledger.record_received(4, 2) is None
    assert ledger.acks_due
    assert ledger.due_acks() == [(2, 9), (3, 9), (4, 2)]
    assert not ledger.acks_due
    # a connection's own ACK takes its bytes out of the session's share
    assert ledger.record_received(2, 9) is None
    assert ledger.record_received(2, 1) == 19
    assert ledger.record_received(3, 9) is None
    assert not ledger.acks_due  # 9 owed, not 19


def test_tombstones_are_bounded() -> None:
    ledger = ResumeLedger(connection_cap=10, session_cap=100, max_tombstones=2)
    for conn_id in (2, 3, 4):
        ledger.add(conn_id, dialed_here=True)
        ledger.record_sent(conn_id, b"ab")
        ledger.close(conn_id, "EOF")
    assert not ledger.is_tombstone(2) and 2 not in ledger
    assert ledger.is_tombstone(3) and ledger.is_tombstone(4)
    assert ledger.retained == 4


def test_plan_for_each_case() -> None:
    ledger = ResumeLedger(connection_cap=100, session_cap=1000)
    for conn_id, dialed in (
        (2, True), (3, True), (4, False), (5, True), (6, False), (7, False), (9, True), (10, True),
        (12, False),
    ):
        ledger.add(conn_id, dialed_here=dialed, connect=b"tcp/h:%d" % conn_id if dialed else b"")
        ledger.record_sent(conn_id, b"data%d" % conn_id)
    ledger.close(6, "EOF")
    ledger.close(7, "boom")
    ledger.acknowledge(9, 1)
    ledger.close(10, "EOF")
    ledger.record_received(12, 3)
    assert ledger.peer_closed(12)  # ended by the peer: remembered as closed
    assert [e for e in ledger.local_state([2]) if e.conn_id in (2, 12)] == [
        ReattachEntry(2, 0, pausing=True, dialed=True), ReattachEntry(12, 3, closed=True),
    ]
    plan = ledger.plan_reattach(
        [
            ReattachEntry(2, 2, pausing=True),  # open both: resend from 2, paused
            # 3: we dialed, never heard of: the CONNECT was lost -> redial and resend all
            # 4: the peer dialed, it no longer lists it -> reset here
            ReattachEntry(5, 0, closed=True),  # the peer closed it: it sends, we wait
            ReattachEntry(6, 1),  # we closed, the peer has not heard: rest + ERROR
            # 7: we closed and the peer forgot it: nothing
            ReattachEntry(8, 0),  # unknown here, we dialed it: reset it there
            # 9: we dialed, the peer acknowledged, now unknown there: reset here
            # 10: we dialed and closed, the CONNECT was lost: all of it again
            ReattachEntry(11, 0, dialed=True),  # its CONNECT never came: the peer redials
            ReattachEntry(12, 3, closed=True),  # both closed
        ]
    )
    assert plan.redial == [(3, b"tcp/h:3"), (10, b"tcp/h:10")]
    assert [(c, bytes(p)) for c, p in plan.resend] == [
        (2, b"ta2"), (3, b"data3"), (6, b"ata6"), (10, b"data10"),
    ]
    assert plan.errors == [(6, "EOF"), (10, "EOF"), (8, RESET_TEXT)]
    assert plan.reset == [4, 9]
    assert plan.peer_pausing == {2: True, 6: False}
    assert 4 not in ledger and 7 not in ledger and 9 not in ledger
    assert 5 in ledger and 6 in ledger
    assert [e.conn_id for e in ledger.local_state() if e.closed] == [6, 10, 12]
    # a later REATTACH that no longer lists 12 drops its record
    ledger.plan_reattach([ReattachEntry(c, ledger.sent(c)) for c in (2, 3, 5, 6, 10)])
    assert 12 not in [e.conn_id for e in ledger.local_state()]


# ----------------------------------------------------------------- simulation
@dataclass
class Side:
    """One end: its ledger, what its applications wrote and read per connection."""

    name: str
    ledger: ResumeLedger
    next_id: int
    wire: List[Tuple[str, int, object]] = field(default_factory=list)  # what it sent, in flight
    written: Dict[int, bytearray] = field(default_factory=dict)
    read: Dict[int, bytearray] = field(default_factory=dict)
    open: Set[int] = field(default_factory=set)  # connections open here
    closed_here: Set[int] = field(default_factory=set)
    ended_by_peer: Dict[int, str] = field(default_factory=dict)
    resets: List[int] = field(default_factory=list)
    pausing: Set[int] = field(default_factory=set)


def _pattern(conn_id: int, start: int, size: int) -> bytes:
    return bytes((conn_id * 7 + start + i) % 251 for i in range(size))


def _dial(side: Side) -> None:
    side.next_id += 1
    conn_id = side.next_id
    side.ledger.add(conn_id, dialed_here=True)
    side.open.add(conn_id)
    side.written[conn_id] = bytearray()
    side.read[conn_id] = bytearray()
    side.wire.append(("CONNECT", conn_id, None))


def _send(side: Side, conn_id: int, size: int) -> None:
    if conn_id not in side.open or not side.ledger.has_room(conn_id, size):
        return  # a real writer would block here
    payload = _pattern(conn_id, len(side.written[conn_id]), size)
    side.written[conn_id] += payload
    # kept as a session keeps it: the whole DATA message, a header of varying
    # length before the payload (a wrong offset resends header bytes)
    header = b"\xff" * (1 + (conn_id + len(side.written[conn_id])) % 4)
    side.ledger.record_sent(conn_id, header + payload, size)
    side.wire.append(("DATA", conn_id, payload))


def _close(side: Side, conn_id: int) -> None:
    if conn_id not in side.open:
        return
    side.open.discard(conn_id)
    side.closed_here.add(conn_id)
    side.ledger.close(conn_id, "EOF")
    side.wire.append(("ERROR", conn_id, "EOF"))


def _receive(side: Side, peer: Side, message: Tuple[str, int, object]) -> None:
    kind, conn_id, value = message
    ledger = side.ledger
    if kind == "CONNECT":
        assert conn_id not in ledger, f"{side.name}: CONNECT {conn_id} twice"
        ledger.add(conn_id, dialed_here=False)
        side.open.add(conn_id)
        side.written[conn_id] = bytearray()
        side.read[conn_id] = bytearray()
    elif kind == "DATA":
        assert isinstance(value, bytes)
        if conn_id in side.open:
            side.read[conn_id] += value
            ack = ledger.record_received(conn_id, len(value))
            if ack is not None:
                side.wire.append(("ACK", conn_id, ack))
        else:  # we closed it: dropped, as a real connection drops it
            assert conn_id in side.closed_here, f"{side.name}: DATA for unknown {conn_id}"
    elif kind == "ACK":
        assert isinstance(value, int)
        ledger.acknowledge(conn_id, value)
    elif kind == "ERROR":
        if ledger.peer_closed(conn_id):
            assert conn_id in side.open
            side.open.discard(conn_id)
            side.ended_by_peer[conn_id] = str(value)
            side.wire.append(("ERROR", conn_id, "EOF"))  # the echo
    else:  # pragma: no cover
        raise AssertionError(kind)


def _deliver(sender: Side, receiver: Side, count: int) -> None:
    for _ in range(min(count, len(sender.wire))):
        _receive(receiver, sender, sender.wire.pop(0))


def _tick(side: Side) -> None:
    for conn_id, received in side.ledger.due_acks():
        side.wire.append(("ACK", conn_id, received))


def _cut_and_reattach(a: Side, b: Side) -> int:
    a.wire.clear()
    b.wire.clear()
    state_a = decode_reattach(encode_reattach(a.ledger.local_state(a.pausing)))
    state_b = decode_reattach(encode_reattach(b.ledger.local_state(b.pausing)))
    resent = 0
    for side, peer_state in ((a, state_b), (b, state_a)):
        plan = side.ledger.plan_reattach(peer_state)
        for conn_id, _connect in plan.redial:
            side.wire.append(("CONNECT", conn_id, None))
        for conn_id, payload in plan.resend:
            side.wire.append(("DATA", conn_id, bytes(payload)))
        for conn_id, text in plan.errors:
            side.wire.append(("ERROR", conn_id, text))
        for conn_id in plan.reset:
            side.open.discard(conn_id)
            side.resets.append(conn_id)
        resent += plan.resent_bytes
    return resent


_SIDE = st.sampled_from("ab")
_OPS = st.one_of(
    st.tuples(st.just("dial"), _SIDE),
    st.tuples(st.just("send"), _SIDE, st.integers(0, 7), st.integers(1, 40)),
    st.tuples(st.just("deliver"), _SIDE, st.integers(1, 6)),
    st.tuples(st.just("tick"), _SIDE),
    st.tuples(st.just("close"), _SIDE, st.integers(0, 7)),
    st.tuples(st.just("cut")),
)


def _run(ops: List[Tuple[object, ...]], connection_cap: int, session_cap: int) -> Tuple[Side, Side]:
    a = Side("a", ResumeLedger(connection_cap, session_cap), next_id=1)
    b = Side("b", ResumeLedger(connection_cap, session_cap), next_id=1 << 32)
    sides = {"a": (a, b), "b": (b, a)}
    for op in ops:
        if op[0] == "cut":
            _cut_and_reattach(a, b)
            continue
        side, peer = sides[str(op[1])]
        known = sorted(side.written)
        pick: Optional[int] = known[int(op[2]) % len(known)] if known and len(op) > 2 else None
        if op[0] == "dial":
            _dial(side)
        elif op[0] == "send" and pick is not None:
            _send(side, pick, int(op[3]))
        elif op[0] == "deliver":
            _deliver(side, peer, int(op[2]))
        elif op[0] == "tick":
            _tick(side)
        elif op[0] == "close" and pick is not None:
            _close(side, pick)
    # the network comes back for good: deliver everything, ticking, until quiet
    for _ in range(1000):
        _tick(a)
        _tick(b)
        if not a.wire and not b.wire:
            break
        _deliver(a, b, len(a.wire))
        _deliver(b, a, len(b.wire))
    assert not a.wire and not b.wire
    return a, b


def _check_streams(a: Side, b: Side) -> None:
    assert a.resets == [] and b.resets == []
    for sender, receiver in ((a, b), (b, a)):
        for conn_id, written in sender.written.items():
            got = receiver.read.get(conn_id, bytearray())
            if conn_id in receiver.closed_here:
                assert written.startswith(got), (sender.name, conn_id)
            else:
                assert got == written, (sender.name, conn_id, len(got), len(written))
        for conn_id in sender.closed_here:
            # (a connection closed before its CONNECT arrived never existed there)
            if conn_id not in receiver.closed_here and conn_id in receiver.read:
                assert receiver.ended_by_peer.get(conn_id) == "EOF", (receiver.name, conn_id)
    for side in (a, b):
        # nothing is kept once everything was delivered and acknowledged
        assert side.ledger.retained == 0, side.name
        assert all(not side.ledger.is_tombstone(c) for c in side.closed_here), side.name


@settings(max_examples=400, deadline=None)
@given(st.lists(_OPS, max_size=80))
def test_whatever_the_cut_points_each_receiver_gets_exactly_the_sent_stream(
    ops: List[Tuple[object, ...]],
) -> None:
    a, b = _run(ops, connection_cap=64, session_cap=160)
    _check_streams(a, b)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.integers(1, 64))
def test_one_bulk_transfer_cut_anywhere(cut_after: int, chunk: int) -> None:
    """One connection, one direction: the cut after any number of messages."""
    a = Side("a", ResumeLedger(256, 256), next_id=1)
    b = Side("b", ResumeLedger(256, 256), next_id=1 << 32)
    _dial(a)
    conn_id = a.next_id
    total = 3000
    delivered = 0
    cut = False
    while len(a.written[conn_id]) < total or a.wire or b.wire:
        if len(a.written[conn_id]) < total:
            _send(a, conn_id, min(chunk, total - len(a.written[conn_id])))
        if not cut and delivered >= cut_after:
            a.wire.pop()  # lose what was just sent too
            resent = _cut_and_reattach(a, b)
            assert resent <= 256
            cut = True
        delivered += len(a.wire)
        _deliver(a, b, len(a.wire))
        _tick(b)
        _deliver(b, a, len(b.wire))
    _close(a, conn_id)
    _deliver(a, b, 10)
    _deliver(b, a, 10)
    assert bytes(b.read[conn_id]) == _pattern(conn_id, 0, total)
    assert b.ended_by_peer[conn_id] == "EOF"
    assert a.ledger.retained == 0 and conn_id not in a.ledger
