"""The WebSocket frame codec: masking against websocket-client's reference
masker and a plain XOR, frame encoding, and the sans-IO FrameReader fed
frames built by the tests' own client encoder."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import List, Tuple

import pytest
import websocket

from remotedialer import frames
from remotedialer.errors import ProtocolError
from remotedialer.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WebSocketProtocolError,
    encode_frame,
)

from testkit.raw_websocket import client_frame


def reference(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


SIZES = [0, 1, 3, 4, 5, 125, 126, 511, 512, 513, 1023, 4096, 65535, 65536, 70001]


@pytest.fixture(params=["numpy", "wsaccel", "python"])
def implementation(request, monkeypatch):
    if request.param == "numpy":
        if not frames._load_numpy():
            pytest.skip("numpy not installed")
    else:
        monkeypatch.setattr(frames, "_numpy", False)
        if request.param == "wsaccel":
            if frames._accel is None:
                pytest.skip("wsaccel not installed")
        else:
            monkeypatch.setattr(frames, "_accel", None)
    return request.param


@pytest.mark.parametrize("size", SIZES)
def test_mask_matches_reference(implementation, size):
    data, key = os.urandom(size), os.urandom(4)
    assert frames.mask(data, key) == reference(data, key)
    assert frames.mask(frames.mask(data, key), key) == data


@pytest.mark.parametrize("start", [0, 1, 2, 3, 6, 10, 14])
@pytest.mark.parametrize("size", [5, 600, 4099])
def test_mask_in_place_at_unaligned_offset(implementation, start, size):
    prefix, data, key = os.urandom(start), os.urandom(size), os.urandom(4)
    buffer = bytearray(prefix + data)
    frames.mask_in_place(buffer, key, start)
    assert bytes(buffer[:start]) == prefix
    assert bytes(buffer[start:]) == reference(data, key)
    buffer.extend(b"x")  # the numpy view was released: the buffer can grow again


@pytest.mark.parametrize("size", [0, 10, 125, 126, 65535, 65536, 100000])
def test_encode_masked_frame_decodes_with_websocket_client(implementation, size):
    payload, key = os.urandom(size), b"\x01\x02\x03\x04"
    frame = bytes(frames.encode_masked_frame(websocket.ABNF.OPCODE_BINARY, payload, key))
    expected = websocket.ABNF(1, 0, 0, 0, websocket.ABNF.OPCODE_BINARY, 1, payload)
    expected.get_mask_key = lambda _n: key
    assert frame == expected.format()


@pytest.mark.parametrize("head,tail", [(6, 65536), (0, 70000), (7, 0), (3, 1)])
def test_encode_masked_frame_of_two_parts_is_the_frame_of_the_joined_message(head, tail):
    """A DATA header and its payload, masked as one message without joining
    them first (the agent's write path)."""
    first, second, key = os.urandom(head), memoryview(os.urandom(tail)), b"\x05\x06\x07\x08"
    joined = frames.encode_masked_frame(websocket.ABNF.OPCODE_BINARY, first + bytes(second), key)
    assert frames.encode_masked_frame(websocket.ABNF.OPCODE_BINARY, first, key, tail=second) == joined


FIRST_MASK_IN_A_FRESH_PROCESS = """
import sys, threading
importers = []
class Spy:  # records the thread that imports numpy
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            importers.append(threading.current_thread().name)
        return None
sys.meta_path.insert(0, Spy())
from remotedialer import frames
assert "numpy" not in sys.modules, "importing remotedialer loaded numpy"
data, key = bytes(range(256)) * 256, b"\\x01\\x02\\x03\\x04"
masked = frames.mask(data, key)
assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(data))
for thread in threading.enumerate():
    if thread.name == "remotedialer-numpy-import":
        thread.join(60)
assert frames.masking_implementation() == "numpy"
print(",".join(importers))
"""


def test_the_first_large_mask_imports_numpy_on_another_thread():
    """A client masks under its session's write lock: an import there (0.1 s
    idle, over a second under load) held back its PAUSE while the peer's
    transfer overran the receive buffer's hard limit."""
    if not frames._load_numpy():
        pytest.skip("numpy not installed")
    result = subprocess.run(
        [sys.executable, "-c", FIRST_MASK_IN_A_FRESH_PROCESS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["remotedialer-numpy-import"]


UNMASK_LENGTHS = [*range(71), 1200, 4095, 4096, 4097, 16384, 65536, 65539]


def unmasking_errors(unmask, lengths=UNMASK_LENGTHS) -> List[Tuple[int, int, int]]:
    """``(length, offset, rotation)`` for which ``unmask(payload view, key)``
    differs from the byte-wise reference; the payload is a view at every
    offset 0..3 into a larger buffer (as the reader passes it), under every
    rotation of the key."""
    errors = []
    base_key = b"\x01\x80\xff\x37"
    for length in lengths:
        data = os.urandom(length + 3)
        for offset in range(4):
            for rotation in range(4):
                key = base_key[rotation:] + base_key[:rotation]
                view = memoryview(bytearray(data))[offset:offset + length]
                if unmask(view, key) != reference(bytes(view), key):
                    errors.append((length, offset, rotation))
    return errors


def test_unmasking_is_byte_exact_at_every_length_offset_and_rotation(implementation):
    assert unmasking_errors(frames.mask) == []


def test_the_unmasking_check_catches_a_wrong_key_rotation():
    def rotated_by_one(data, key):
        return frames.mask(data, key[1:] + key[:1])

    errors = unmasking_errors(rotated_by_one, lengths=[0, 1, 5, 70, 1200])
    assert {length for length, _, _ in errors} == {1, 5, 70, 1200}


def test_implementation_name():
    assert frames.masking_implementation() in ("numpy", "wsaccel", "python")


def feed_all(reader: FrameReader, data: bytes, step: int = 0) -> List[Tuple[int, bytes]]:
    """Feed ``data`` (``step`` bytes at a time; all at once if 0) and collect events."""
    events: List[Tuple[int, bytes]] = []
    chunks = [data] if not step else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            event = reader.next_event()
            if event is None:
                break
            events.append(event)
    return events


# ------------------------------------------------------------ sans-IO codec
def test_unmask_round_trip_all_lengths() -> None:
    mask = b"\x01\x80\xff\x37"
    for n in (0, 1, 3, 4, 5, 127, 4099):
        data = os.urandom(n)
        expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert frames.mask(data, mask) == expected
        assert frames.mask(expected, mask) == data


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_reader_decodes_every_length_encoding(size: int) -> None:
    payload = os.urandom(size)
    frame = client_frame(OP_BINARY, payload)
    assert feed_all(FrameReader(1 << 20), frame) == [(OP_BINARY, payload)]


def test_reader_byte_by_byte_with_interleaved_control_frames() -> None:
    stream = (
        client_frame(OP_BINARY, b"hello ", fin=False)
        + client_frame(OP_PING, b"p1")
        + client_frame(OP_CONTINUATION, b"wor", fin=False)
        + client_frame(OP_PONG, b"")
        + client_frame(OP_CONTINUATION, b"ld", fin=True)
        + client_frame(OP_BINARY, b"")
        + client_frame(OP_TEXT, "héllo".encode())
        + client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    expected = [
        (OP_PING, b"p1"),
        (OP_PONG, b""),
        (OP_BINARY, b"hello world"),
        (OP_BINARY, b""),
        (OP_TEXT, "héllo".encode()),
        (OP_CLOSE, struct.pack("!H", 1000) + b"bye"),
    ]
    assert feed_all(FrameReader(1 << 20), stream, step=1) == expected
    assert feed_all(FrameReader(1 << 20), stream) == expected


@pytest.mark.parametrize(
    "frame, message",
    [
        (client_frame(OP_BINARY, b"x", masked=False), "not masked"),
        (client_frame(OP_BINARY, b"x", rsv=0x40), "reserved bits"),
        (client_frame(0x3, b"x"), "unknown opcode"),
        (client_frame(OP_PING, b"x", fin=False), "fragmented control"),
        (client_frame(OP_PING, b"x" * 126), "longer than 125"),
        (client_frame(OP_CONTINUATION, b"x"), "continuation"),
        (client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_BINARY, b"b"), "unfinished"),
        (struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + b"mask", "high bit"),
    ],
)
def test_reader_rejects_bad_frames(frame: bytes, message: str) -> None:
    with pytest.raises(WebSocketProtocolError, match=message) as info:
        feed_all(FrameReader(1 << 20), frame)
    assert info.value.close_code == 1002


def test_reader_limits_message_size_before_buffering() -> None:
    reader = FrameReader(1000)
    assert feed_all(reader, client_frame(OP_BINARY, b"x" * 1000)) == [(OP_BINARY, b"x" * 1000)]
    # the header alone announces too much: rejected without the payload
    with pytest.raises(WebSocketProtocolError, match="over the limit") as info:
        feed_all(reader, client_frame(OP_BINARY, b"x" * 1001)[:8])
    assert info.value.close_code == 1009
    # fragments adding up to too much
    reader = FrameReader(1000)
    with pytest.raises(ProtocolError, match="over the limit"):
        feed_all(reader, client_frame(OP_BINARY, b"x" * 600, fin=False)
                 + client_frame(OP_CONTINUATION, b"x" * 600))


def test_encode_frame_lengths() -> None:
    assert encode_frame(OP_BINARY, b"ab") == b"\x82\x02ab"
    assert encode_frame(OP_BINARY, b"a" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frame(OP_BINARY, b"a" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)
    assert encode_frame(OP_PING) == b"\x89\x00"


def test_reader_of_server_frames() -> None:
    """A client's reader: unmasked frames decode, masked ones are refused."""
    stream = (
        encode_frame(OP_BINARY, b"frag", fin=False) + encode_frame(OP_PONG, b"p")
        + encode_frame(OP_CONTINUATION, b"ment") + encode_frame(OP_BINARY, b"x" * 70_000)
        + encode_frame(OP_CLOSE, frames.close_payload(1000, "bye"))
    )
    expected = [(OP_PONG, b"p"), (OP_BINARY, b"fragment"), (OP_BINARY, b"x" * 70_000),
                (OP_CLOSE, frames.close_payload(1000, "bye"))]
    assert feed_all(FrameReader(1 << 20, from_client=False), stream, step=7) == expected
    with pytest.raises(WebSocketProtocolError, match="server frame masked"):
        feed_all(FrameReader(1 << 20, from_client=False), client_frame(OP_BINARY, b"x"))


@pytest.mark.parametrize("code, valid", [
    (0, False), (999, False), (1000, True), (1003, True), (1004, False), (1005, False),
    (1006, False), (1007, True), (1013, True), (1014, False), (1015, False), (2999, False),
    (3000, True), (4999, True), (5000, False), (65535, False),
])
def test_reader_takes_only_the_close_codes_a_peer_may_send(code: int, valid: bool) -> None:
    """RFC 6455 §7.4: 1000-1003, 1007-1013 and 3000-4999, at each edge
    (tests/core/test_wsproto_differential.py compares with wsproto)."""
    frame = client_frame(OP_CLOSE, struct.pack("!H", code) + b"bye")
    if valid:
        assert feed_all(FrameReader(1 << 20), frame) == [(OP_CLOSE, struct.pack("!H", code) + b"bye")]
    else:
        with pytest.raises(WebSocketProtocolError, match=f"invalid code {code}"):
            feed_all(FrameReader(1 << 20), frame)
