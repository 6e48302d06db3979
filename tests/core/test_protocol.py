"""The sans-IO codec against the Go reference vectors and the recorded Go session."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List

import pytest

from remotedialer.errors import ProtocolError
from remotedialer.protocol import (
    LEGACY_DEADLINE_MS,
    MAX_CLIENT_PAYLOAD,
    MAX_CONNECT_PAYLOAD,
    MAX_ERROR_PAYLOAD,
    Message,
    MessageIdCounter,
    MessageType,
    decode_message,
    decode_sync_payload,
    decode_varint,
    encode_data_header,
    encode_message,
    encode_sync_payload,
    encode_varint,
    split_client_address,
    to_int64,
)

from testkit.support import go_vectors


def _load(name: str) -> Dict[str, Any]:
    path = go_vectors(name)
    with open(path, encoding="utf-8") as f:
        data: Dict[str, Any] = json.load(f)
    return data


REFERENCE = _load("go-reference-messages.json")
TRACE = _load("go-session-trace.json")
TRACE_MESSAGES: List[Dict[str, Any]] = [e for e in TRACE["events"] if e["kind"] == "message"]


def _ids(cases: List[Dict[str, Any]]) -> List[str]:
    return [c["name"] for c in cases]


# ------------------------------------------------------------------ encode
@pytest.mark.parametrize("case", REFERENCE["encode"], ids=_ids(REFERENCE["encode"]))
def test_encode_vector(case: Dict[str, Any]) -> None:
    payload = bytes.fromhex(case["payload_hex"])
    assert MessageType(case["type"]).name == case["type_name"]
    encoded = encode_message(case["id"], case["conn_id"], case["type"], payload)
    assert encoded.hex() == case["hex"]
    if case["type"] == MessageType.DATA:
        header = encode_data_header(case["id"], case["conn_id"])
        assert (header + payload).hex() == case["hex"]
    if "sync_ids" in case:
        assert encode_sync_payload(case["sync_ids"]).hex() == case["payload_hex"]


@pytest.mark.parametrize("case", REFERENCE["encode"], ids=_ids(REFERENCE["encode"]))
def test_encode_vector_decodes_back(case: Dict[str, Any]) -> None:
    message = decode_message(bytes.fromhex(case["hex"]))
    assert message.message_id == case["id"]
    assert message.conn_id == case["conn_id"]
    assert message.type == case["type"]
    assert message.type_name == case["type_name"]
    assert bytes(message.payload).hex() == case["payload_hex"]
    if "proto" in case:
        assert message.proto == case["proto"]
        assert message.address == case["address"]
    elif "address" in case:
        assert message.address == case["address"]
        client_key, session_key = case["address"].rsplit("/", 1)
        assert split_client_address(message.address) == (client_key, int(session_key))
    if "error_text" in case:
        assert message.text == case["error_text"]
        assert message.is_eof == (case["error_text"] == "EOF")
    if "sync_ids" in case:
        assert decode_sync_payload(message.payload) == case["sync_ids"]


# ------------------------------------------------------------------ decode
@pytest.mark.parametrize("case", REFERENCE["decode"], ids=_ids(REFERENCE["decode"]))
def test_decode_vector(case: Dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    if not case["ok"]:
        with pytest.raises(ProtocolError):
            decode_message(data)
        return
    message = decode_message(data)
    if "type" in case:
        assert message.type == case["type"]
    if "proto" in case:
        assert message.proto == case["proto"]
    if "address" in case:
        assert message.address == case["address"]
    if case.get("type") == MessageType.ERROR:
        assert message.text == case.get("error_text", "")
        assert message.is_eof == case.get("error_is_eof", False)


def test_decode_truncation_limits() -> None:
    """The read limits cut exactly at 266 / 100 / 100 bytes, never DATA."""
    big = b"x/" + b"y" * 1000
    cases = [
        (MessageType.CONNECT, MAX_CONNECT_PAYLOAD, 266),
        (MessageType.ERROR, MAX_ERROR_PAYLOAD, 100),
        (MessageType.ADD_CLIENT, MAX_CLIENT_PAYLOAD, 100),
        (MessageType.REMOVE_CLIENT, MAX_CLIENT_PAYLOAD, 100),
    ]
    for message_type, limit, expected in cases:
        assert limit == expected
        message = decode_message(encode_message(1, 2, message_type, big))
        assert bytes(message.payload) == big[:limit]
        short = decode_message(encode_message(1, 2, message_type, big[:limit - 1]))
        assert bytes(short.payload) == big[:limit - 1]
    data = decode_message(encode_message(1, 2, MessageType.DATA, big))
    assert bytes(data.payload) == big
    # Other types are not limited (PAUSE with a stray payload, unknown types).
    unknown = decode_message(encode_message(1, 2, 99, big))
    assert bytes(unknown.payload) == big
    assert unknown.type_name == "UNKNOWN(99)"


def test_decode_unknown_type_has_no_deadline_field() -> None:
    # 0xc6 0x01 is 99; "whatever" follows immediately (no deadline varint).
    message = decode_message(bytes.fromhex("0204c6017768617465766572"))
    assert message.type == 99
    assert bytes(message.payload) == b"whatever"


def test_decode_data_payload_is_zero_copy() -> None:
    raw = encode_message(5, 6, MessageType.DATA, b"abc")
    message = decode_message(raw)
    assert isinstance(message.payload, memoryview)
    assert message.payload.obj is raw


def test_decode_accepts_memoryview_and_bytearray() -> None:
    raw = encode_message(5, 6, MessageType.ERROR, b"EOF")
    for form in (bytearray(raw), memoryview(raw)):
        message = decode_message(form)
        assert message.is_eof and message.conn_id == 6


def test_message_repr_and_helpers() -> None:
    message = decode_message(encode_message(7, 8, MessageType.DATA, b"z" * 100))
    text = repr(message)
    assert "DATA" in text and "100 bytes" in text and text.endswith("...)")
    assert Message(1, 2, MessageType.ERROR, b"boom").is_eof is False
    assert Message(1, 2, MessageType.DATA, b"EOF").is_eof is False
    assert Message(1, 0, MessageType.ADD_CLIENT, b"a/b/3").address == "a/b/3"


# ------------------------------------------------------------ sync payloads
@pytest.mark.parametrize("case", REFERENCE["sync_payloads"])
def test_sync_payload_vector(case: Dict[str, Any]) -> None:
    payload = bytes.fromhex(case["payload_hex"])
    if case["go_error"]:
        with pytest.raises(ProtocolError):
            decode_sync_payload(payload)
        return
    assert decode_sync_payload(payload) == case["ids"]
    assert encode_sync_payload(case["ids"]) == payload


@pytest.mark.parametrize("size", [1, 7, 9, 15, 17])
def test_sync_payload_bad_lengths(size: int) -> None:
    with pytest.raises(ProtocolError):
        decode_sync_payload(b"\0" * size)


# ----------------------------------------------------------------- varints
VARINTS = [
    (0, "00"),
    (1, "02"),
    (-1, "01"),
    (2, "04"),
    (63, "7e"),
    (-64, "7f"),
    (64, "8001"),
    (-65, "8101"),
    (15000, "b0ea01"),
    ((1 << 63) - 1, "feffffffffffffffff01"),
    (-(1 << 63), "ffffffffffffffffff01"),
]


@pytest.mark.parametrize("value,hexed", VARINTS)
def test_varint_known_encodings(value: int, hexed: str) -> None:
    assert encode_varint(value).hex() == hexed
    assert decode_varint(bytes.fromhex(hexed)) == (value, len(hexed) // 2)


def test_varint_roundtrip_boundaries() -> None:
    values = set()
    for bits in range(0, 64):
        for base in (1 << bits, -(1 << bits)):
            values.update({base - 1, base, base + 1})
    values = {v for v in values if -(1 << 63) <= v < (1 << 63)}
    for value in values:
        encoded = encode_varint(value)
        assert 1 <= len(encoded) <= 10
        assert decode_varint(b"\xaa" + encoded + b"tail", 1) == (value, 1 + len(encoded))


@pytest.mark.parametrize("value", [1 << 63, -(1 << 63) - 1, 1 << 70])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize(
    "hexed",
    [
        "",  # EOF before the first byte
        "80",  # unexpected EOF inside
        "ffffffffffffffffff",  # 9 continuation bytes, then nothing
        "ffffffffffffffffff02",  # 10th byte > 1 overflows
        "ffffffffffffffffffff01",  # 11 bytes
    ],
)
def test_varint_rejected(hexed: str) -> None:
    with pytest.raises(ProtocolError):
        decode_varint(bytes.fromhex(hexed))


def test_varint_error_texts_follow_go() -> None:
    with pytest.raises(ProtocolError, match="^EOF$"):
        decode_varint(b"")
    with pytest.raises(ProtocolError, match="unexpected EOF"):
        decode_varint(b"\x80\x80")
    with pytest.raises(ProtocolError, match="overflows"):
        decode_varint(bytes.fromhex("ffffffffffffffffff7f"))


def test_varint_non_minimal_encoding_accepted() -> None:
    # Go's ReadVarint accepts padded encodings such as 0x80 0x00 for 0.
    assert decode_varint(b"\x80\x00") == (0, 2)
    assert decode_varint(b"\x82\x80\x00") == (1, 3)


# --------------------------------------------------------- message ids
def test_message_id_counter_starts_random_non_negative() -> None:
    starts = {MessageIdCounter().next() for _ in range(20)}
    assert all(0 <= s < (1 << 63) for s in starts)
    assert len(starts) > 1


def test_message_id_counter_increments() -> None:
    counter = MessageIdCounter(41)
    assert [counter.next() for _ in range(3)] == [41, 42, 43]


def test_message_id_counter_wraps_as_int64() -> None:
    counter = MessageIdCounter((1 << 63) - 2)
    values = [counter.next() for _ in range(4)]
    assert values == [(1 << 63) - 2, (1 << 63) - 1, -(1 << 63), -(1 << 63) + 1]
    for value in values:  # every id stays encodable
        assert decode_varint(encode_varint(value))[0] == value


def test_to_int64() -> None:
    assert to_int64(1 << 63) == -(1 << 63)
    assert to_int64((1 << 64) - 1) == -1
    assert to_int64(5) == 5
    assert to_int64(-5) == -5


def test_split_client_address() -> None:
    assert split_client_address("foo/5577006791947779410") == ("foo", 5577006791947779410)
    assert split_client_address("a/b/-3") == ("a/b", -3)
    assert split_client_address("noslash") is None
    assert split_client_address("foo/notanumber") is None


# -------------------------------------------------------- recorded session
def _trace_id(event: Dict[str, Any]) -> str:
    return f"{event['dir']}-{event['t']}-{event['type_name']}-{event['conn_id']}"


def test_trace_has_every_kind_of_message() -> None:
    kinds = {e["type_name"] for e in TRACE_MESSAGES}
    assert {"CONNECT", "DATA", "ERROR", "PAUSE", "RESUME", "SYNC_CONNECTIONS"} <= kinds
    assert len(TRACE_MESSAGES) > 300


@pytest.mark.parametrize("event", TRACE_MESSAGES, ids=[_trace_id(e) for e in TRACE_MESSAGES])
def test_trace_message(event: Dict[str, Any]) -> None:
    header = bytes.fromhex(event["header_hex"])
    if "payload_hex" in event:
        payload = bytes.fromhex(event["payload_hex"])
    else:
        # Large DATA payloads are recorded by length, head and digest; stand in
        # a payload with the recorded head (the header is what is checked).
        payload = bytes.fromhex(event["payload_head_hex"])
        payload += b"\0" * (event["payload_len"] - len(payload))
    assert len(payload) == event["payload_len"]

    # Re-encode from the recorded fields.
    encoded = encode_message(event["id"], event["conn_id"], event["type"], payload)
    assert encoded == header + payload
    if event["type"] == MessageType.DATA:
        assert encode_data_header(event["id"], event["conn_id"]) == header

    # Decode the recorded bytes to the recorded fields.
    message = decode_message(header + payload)
    assert message.message_id == event["id"]
    assert message.conn_id == event["conn_id"]
    assert message.type == event["type"]
    assert message.type_name == event["type_name"]
    if "deadline" in event:
        assert event["deadline"] == LEGACY_DEADLINE_MS
        # The deadline is the varint right after the type.
        offset = 0
        for _ in range(3):
            _, offset = decode_varint(header, offset)
        assert decode_varint(header, offset) == (LEGACY_DEADLINE_MS, len(header))
    assert bytes(message.payload) == payload
    if "payload_sha256" in event and "payload_hex" in event:
        assert hashlib.sha256(payload).hexdigest() == event["payload_sha256"]
    if "payload_text" in event:
        assert message.text == event["payload_text"]
        if event["type"] == MessageType.CONNECT:
            proto, address = event["payload_text"].split("/", 1)
            assert (message.proto, message.address) == (proto, address)
        if event["type"] == MessageType.ERROR:
            assert message.is_eof == (event["payload_text"] == "EOF")
    if "sync_ids" in event:
        assert decode_sync_payload(message.payload) == event["sync_ids"]
        assert encode_sync_payload(event["sync_ids"]) == payload


def test_trace_message_ids_are_consecutive_per_side() -> None:
    """Each Go process numbers its messages with one counter, +1 per message."""
    for direction in ("s2c", "c2s"):
        ids = [e["id"] for e in TRACE_MESSAGES if e["dir"] == direction]
        assert ids == sorted(ids)
        gaps = {b - a for a, b in zip(ids, ids[1:])}
        assert min(gaps) >= 1
