"""Differential test of the WebSocket frame decoder against wsproto.

The same byte streams go to our :class:`~remotedialer.frames.FrameReader` and
to wsproto's frame parser (``wsproto.frame_protocol.FrameProtocol``, the
engine under simple-websocket), each fed in its own random chunks: streams a
client sends to the server (masked; the server's reader) and, since the
client reads with ``FrameReader(from_client=False)`` too, streams a server
sends to a client (unmasked).
Streams mix valid traffic (fragmented messages with interleaved control
frames, every length encoding, close frames) with invalid frames: unknown
opcodes, reserved bits, wrongly masked frames, oversized or fragmented control
frames, non-minimal or out-of-range lengths, bad close payloads (one byte,
invalid or reserved codes, bad UTF-8), text that is not UTF-8, continuation
frames without a message and new messages inside a fragmented one.

Compared: whole messages (fragments joined) and control frames in order, up
to and including the first close frame (after it both stop reading), and the
outcome: still open, closed, or a protocol error with its close code.

Where the two differ by design, and what is asserted instead:

* our reader fails a frame as soon as its first two bytes are wrong
  (reserved bits, no mask), while wsproto first reads the extended length; and
  wsproto fails a data frame that should have been a continuation as soon as
  its first payload byte arrives, while we wait for the whole frame. So for a
  stream cut in the middle of a frame, one side may report an error where the
  other still waits: then the same stream, completed, makes both fail with the
  same code (:func:`test_cut_streams_agree_up_to_when_an_error_shows`);
* our reader enforces ``max_message_size`` (close code 1009); wsproto's
  frame parser has no such limit, so the comparison runs with an unbounded
  size (the limit has its own tests in ``test_wsgi_transport.py``).

The default run is a few seconds; ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple, Union

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from remotedialer.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WebSocketProtocolError,
    parse_close,
)

Event = Tuple[int, Union[bytes, Tuple[int, str]]]
"""``(opcode, payload)``; a close frame's payload is ``(code, reason)``."""
Outcome = Union[str, Tuple[str, int]]
"""``"open"``, ``"closed"`` or ``("error", close code)``."""

UNLIMITED = 1 << 63  # wsproto's frame parser has no message size limit

