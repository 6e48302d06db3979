"""Tests of remotedialer.masking against websocket-client's reference masker."""

from __future__ import annotations

import os

import pytest
import websocket

from remotedialer import masking


def reference(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


SIZES = [0, 1, 3, 4, 5, 125, 126, 511, 512, 513, 1023, 4096, 65535, 65536, 70001]


@pytest.fixture(params=["numpy", "wsaccel", "python"])
def implementation(request, monkeypatch):
    if request.param == "numpy":
        if not masking._load_numpy():
            pytest.skip("numpy not installed")
    else:
        monkeypatch.setattr(masking, "_numpy", False)
        if request.param == "wsaccel":
            if masking._accel is None:
                pytest.skip("wsaccel not installed")
        else:
            monkeypatch.setattr(masking, "_accel", None)
    return request.param


@pytest.mark.parametrize("size", SIZES)
def test_mask_matches_reference(implementation, size):
    data, key = os.urandom(size), os.urandom(4)
    assert masking.mask(data, key) == reference(data, key)
    assert masking.mask(masking.mask(data, key), key) == data


@pytest.mark.parametrize("start", [0, 1, 2, 3, 6, 10, 14])
@pytest.mark.parametrize("size", [5, 600, 4099])
def test_mask_in_place_at_unaligned_offset(implementation, start, size):
    prefix, data, key = os.urandom(start), os.urandom(size), os.urandom(4)
    buffer = bytearray(prefix + data)
    masking.mask_in_place(buffer, key, start)
    assert bytes(buffer[:start]) == prefix
    assert bytes(buffer[start:]) == reference(data, key)
    buffer.extend(b"x")  # the numpy view was released: the buffer can grow again


@pytest.mark.parametrize("size", [0, 10, 125, 126, 65535, 65536, 100000])
def test_encode_masked_frame_decodes_with_websocket_client(implementation, size):
    payload, key = os.urandom(size), b"\x01\x02\x03\x04"
    frame = bytes(masking.encode_masked_frame(websocket.ABNF.OPCODE_BINARY, payload, key))
    expected = websocket.ABNF(1, 0, 0, 0, websocket.ABNF.OPCODE_BINARY, 1, payload)
    expected.get_mask_key = lambda _n: key
    assert frame == expected.format()


def test_implementation_name():
    assert masking.implementation() in ("numpy", "wsaccel", "python")
