"""Property tests and fuzzing of the sans-IO codec (remotedialer.protocol).

The default run uses modest example counts; ``-m slow`` runs the same
properties with many more examples and the atheris target in ``fuzz/``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from remotedialer import protocol
from remotedialer.errors import ProtocolError
from remotedialer.protocol import (
    LEGACY_DEADLINE_MS,
    MAX_CLIENT_PAYLOAD,
    MAX_CONNECT_PAYLOAD,
    MAX_ERROR_PAYLOAD,
    MessageType,
    decode_message,
    decode_sync_payload,
    decode_varint,
    encode_message,
    encode_sync_payload,
    encode_varint,
)

ROOT = Path(__file__).resolve().parents[2]
FUZZ_TARGET = ROOT / "fuzz" / "fuzz_protocol.py"

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def _load_fuzz_target() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", FUZZ_TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz_target = _load_fuzz_target()

# The default run draws the same examples every time (a CI run must not
# fail on a draw no one can replay); the `slow` runs explore afresh, and
# what they find becomes an explicit test.
FAST = settings(
    derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)

int64s = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
# Integers near the edges of every varint length (7 bits a byte after zig-zag).
edge_int64s = st.one_of(
    int64s,
    st.sampled_from(
        sorted(
            {
                v
                for k in range(0, 64)
                for base in (1 << k, -(1 << k))
                for v in (base - 1, base, base + 1)
                if INT64_MIN <= v <= INT64_MAX
            }
            | {INT64_MIN, INT64_MAX, 0}
        )
    ),
)


# ------------------------------------------------------------------ reference
def reference_encode_varint(value: int) -> bytes:
    """Go's PutVarint, written out independently: zig-zag then LEB128."""
    unsigned = (value << 1) if value >= 0 else ((-value) << 1) - 1
    out = bytearray()
    while True:
        byte = unsigned & 0x7F
        unsigned >>= 7
        if unsigned:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def reference_read_varint(data: bytes) -> Tuple[str, int, int]:
    """Go's ReadUvarint + zig-zag decode: ("ok", value, length) or ("error", 0, 0)."""
    result = 0
    for index, byte in enumerate(data[:10]):
        if index == 9 and byte > 1:
            return ("error", 0, 0)  # overflow
        result |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            value = (result >> 1) if not result & 1 else -((result >> 1) + 1)
            return ("ok", value, index + 1)
    return ("error", 0, 0)  # ran out of bytes (EOF) or 10 continuation bytes


def payload_for(message_type: int) -> st.SearchStrategy[bytes]:
    """Payloads that survive a round trip unchanged for ``message_type``."""
    if message_type == MessageType.CONNECT:
        text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=120)
        return st.builds(lambda p, a: f"{p}/{a}".encode(), text, text)
    if message_type == MessageType.ERROR:
        return st.binary(max_size=MAX_ERROR_PAYLOAD)
    if message_type in (MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT):
        return st.binary(max_size=MAX_CLIENT_PAYLOAD)
    if message_type == MessageType.SYNC_CONNECTIONS:
        return st.lists(int64s, max_size=40).map(encode_sync_payload)
    return st.binary(max_size=4096)


messages = st.sampled_from(list(MessageType)).flatmap(
    lambda t: st.tuples(int64s, int64s, st.just(int(t)), payload_for(t))
)


def header_prefixed_bytes() -> st.SearchStrategy[bytes]:
    """A plausible header (often a known type) followed by arbitrary bytes:
    reaches deeper into the decoder than uniformly random bytes."""
    types = st.one_of(st.sampled_from([int(t) for t in MessageType]), edge_int64s)
    return st.builds(
        lambda i, c, t, rest: encode_varint(i) + encode_varint(c) + encode_varint(t) + rest,
        edge_int64s,
        edge_int64s,
        types,
        st.binary(max_size=400),
    )