# The default run draws the same examples every time (a CI run must not
# fail on a draw no one can replay); the `slow` runs explore afresh, and
# what they find becomes an explicit test.
FAST = settings(
    derandomize=True, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
SLOW = settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ decoders
def split(stream: bytes, sizes: Sequence[int], max_pieces: int = 200) -> List[bytes]:
    """``stream`` cut into pieces of ``sizes`` (repeated), the rest after
    ``max_pieces`` in one piece; one piece if ``sizes`` is empty."""
    if not sizes:
        return [stream]
    pieces: List[bytes] = []
    offset = index = 0
    while offset < len(stream):
        size = sizes[index % len(sizes)] if index < max_pieces else len(stream)
        pieces.append(stream[offset:offset + size])
        offset += size
        index += 1
    return pieces


def decode_ours(pieces: Sequence[bytes], from_client: bool = True) -> Tuple[List[Event], Outcome]:
    reader = FrameReader(UNLIMITED, from_client=from_client)
    events: List[Event] = []
    try:
        for piece in pieces:
            reader.feed(piece)
            while True:
                event = reader.next_event()
                if event is None:
                    break
                opcode, payload = event
                if opcode == OP_CLOSE:
                    events.append((opcode, parse_close(payload)))
                    return events, "closed"
                events.append((opcode, payload))
    except WebSocketProtocolError as exc:
        return events, ("error", exc.close_code)
    return events, "open"


def decode_wsproto(pieces: Sequence[bytes], from_client: bool = True) -> Tuple[List[Event], Outcome]:
    protocol = FrameProtocol(client=not from_client, extensions=[])
    events: List[Event] = []
    parts: List[bytes] = []
    try:
        for piece in pieces:
            protocol.receive_bytes(piece)
            for frame in protocol.received_frames():
                payload = frame.payload
                if frame.opcode is Opcode.CLOSE:
                    assert isinstance(payload, tuple)
                    code, reason = payload
                    events.append((OP_CLOSE, (int(code), reason)))
                    return events, "closed"
                # wsproto before 1.3 (the newest for Python 3.9) hands out bytearray
                if frame.opcode.iscontrol():
                    assert isinstance(payload, (bytes, bytearray))
                    events.append((int(frame.opcode), bytes(payload)))
                    continue
                assert isinstance(payload, (str, bytes, bytearray))
                parts.append(payload.encode("utf-8") if isinstance(payload, str) else bytes(payload))
                if frame.message_finished:
                    events.append((int(frame.opcode), b"".join(parts)))
                    parts = []
    except ParseFailed as exc:
        return events, ("error", int(exc.code))
    return events, "open"


# ------------------------------------------------------------------- streams
def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
          key: bytes = b"\x00\x00\x00\x00", length_form: str = "minimal") -> bytes:
    """One frame, written here independently of the code under test.
    ``length_form``: ``minimal``, ``16`` or ``64`` (possibly non-minimal
    extended lengths) or ``64-msb`` (the forbidden top bit set)."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length_form == "minimal":
        length_form = "7" if n < 126 else "16" if n < 1 << 16 else "64"
    if length_form == "7":
        header = struct.pack("!BB", first, mask_bit | n)
    elif length_form == "16":
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    elif length_form == "64":
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n | 1 << 63)
    if not masked:
        return header + payload
    keystream = (key * (n // 4 + 1))[:n]
    masked_payload = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return header + key + masked_payload


def long_bytes(low: int, high: int) -> st.SearchStrategy[bytes]:
    """Payloads of ``low``..``high`` bytes from a short repeated pattern
    (hypothesis cannot draw 64 KiB of free bytes)."""
    def repeat(pattern: bytes, size: int) -> bytes:
        return (pattern * (size // len(pattern) + 1))[:size]

    return st.builds(repeat, st.binary(min_size=1, max_size=8), st.integers(low, high))


# Strategies are built once here: building them inside the composite
# strategies below made generation most of the test's time.
rare = st.integers(0, 9).map(lambda n: n == 0)  # one time in ten
utf8 = st.text(max_size=40).map(lambda text: text.encode("utf-8"))
#: Close codes: valid ones, reserved, local-only, out of range.
close_codes = st.one_of(
    st.sampled_from([1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011,
                     1012, 1013, 1014, 1015, 1016, 2999, 3000, 3999, 4000, 4999, 5000, 999, 0]),
    st.integers(0, 0xFFFF),
)
valid_close_codes = st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                     3000, 3999, 4000, 4999])
close_payloads = st.one_of(
    st.just(b""),
    st.builds(lambda code, reason: struct.pack("!H", code) + reason, valid_close_codes, utf8),
    st.binary(min_size=1, max_size=1),
    st.builds(lambda code, reason: (struct.pack("!H", code) + reason)[:125],
              close_codes, st.one_of(utf8, st.binary(max_size=20))),
)
data_payloads = st.one_of(st.binary(max_size=200), utf8, long_bytes(126, 70_000))
text_payloads = st.one_of(utf8, utf8.map(lambda text: text * 4), st.binary(max_size=20))
control_payloads = st.binary(max_size=125)
long_control_payloads = long_bytes(126, 200)
any_opcode = st.sampled_from(
    [OP_BINARY, OP_BINARY, OP_BINARY, OP_TEXT, OP_PING, OP_PONG, OP_CLOSE, OP_CONTINUATION]
)
unknown_opcodes = st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
rsv_bits = st.integers(1, 7)
keys = st.binary(min_size=4, max_size=4)
length_forms = st.sampled_from(["7", "16", "64", "64-msb"])
message_opcodes = st.sampled_from([OP_BINARY, OP_TEXT])
ping_or_pong = st.sampled_from([OP_PING, OP_PONG])
fragment_counts = st.integers(2, 5)
non_ascii = st.characters(min_codepoint=0x80)


#: What is wrong with a frame: nothing (most of the time), or one of these.
FAULTS = ("", "unknown opcode", "reserved bits", "wrong mask", "length form", "control fin")
faults = st.integers(0, 59).map(lambda n: FAULTS[max(0, n - 54)])


@st.composite
def frames(draw: st.DrawFn, from_client: bool, opcode: Optional[int] = None, fin: Optional[bool] = None,
           text: bool = False) -> bytes:
    """One frame of ``opcode`` (drawn if None) as a client (masked) or a
    server sends it, sometimes broken; ``text``: a continuation of a text
    message."""
    if opcode is None:
        opcode = draw(any_opcode)
    if fin is None:
        fin = opcode >= OP_CLOSE or not draw(rare)
    if opcode == OP_CLOSE:
        payload = draw(close_payloads)
    elif opcode in (OP_PING, OP_PONG):
        payload = draw(control_payloads)
    elif opcode == OP_TEXT or text:
        payload = draw(text_payloads)
    else:
        payload = draw(data_payloads)
    fault = draw(faults)
    rsv, masked, length_form = 0, from_client, "minimal"
    if fault == "unknown opcode":
        opcode = draw(unknown_opcodes)
    elif fault == "reserved bits":
        rsv = draw(rsv_bits)
    elif fault == "wrong mask":
        masked = not from_client
    elif fault == "length form":
        length_form = draw(length_forms)
        if length_form == "7" and len(payload) > 125 or length_form == "16" and len(payload) > 0xFFFF:
            length_form = "64"
    elif fault == "control fin" and opcode >= OP_CLOSE:
        if draw(st.booleans()):
            fin = False
        else:
            payload = draw(long_control_payloads)
    return frame(opcode, payload, fin=fin, rsv=rsv, masked=masked, key=draw(keys), length_form=length_form)


@st.composite
def fragmented_messages(draw: st.DrawFn, from_client: bool) -> bytes:
    """A message in several frames, control frames in between (each frame
    sometimes broken), or a text message with a character split across two
    frames."""
    first = draw(message_opcodes)
    if first == OP_TEXT and draw(rare):
        character = draw(non_ascii).encode("utf-8", "surrogatepass")
        cut = draw(st.integers(1, len(character) - 1))
        return (frame(OP_TEXT, b"a" + character[:cut], fin=False, masked=from_client)
                + frame(OP_CONTINUATION, character[cut:], masked=from_client))
    count = draw(fragment_counts)
    parts = [draw(frames(from_client, first, fin=False))]
    for index in range(1, count):
        if draw(st.booleans()):
            parts.append(draw(frames(from_client, draw(ping_or_pong))))
        last = index == count - 1
        parts.append(draw(frames(from_client, OP_CONTINUATION, fin=last, text=first == OP_TEXT)))
    return b"".join(parts)


def streams_from(from_client: bool) -> st.SearchStrategy[Tuple[bool, bytes]]:
    frame_lists = st.lists(st.one_of(frames(from_client), fragmented_messages(from_client)), max_size=6)
    return st.tuples(st.just(from_client), frame_lists.map(b"".join))


#: ``(from_client, stream)``: what a client sends to the server, or the reverse.
streams = st.one_of(streams_from(True), streams_from(False))
chunk_sizes = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 70_000)), max_size=6)


def assert_agree(sided: Tuple[bool, bytes], ours_sizes: Sequence[int], theirs_sizes: Sequence[int]) -> None:
    from_client, stream = sided
    ours = decode_ours(split(stream, ours_sizes), from_client)
    theirs = decode_wsproto(split(stream, theirs_sizes), from_client)
    assert ours == theirs


# -------------------------------------------------------------- properties
@FAST
@given(streams, chunk_sizes, chunk_sizes)
@example((True, frame(OP_BINARY, b"x" * 10, length_form="16")), [], [])  # non-minimal length
@example((True, frame(OP_CLOSE, b"\x03")), [], [])  # one-byte close payload
@example((True, frame(OP_CLOSE, struct.pack("!H", 1005))), [], [])  # local-only close code
@example((True, frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff")), [], [])  # close reason not UTF-8
@example((True, frame(OP_TEXT, b"\xc3", fin=False) + frame(OP_CONTINUATION, b"\xa9")), [1], [])  # split char
@example((True, frame(OP_TEXT, b"\xff", fin=False)), [], [])  # bad UTF-8 in a first fragment
@example((False, frame(OP_BINARY, b"x")), [], [])  # a masked server frame
@example((False, frame(OP_BINARY, b"x" * 200, masked=False)), [1], [])
def test_whole_streams_agree(sided: Tuple[bool, bytes], ours_sizes: List[int],
                             theirs_sizes: List[int]) -> None:
    """Streams of whole frames: the same events and the same outcome,
    however the bytes are cut into reads."""
    assert_agree(sided, ours_sizes, theirs_sizes)


def assert_cut_agrees(from_client: bool, whole: bytes, cut: int) -> None:
    """The stream cut at ``cut``: the same events; the same outcome unless one
    side fails a frame the other has not seen whole yet, and then the whole
    stream fails on both with the same code."""
    ours_events, ours_outcome = decode_ours([whole[:cut]], from_client)
    theirs_events, theirs_outcome = decode_wsproto([whole[:cut]], from_client)
    assert ours_events == theirs_events
    if ours_outcome != theirs_outcome:
        assert "open" in (ours_outcome, theirs_outcome)
        padded = whole + bytes(14)  # completes any frame header
        ours_whole = decode_ours([padded], from_client)[1]
        theirs_whole = decode_wsproto([padded], from_client)[1]
        if ours_outcome == "open":
            assert ours_whole == theirs_outcome
        else:
            assert theirs_whole == ours_outcome


@FAST
@given(streams, st.binary(max_size=24), st.data())
def test_cut_streams_agree_up_to_when_an_error_shows(
    sided: Tuple[bool, bytes], garbage: bytes, data: st.DataObject
) -> None:
    """A stream cut anywhere, with some garbage after it."""
    from_client, stream = sided
    whole = stream + garbage
    assert_cut_agrees(from_client, whole, data.draw(st.integers(0, len(whole))))


@pytest.mark.parametrize(
    "first, second", [(0x00, 0x90), (0x82, 0x90)], ids=["continuation", "after-unfinished"],
)
def test_a_fragment_out_of_place_fails_from_its_header(first: int, second: int) -> None:
    """A continuation with nothing to continue (or a new message inside an
    unfinished one), its header whole and its payload not: wsproto fails it
    from the header, and so must this reader (found by the property above)."""
    unfinished = frame(OP_BINARY, b"x", fin=False) if first == 0x82 else b""
    whole = unfinished + bytes([first, second]) + bytes(5)  # 16-byte payload, 1 byte of it here
    for cut in range(len(whole) + 1):
        assert_cut_agrees(True, whole, cut)


@pytest.mark.parametrize(
    "stream, outcome",
    [
        (frame(OP_BINARY, b"abc", fin=False) + frame(OP_PING, b"p") + frame(OP_CONTINUATION, b"d"), "open"),
        (frame(OP_BINARY, b"x" * 200, length_form="64"), ("error", 1002)),
        (frame(OP_PING, b"x" * 126), ("error", 1002)),
        (frame(OP_PING, b"x", fin=False), ("error", 1002)),
        (frame(OP_BINARY, b"x", rsv=4), ("error", 1002)),
        (frame(OP_BINARY, b"x", masked=False), ("error", 1002)),
        (frame(0xB, b"x"), ("error", 1002)),
        (frame(OP_CONTINUATION, b"x"), ("error", 1002)),
        (frame(OP_BINARY, b"x", fin=False) + frame(OP_TEXT, b"y"), ("error", 1002)),
        (frame(OP_BINARY, b"x", length_form="64-msb"), ("error", 1002)),
        (frame(OP_CLOSE, b""), "closed"),
        (frame(OP_CLOSE, struct.pack("!H", 4999) + "é".encode()), "closed"),
        (frame(OP_CLOSE, struct.pack("!H", 1014)), ("error", 1002)),
        (frame(OP_CLOSE, struct.pack("!H", 5000)), ("error", 1002)),
        (frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xc3"), ("error", 1007)),
        (frame(OP_TEXT, b"ok \xf0\x9f", fin=False) + frame(OP_CONTINUATION, b"\x98\x80"), "open"),
        (frame(OP_TEXT, b"\xed\xa0\x80"), ("error", 1007)),  # a UTF-16 surrogate
    ],
)
def test_known_cases(stream: bytes, outcome: Outcome) -> None:
    """Hand-picked cases with their expected outcome on both decoders (so
    that the property cannot pass by both going wrong the same way)."""
    assert decode_wsproto([stream])[1] == outcome
    assert decode_ours([stream])[1] == outcome
    assert_agree((True, stream), [1], [])


@pytest.mark.parametrize(
    "stream, outcome",
    [
        (frame(OP_BINARY, b"ab", fin=False, masked=False) + frame(OP_CONTINUATION, b"c", masked=False),
         "open"),
        (frame(OP_BINARY, b"x"), ("error", 1002)),  # a server frame must not be masked
        (frame(OP_CLOSE, struct.pack("!H", 1001), masked=False), "closed"),
        (frame(OP_PING, b"x" * 126, masked=False), ("error", 1002)),
    ],
)
def test_known_cases_server_to_client(stream: bytes, outcome: Outcome) -> None:
    assert decode_wsproto([stream], from_client=False)[1] == outcome
    assert decode_ours([stream], from_client=False)[1] == outcome
    assert_agree((False, stream), [1], [])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@SLOW
@given(streams, chunk_sizes, chunk_sizes)
def test_whole_streams_agree_long(sided: Tuple[bool, bytes], ours_sizes: List[int],
                                  theirs_sizes: List[int]) -> None:
    assert_agree(sided, ours_sizes, theirs_sizes)
