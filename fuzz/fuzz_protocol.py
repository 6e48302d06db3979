"""Atheris fuzz target for the sans-IO codec in ``remotedialer.protocol``.

Run it (needs the ``fuzz`` extra: ``pip install -e '.[fuzz]'``)::

    python fuzz/fuzz_protocol.py -runs=200000
    python fuzz/fuzz_protocol.py -max_total_time=600 corpus_dir/

Every input is fed to the message decoder, the varint decoder, the
SYNC_CONNECTIONS payload decoder and the ADD/REMOVE_CLIENT address splitter.
The only exception any of them may raise is
:class:`remotedialer.errors.ProtocolError`; anything else, or a broken
invariant (an ``AssertionError``), is a crash that atheris reports with the
input that caused it.

The invariants are in :func:`check_input`, which imports nothing from atheris:
the hypothesis tests in ``tests/core/test_fuzz_protocol.py`` run the same checks.
"""

from __future__ import annotations

import sys
from typing import List, Optional

try:
    import atheris
except ImportError:  # the checks stay importable without atheris
    atheris = None

if atheris is not None and __name__ == "__main__":
    # Instrument the codec so libFuzzer sees its branches.
    with atheris.instrument_imports(include=["remotedialer"]):
        from remotedialer import errors, protocol
else:
    from remotedialer import errors, protocol

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

_LIMITS = {
    protocol.MessageType.CONNECT: protocol.MAX_CONNECT_PAYLOAD,
    protocol.MessageType.ERROR: protocol.MAX_ERROR_PAYLOAD,
    protocol.MessageType.ADD_CLIENT: protocol.MAX_CLIENT_PAYLOAD,
    protocol.MessageType.REMOVE_CLIENT: protocol.MAX_CLIENT_PAYLOAD,
}


def _in_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


def check_message(data: bytes) -> Optional[protocol.Message]:
    """Decode ``data`` as one message and check every invariant of the result.

    Returns the decoded message, or ``None`` when the codec rejected the input
    with :class:`ProtocolError`. Any other exception propagates.
    """
    try:
        message = protocol.decode_message(data)
    except errors.ProtocolError:
        return None
    assert _in_int64(message.message_id) and _in_int64(message.conn_id) and _in_int64(message.type)
    payload = bytes(message.payload)
    limit = _LIMITS.get(message.type)  # type: ignore[call-overload]
    if message.type == protocol.MessageType.DATA:
        # DATA keeps the whole rest of the message, untouched.
        assert data.endswith(payload) and len(payload) <= len(data)
    elif limit is not None:
        assert len(payload) <= limit, (message.type, len(payload))
    else:
        assert data.endswith(payload)
    if message.type == protocol.MessageType.CONNECT:
        assert b"/" in payload
        assert f"{message.proto}/{message.address}" == message.text
    # The accessors never raise on anything the decoder accepted.
    repr(message)
    assert message.type_name
    assert isinstance(message.text, str)
    assert message.is_eof == (message.type == protocol.MessageType.ERROR and payload == b"EOF")
    if message.type in (protocol.MessageType.ADD_CLIENT, protocol.MessageType.REMOVE_CLIENT):
        parsed = protocol.split_client_address(message.address)
        assert parsed is None or (isinstance(parsed[0], str) and _in_int64(parsed[1]))
    # Re-encoding is a fixpoint: it decodes to the same fields, and encoding
    # those again gives the same bytes (the input itself may differ: varints
    # need not be minimal on the wire and the legacy deadline is normalised).
    encoded = protocol.encode_message(message.message_id, message.conn_id, message.type, payload)
    again = protocol.decode_message(encoded)
    assert (again.message_id, again.conn_id, again.type) == (
        message.message_id,
        message.conn_id,
        message.type,
    )
    assert bytes(again.payload) == payload
    assert protocol.encode_message(again.message_id, again.conn_id, again.type, again.payload) == encoded
    assert len(encoded) <= len(data) + 2  # only the deadline may grow (1 byte -> 3 bytes)
    if message.type == protocol.MessageType.DATA:
        header = protocol.encode_data_header(message.message_id, message.conn_id)
        assert encoded == header + payload
    return message


def check_varint(data: bytes) -> None:
    """Decode one varint; a value must re-encode minimally and decode back."""
    try:
        value, end = protocol.decode_varint(data)
    except errors.ProtocolError:
        return
    assert _in_int64(value)
    assert 1 <= end <= min(len(data), 10)
    encoded = protocol.encode_varint(value)
    assert len(encoded) <= end
    assert protocol.decode_varint(encoded) == (value, len(encoded))


def check_sync(data: bytes) -> None:
    """Decode a SYNC_CONNECTIONS payload: an error exactly when the length is
    not a multiple of 8, otherwise ids that encode back to the same bytes."""
    try:
        ids: List[int] = protocol.decode_sync_payload(data)
    except errors.ProtocolError:
        assert len(data) % 8
        return
    assert len(data) % 8 == 0 and len(ids) == len(data) // 8
    assert all(_in_int64(conn_id) for conn_id in ids)
    assert protocol.encode_sync_payload(ids) == data


def check_input(data: bytes) -> None:
    """Every check on one input (the fuzz target's body)."""
    check_message(data)
    check_varint(data)
    check_sync(data)
    protocol.split_client_address(data.decode("utf-8", "replace"))


def seed_inputs() -> List[bytes]:
    """A few well-formed messages of every type, to start a corpus from."""
    seeds = []
    payloads = {
        protocol.MessageType.DATA: b"hello",
        protocol.MessageType.CONNECT: b"tcp/127.0.0.1:8125",
        protocol.MessageType.ERROR: b"EOF",
        protocol.MessageType.ADD_CLIENT: b"client/12345",
        protocol.MessageType.REMOVE_CLIENT: b"client/12345",
        protocol.MessageType.PAUSE: b"",
        protocol.MessageType.RESUME: b"",
        protocol.MessageType.SYNC_CONNECTIONS: protocol.encode_sync_payload([2, 3, 1 << 40]),
    }
    for message_type, payload in payloads.items():
        seeds.append(protocol.encode_message(1 << 62, 2, message_type, payload))
    return seeds


def _test_one_input(data: bytes) -> None:
    check_input(data)


def main(argv: List[str]) -> None:
    """Run libFuzzer over :func:`check_input` with libFuzzer's ``argv``."""
    if atheris is None:
        raise SystemExit("atheris is not installed: pip install -e '.[fuzz]'")
    for seed in seed_inputs():  # the seeds must pass before fuzzing starts
        check_input(seed)
    atheris.Setup(argv, _test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