# ------------------------------------------------------------------- checks
def check_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert encoded == reference_encode_varint(value)
    assert 1 <= len(encoded) <= 10
    assert decode_varint(encoded) == (value, len(encoded))
    assert decode_varint(b"\x7f" + encoded + b"\xff\xff", 1) == (value, 1 + len(encoded))


def check_varint_matches_reference(data: bytes) -> None:
    expected = reference_read_varint(data)
    try:
        value, end = decode_varint(data)
    except ProtocolError:
        assert expected[0] == "error", (data.hex(), expected)
        return
    assert expected == ("ok", value, end), data.hex()


def check_message_round_trip(fields: Tuple[int, int, int, bytes]) -> None:
    message_id, conn_id, message_type, payload = fields
    data = encode_message(message_id, conn_id, message_type, payload)
    message = decode_message(data)
    assert (message.message_id, message.conn_id, message.type) == (message_id, conn_id, message_type)
    assert bytes(message.payload) == payload
    if message_type in (MessageType.DATA, MessageType.CONNECT):
        # The legacy deadline sits between the type and the payload, always 15000.
        header = encode_varint(message_id) + encode_varint(conn_id) + encode_varint(message_type)
        assert data.startswith(header + encode_varint(LEGACY_DEADLINE_MS))
    if message_type == MessageType.SYNC_CONNECTIONS:
        assert encode_sync_payload(decode_sync_payload(message.payload)) == payload
    fuzz_target.check_message(data)


def check_decode_arbitrary(data: bytes) -> None:
    """The fuzz target's whole body: only ProtocolError, invariants hold."""
    fuzz_target.check_input(data)


