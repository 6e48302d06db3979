"""A WebSocket client written by hand, to talk to the server byte by byte:
frames as a client sends them (masked, or not when a test wants it wrong),
reading the server's frames, and the upgrade request's headers."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import struct
from typing import Dict, Optional, Tuple

from remotedialer import frames

from .support import TIMEOUT

__all__ = ["client_frame", "read_server_frame", "upgrade_headers", "raw_get"]


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0,
                 mask: Optional[bytes] = None, masked: bool = True) -> bytes:
    """A frame as a client sends it (masked unless told otherwise)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return header + payload
    mask = mask if mask is not None else os.urandom(4)
    if n < 4096:  # independent of the code under test
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + frames.mask(payload, mask)


def read_server_frame(sock: socket.socket) -> Tuple[int, bytes]:
    """Read one (unmasked) server frame from ``sock``: ``(opcode, payload)``."""
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError("closed while reading a frame")
            data += chunk
        return data

    first, second = exact(2)
    assert not second & 0x80, "server frames must not be masked"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", exact(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", exact(8))
    assert first & 0x80, "expected FIN"
    return first & 0x0F, exact(length)


def upgrade_headers(**extra: str) -> Dict[str, str]:
    """The headers of a WebSocket upgrade request (a fresh key), plus ``extra``."""
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    headers.update(extra)
    return headers


def raw_get(port: int, headers: Dict[str, str]) -> Tuple[int, bytes, http.client.HTTPResponse]:
    """``GET /connect`` on ``127.0.0.1:port`` with ``headers``: the status,
    the body and the response (the connection is closed)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("GET", "/connect", headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body, response
