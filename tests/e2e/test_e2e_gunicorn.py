"""End to end under a real gunicorn (``-k gthread``) subprocess on a free
loopback port, with real tunnel clients and requests."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterator

import pytest
import requests

from remotedialer.client import Backoff, TunnelClient
from remotedialer.errors import HandshakeError
from remotedialer.frames import OP_CLOSE, encode_frame

from testkit.gunicorn import Gunicorn
from testkit.raw_websocket import client_frame, raw_get, upgrade_headers
from testkit.support import TIMEOUT, EchoServer, echo_round_trip, raw_upgrade, recv_until_eof, wait_for

THREADS = 3  # Gunicorn's default: few on purpose, a handler that did not return would starve it


@pytest.fixture(scope="module")
def gunicorn() -> Iterator[Gunicorn]:
    server = Gunicorn()
    yield server
    server.stop()
    assert not server.errors(), "".join(server.lines)


@pytest.fixture
def tunnel_client(gunicorn: Gunicorn) -> Iterator[TunnelClient]:
    client = TunnelClient(
        gunicorn.url, {"X-Tunnel-ID": "foo"}, lambda proto, address: True,
        backoff=Backoff(initial=0.05, maximum=0.2),
    )
    client.start()
    client.wait_connected(TIMEOUT)
    wait_for(lambda: "foo" in gunicorn.clients())
    yield client
    client.stop(TIMEOUT)
    wait_for(lambda: "foo" not in gunicorn.clients())


def test_dial_through_client_under_gunicorn(
    gunicorn: Gunicorn, tunnel_client: TunnelClient, echo_server: EchoServer
) -> None:
    for size in (1, 100_000, 5 << 20):
        body = os.urandom(size)
        response = requests.post(
            f"{gunicorn.base}/echo", params={"key": "foo", "address": echo_server.address},
            data=body, timeout=TIMEOUT * 3,
        )
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()


def test_reverse_dial_under_gunicorn(tunnel_client: TunnelClient, echo_server: EchoServer) -> None:
    session = tunnel_client.session
    assert session is not None
    with session.dial("tcp", echo_server.address, TIMEOUT) as conn:
        echo_round_trip(conn, 3 << 20)


def test_refusals_and_unknown_client_under_gunicorn(gunicorn: Gunicorn, echo_server: EchoServer) -> None:
    assert raw_get(gunicorn.port, upgrade_headers())[:2] == (401, b"failed authentication")
    with pytest.raises(HandshakeError) as info:
        TunnelClient(gunicorn.url, {}).connect_once()
    assert info.value.status == 401
    response = requests.get(f"{gunicorn.base}/connect", headers={"X-Tunnel-ID": "x"}, timeout=TIMEOUT)
    assert response.status_code == 400
    response = requests.post(
        f"{gunicorn.base}/echo", params={"key": "nobody", "address": echo_server.address},
        data=b"x", timeout=TIMEOUT,
    )
    assert response.status_code == 500
    assert "failed to find Session for client nobody" in response.text


def test_no_stray_bytes_and_threads_come_back_under_gunicorn(gunicorn: Gunicorn) -> None:
    close_1000 = encode_frame(OP_CLOSE, struct.pack("!H", 1000))
    # more tunnels one after another than gunicorn has threads: each handler
    # must return, or the later handshakes would starve
    for round_ in range(THREADS + 2):
        sock = raw_upgrade(gunicorn.port, "raw")
        wait_for(lambda: "raw" in gunicorn.clients())
        if round_ % 2:
            sock.sendall(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
        else:  # the server ends it
            requests.get(f"{gunicorn.base}/kick", params={"key": "raw"}, timeout=TIMEOUT)
        # exactly one close frame, then EOF: gunicorn wrote nothing after it
        assert recv_until_eof(sock) == close_1000, f"round {round_}"
        sock.close()
        wait_for(lambda: "raw" not in gunicorn.clients())
    assert gunicorn.clients() == []
    assert not gunicorn.errors(), "".join(gunicorn.lines)


def test_tunnel_over_tls_under_gunicorn(tmp_path: Path, echo_server: EchoServer) -> None:
    """gunicorn with --certfile: the taken-over socket is an SSLSocket."""
    import ssl

    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client_context = ssl.create_default_context(cafile=str(ca_file))
    server = Gunicorn("--certfile", str(pem), "--keyfile", str(pem))
    client = TunnelClient(server.url, {"X-Tunnel-ID": "tls"}, lambda proto, address: True,
                          ssl_context=client_context)
    try:
        client.start()
        session = client.wait_connected(TIMEOUT)
        wait_for(lambda: "tls" in server.clients(verify=str(ca_file)))
        body = os.urandom(3 << 20)
        response = requests.post(
            f"{server.base}/echo", params={"key": "tls", "address": echo_server.address},
            data=body, timeout=TIMEOUT * 3, verify=str(ca_file),
        )
        assert response.status_code == 200 and response.content == body
        with session.dial("tcp", echo_server.address, TIMEOUT) as conn:
            echo_round_trip(conn, 1 << 20)
        client.stop(TIMEOUT)
        wait_for(lambda: "tls" not in server.clients(verify=str(ca_file)))
    finally:
        client.stop(TIMEOUT)
        server.stop()
    assert not server.errors(), "".join(server.lines)