def run_property(strategy: st.SearchStrategy[Any], check: Callable[[Any], None], examples: int) -> None:
    """Run ``check`` over ``examples`` inputs drawn from ``strategy``."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def run(value: Any) -> None:
        check(value)

    run()


# ------------------------------------------------------------------- varints
@pytest.mark.parametrize(
    "value, hex_bytes",
    [(0, "00"), (1, "02"), (-1, "01"), (2, "04"), (15000, "b0ea01"), (63, "7e"), (-64, "7f"),
     (64, "8001"), (INT64_MAX, "feffffffffffffffff01"), (INT64_MIN, "ffffffffffffffffff01")],
)
def test_varint_known_encodings(value: int, hex_bytes: str) -> None:
    assert encode_varint(value).hex() == hex_bytes
    assert decode_varint(bytes.fromhex(hex_bytes)) == (value, len(hex_bytes) // 2)


@FAST
@given(edge_int64s)
@example(INT64_MIN)
@example(INT64_MAX)
def test_varint_round_trip_full_int64_range(value: int) -> None:
    check_varint_round_trip(value)


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 1 << 64, -(1 << 70)])
def test_varint_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@FAST
@given(st.binary(max_size=14))
@example(b"")
@example(b"\x80")
@example(b"\xff" * 9 + b"\x01")
@example(b"\xff" * 9 + b"\x02")
@example(b"\x80" * 10)
@example(b"\x80" * 9 + b"\x00")
def test_varint_decoder_matches_go_semantics(data: bytes) -> None:
    check_varint_matches_reference(data)


def test_varint_errors_are_protocol_errors() -> None:
    for data, text in [(b"", "EOF"), (b"\x80", "unexpected EOF"), (b"\xff" * 10 + b"\x01", "overflow")]:
        with pytest.raises(ProtocolError, match=text):
            decode_varint(data)


# ------------------------------------------------------------------ messages
@FAST
@given(messages)
@example((INT64_MIN, INT64_MAX, int(MessageType.DATA), b""))
@example((0, 0, int(MessageType.CONNECT), b"/"))
@example((-1, -1, int(MessageType.SYNC_CONNECTIONS), b""))
def test_message_round_trip_every_type(fields: Tuple[int, int, int, bytes]) -> None:
    check_message_round_trip(fields)


@FAST
@given(int64s, int64s, edge_int64s.filter(lambda t: t not in set(MessageType)), st.binary(max_size=512))
def test_unknown_types_round_trip_without_deadline(
    message_id: int, conn_id: int, message_type: int, payload: bytes
) -> None:
    data = encode_message(message_id, conn_id, message_type, payload)
    assert data == encode_varint(message_id) + encode_varint(conn_id) + encode_varint(message_type) + payload
    message = decode_message(data)
    assert message.type == message_type and bytes(message.payload) == payload
    assert message.type_name == f"UNKNOWN({message_type})"


LIMITED = [
    (MessageType.CONNECT, MAX_CONNECT_PAYLOAD),
    (MessageType.ERROR, MAX_ERROR_PAYLOAD),
    (MessageType.ADD_CLIENT, MAX_CLIENT_PAYLOAD),
    (MessageType.REMOVE_CLIENT, MAX_CLIENT_PAYLOAD),
]


@pytest.mark.parametrize("message_type, limit", LIMITED)
@FAST
@given(payload=st.binary(min_size=0, max_size=2000), conn_id=int64s)
def test_truncation_limits(message_type: int, limit: int, payload: bytes, conn_id: int) -> None:
    if message_type == MessageType.CONNECT:
        payload = b"tcp/" + payload
    data = encode_message(7, conn_id, message_type, payload)
    message = decode_message(data)
    assert bytes(message.payload) == payload[:limit]
    assert len(message.payload) <= limit


def test_truncation_limit_values_match_protocol() -> None:
    assert (MAX_CONNECT_PAYLOAD, MAX_ERROR_PAYLOAD, MAX_CLIENT_PAYLOAD) == (266, 100, 100)


@FAST
@given(st.binary(max_size=1000).filter(lambda b: b"/" not in b[:MAX_CONNECT_PAYLOAD]))
def test_connect_without_slash_within_limit_is_protocol_error(payload: bytes) -> None:
    data = encode_message(1, 2, MessageType.CONNECT, payload)
    with pytest.raises(ProtocolError):
        decode_message(data)


def test_connect_slash_after_the_limit_does_not_count() -> None:
    payload = b"x" * MAX_CONNECT_PAYLOAD + b"/tail"
    with pytest.raises(ProtocolError):
        decode_message(encode_message(1, 2, MessageType.CONNECT, payload))


@FAST
@given(messages, st.integers(min_value=0, max_value=50))
def test_truncated_header_is_protocol_error(fields: Tuple[int, int, int, bytes], cut: int) -> None:
    message_id, conn_id, message_type, _ = fields
    header = encode_varint(message_id) + encode_varint(conn_id) + encode_varint(message_type)
    if message_type in (MessageType.DATA, MessageType.CONNECT):
        header += encode_varint(LEGACY_DEADLINE_MS)
    truncated = header[: min(cut, len(header) - 1)]
    with pytest.raises(ProtocolError):
        decode_message(truncated)


# ---------------------------------------------------- arbitrary bytes (fuzz)
@FAST
@given(st.binary(max_size=600))
@example(b"")
@example(bytes.fromhex("ffffffffffffffffffff010202"))
@example(bytes.fromhex("020404b0ea017463703132372e302e302e313a3830"))
def test_decode_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    check_decode_arbitrary(data)


@FAST
@given(header_prefixed_bytes())
def test_decode_header_plus_garbage_raises_only_protocol_error(data: bytes) -> None:
    check_decode_arbitrary(data)


def test_fuzz_seeds_pass_the_checks() -> None:
    seeds = fuzz_target.seed_inputs()
    assert len(seeds) == len(MessageType)
    for seed in seeds:
        assert fuzz_target.check_message(seed) is not None


def test_fuzz_checks_can_fail() -> None:
    """The invariant checks are not vacuous: a decoder that returns a wrong
    payload is caught."""
    original = protocol.decode_message

    def broken(data: Any) -> protocol.Message:
        message = original(data)
        return protocol.Message(message.message_id, message.conn_id, message.type, b"X" * 300)

    protocol.decode_message = broken  # type: ignore[assignment]
    try:
        with pytest.raises(AssertionError):
            fuzz_target.check_message(encode_message(1, 2, MessageType.ERROR, b"boom"))
    finally:
        protocol.decode_message = original  # type: ignore[assignment]


# ---------------------------------------------------------------- sync/addr
@FAST
@given(st.lists(int64s, max_size=64))
def test_sync_payload_round_trip(ids: List[int]) -> None:
    payload = encode_sync_payload(ids)
    assert len(payload) == 8 * len(ids)
    assert decode_sync_payload(payload) == ids


@FAST
@given(st.binary(max_size=100))
def test_sync_payload_bad_length_is_protocol_error(data: bytes) -> None:
    fuzz_target.check_sync(data)


def reference_atoi(text: str) -> Any:
    """Go's strconv.Atoi on a 64-bit platform: optional sign, ASCII digits, int64 range."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body or any(c not in "0123456789" for c in body):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


