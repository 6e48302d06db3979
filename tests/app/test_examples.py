"""The example programs' pieces (:mod:`remotedialer.examples`): the file
server behind ``remotedialer dummy`` and the demo's helpers."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
from typing import Any, Iterator

import pytest

from remotedialer.examples.demo import Check, human_size
from remotedialer.examples.file_server import BLOCK_SIZE, DummyServer, generated_bytes, generated_sha256
from testkit.support import TIMEOUT

# ------------------------------------------------------ the dummy server


@pytest.fixture
def dummy(tmp_path: Any) -> Iterator[DummyServer]:
    (tmp_path / "file.bin").write_bytes(os.urandom(300_000))
    (tmp_path / "sub").mkdir()
    server = DummyServer(("127.0.0.1", 0), str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dummy_conn(dummy: DummyServer) -> Iterator[http.client.HTTPConnection]:
    """A keep-alive HTTP connection to the dummy server."""
    conn = http.client.HTTPConnection("127.0.0.1", dummy.port, timeout=TIMEOUT)
    yield conn
    conn.close()


def _get(conn: http.client.HTTPConnection, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn.request(method, path)
    return conn.getresponse()


def _status(conn: http.client.HTTPConnection, path: str) -> int:
    """The status of ``GET path`` (the body is read, so the connection can go on)."""
    response = _get(conn, path)
    response.read()
    return response.status


def test_generated_bytes_are_deterministic() -> None:
    size = BLOCK_SIZE + 12345
    assert hashlib.sha256(generated_bytes(size)).hexdigest() == generated_sha256(size)
    assert generated_bytes(100, seed=1) != generated_bytes(100, seed=0)
    assert generated_sha256(0) == hashlib.sha256(b"").hexdigest()


def test_dummy_serves_files_generated_data_with_keep_alive(
    dummy_conn: http.client.HTTPConnection, tmp_path: Any
) -> None:
    conn = dummy_conn
    response = _get(conn, "/file.bin")
    assert response.status == 200
    assert response.read() == (tmp_path / "file.bin").read_bytes()
    sock = conn.sock
    size = 3 * BLOCK_SIZE + 5
    response = _get(conn, f"/bytes/{size}")
    assert response.getheader("Content-Length") == str(size)
    assert hashlib.sha256(response.read()).hexdigest() == generated_sha256(size)
    response = _get(conn, "/bytes/77?seed=3")
    assert response.read() == generated_bytes(77, seed=3)
    response = _get(conn, "/bytes/10", method="HEAD")
    assert (response.getheader("Content-Length"), response.read()) == ("10", b"")
    response = _get(conn, "/")
    listing = response.read()
    assert b"file.bin" in listing and b"sub/" in listing
    assert conn.sock is sock  # every request went over one kept-alive connection
    assert _status(conn, "/missing") == 404


def test_dummy_answers_a_small_file_in_one_write(dummy: DummyServer, tmp_path: Any) -> None:
    """Head and body of a small file leave together (one segment on loopback),
    a large file still arrives whole (sendfile after the buffered head)."""
    (tmp_path / "small.bin").write_bytes(os.urandom(1024))
    (tmp_path / "large.bin").write_bytes(os.urandom(300_000))
    with socket.create_connection(("127.0.0.1", dummy.port), timeout=TIMEOUT) as sock:
        for _ in range(5):  # a split answer would show in the first recv
            sock.sendall(b"GET /small.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == (tmp_path / "small.bin").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", dummy.port, timeout=TIMEOUT)
    try:
        assert _get(conn, "/large.bin").read() == (tmp_path / "large.bin").read_bytes()
        assert _get(conn, "/small.bin").read() == (tmp_path / "small.bin").read_bytes()
    finally:
        conn.close()


def test_dummy_drip_and_bad_parameters(dummy_conn: http.client.HTTPConnection) -> None:
    assert _get(dummy_conn, "/drip/1000?interval=0.01&chunks=4").read() == generated_bytes(1000)
    assert _status(dummy_conn, "/drip/10?chunks=0") == 400
    assert _status(dummy_conn, "/stall?seconds=-1") == 400


def test_dummy_stall_sends_the_head_at_once(dummy_conn: http.client.HTTPConnection) -> None:
    response = _get(dummy_conn, "/stall?seconds=0.2")
    assert response.status == 200
    assert response.read() == b"finally\n"


# ------------------------------------------------------------------- demo


def test_demo_helpers() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(64 * 1024 * 1024) == "64.0 MiB"
    assert Check("x", True, size=2 << 20, seconds=2.0).rate == 1 << 20
    assert Check("x", True, size=10, seconds=1.0).rate == 0.0
