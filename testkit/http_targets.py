"""HTTP(S) targets on loopback for the HTTP client integrations' tests, and
the tunnel those tests reach them through: a keep-alive server (optionally
TLS, with a test CA) with a handful of endpoints (``/hello``, ``/host``,
``/chunked``, ``/close``, ``/download``, ``/slow``, ``/peer-cert``, and
``POST`` answering the body's length and SHA-256), and a session pair whose
agent side dials them. The fixtures built on these are in
``tests/integrations/conftest.py``."""

from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import threading
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import trustme

from remotedialer.connection import TunnelConnection
from remotedialer.piping import LocalDialer

from .support import TIMEOUT, SessionPair

__all__ = ["BLOCK", "pattern", "Handler", "LoopbackServer", "tls_context", "Tunnel"]

BLOCK = bytes(range(256)) * 4096  # 1 MiB


def pattern(size: int) -> bytes:
    """``size`` bytes of a fixed pattern (the 1 MiB :data:`BLOCK` repeated)."""
    blocks, rest = divmod(size, len(BLOCK))
    return BLOCK * blocks + BLOCK[:rest]


# ------------------------------------------------------------------ the server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT  # no handler thread outlives a stuck test for long
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: "LoopbackServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def _reply(self, body: bytes, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Connection" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append((url.path, self.client_address))
        if url.path == "/hello":
            self._reply(f"hello {self.client_address[1]}".encode())
        elif url.path == "/host":
            self._reply(self.headers.get("Host", "").encode())
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"alpha-", b"beta-" * 1000, b"gamma"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/close":
            # No length: the body ends when the server closes the connection.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close " * 5000)
            self.close_connection = True
        elif url.path == "/download":
            size = int(query["size"])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = 0
            while sent < size:
                chunk = BLOCK[: min(len(BLOCK), size - sent)]
                self.wfile.write(chunk)
                sent += len(chunk)
        elif url.path == "/slow":
            self.server.release.wait(TIMEOUT)
            self._reply(b"late")
        elif url.path == "/peer-cert":
            cert = self.connection.getpeercert()  # type: ignore[attr-defined]
            subject = dict(item[0] for item in cert["subject"]) if cert else {}
            self._reply(repr(sorted(subject.items())).encode())
        else:
            self._reply(b"not found", 404)

    def do_POST(self) -> None:
        body = self._read_body()
        self.server.requests.append((self.path, self.client_address))
        self._reply(f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())


class LoopbackServer(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 keep-alive server on 127.0.0.1 port 0, optionally TLS (the
    handshake runs on the handler thread, so a failing client cannot stall
    the accept loop)."""

    daemon_threads = True

    def __init__(self, tls: Optional[ssl.SSLContext] = None) -> None:
        self.tls = tls
        self.requests: List[Tuple[str, Any]] = []
        self.connections: List[socket.socket] = []
        self.errors: List[BaseException] = []
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def get_request(self) -> Tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def track(self, sock: socket.socket) -> None:
        self.connections.append(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        self.errors.append(sys.exc_info()[1])  # type: ignore[arg-type]

    def drop_idle_connections(self) -> None:
        """Close every accepted connection from the server side, unannounced."""
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self.drop_idle_connections()
        self.thread.join(TIMEOUT)


def tls_context(ca: trustme.CA, require_client_cert: bool = False) -> ssl.SSLContext:
    """A server TLS context with a certificate for ``localhost`` from ``ca``
    (and, if asked, wanting a client certificate ``ca`` signed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Tunnel:
    """A session pair whose client side dials local targets, and a dial
    function on the server side that counts its calls."""

    def __init__(self) -> None:
        self.local = LocalDialer(lambda proto, address: True)
        self.pair = SessionPair(connect_handler=self.local)
        self.dialed: List[Tuple[str, str, Optional[float]]] = []

    def dial(self, proto: str, address: str, timeout: Optional[float]) -> TunnelConnection:
        self.dialed.append((proto, address, timeout))
        return self.pair.server.dial(proto, address, timeout)

    def idle(self) -> bool:
        """No tunneled connection is left on either side."""
        return not self.pair.server.connections() and not self.pair.client.connections()

    def close(self) -> None:
        self.pair.close()
        self.local.shutdown()