client_addresses = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda k, n: f"{k}/{n}", st.text(max_size=20), st.integers(min_value=-(1 << 70), max_value=1 << 70)
    ),
    st.builds(
        lambda k, s: f"{k}/{s}",
        st.text(max_size=20),
        st.sampled_from(["+1", "-0", " 1", "1_0", "\u0661", "+", ""]),
    ),
)


@FAST
@given(client_addresses)
@example("k/9223372036854775808")
@example("k/-9223372036854775808")
@example("k/" + "9" * 96)
def test_split_client_address_matches_go_atoi(text: str) -> None:
    parsed = protocol.split_client_address(text)
    client_key, slash, session_key = text.rpartition("/")
    expected = reference_atoi(session_key) if slash else None
    if expected is None:
        assert parsed is None
    else:
        assert parsed == (client_key, expected)


# ---------------------------------------------------------------------- slow
SLOW_EXAMPLES = int(os.environ.get("REMOTEDIALER_FUZZ_EXAMPLES", "20000"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_properties_many_examples() -> None:
    """The same properties with many more examples."""
    run_property(edge_int64s, check_varint_round_trip, SLOW_EXAMPLES)
    run_property(st.binary(max_size=14), check_varint_matches_reference, SLOW_EXAMPLES)
    run_property(messages, check_message_round_trip, SLOW_EXAMPLES)
    run_property(st.binary(max_size=600), check_decode_arbitrary, SLOW_EXAMPLES)
    run_property(header_prefixed_bytes(), check_decode_arbitrary, SLOW_EXAMPLES)
    print(f"hypothesis: 5 properties x {SLOW_EXAMPLES} examples")


ATHERIS_RUNS = int(os.environ.get("REMOTEDIALER_FUZZ_RUNS", "200000"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_atheris_target_bounded_run(tmp_path: Path) -> None:
    """Run the atheris target for a bounded number of inputs; fails (does not
    skip) when atheris is missing, since ``-m slow`` asked for the fuzz run."""
    if importlib.util.find_spec("atheris") is None:
        pytest.fail("atheris is not installed: pip install -e '.[fuzz]' to run the fuzz target")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(fuzz_target.seed_inputs()):
        (corpus / f"seed-{index}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, str(FUZZ_TARGET), f"-runs={ATHERIS_RUNS}", "-max_len=4096", str(corpus)],
        capture_output=True,
        text=True,
        timeout=1700,
        cwd=str(tmp_path),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert done is not None, output[-4000:]
    runs = int(done.group(1))
    coverage = re.findall(r"cov: (\d+)", output)
    print(
        f"atheris: {runs} inputs ran in {done.group(2)} s, "
        f"coverage {coverage[-1] if coverage else '?'} edges, corpus {len(list(corpus.iterdir()))} files"
    )
    assert runs >= ATHERIS_RUNS
