"""A forward proxy on loopback for the agent's way out: HTTP ``CONNECT`` and
SOCKS5 on one port (told apart by the first byte), with real sockets.

It may require credentials (``Proxy-Authorization: Basic`` for HTTP, the
username/password method for SOCKS5), may refuse every request (HTTP 403,
SOCKS5 reply 0x02), and only ever connects to loopback: a target name is
looked up in ``names`` (a stand-in for the proxy's own DNS, so a test can
reach a name the agent itself cannot resolve) and must end on 127.0.0.1 or
::1. With ``tls`` it is an ``https://`` proxy (HTTP CONNECT inside TLS).
Each accepted tunnel is recorded in :attr:`ConnectProxy.tunnels`.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import struct
import threading
from typing import Dict, List, Mapping, Optional, Tuple

from .support import recv_exactly

__all__ = ["ConnectProxy"]

HEAD_LIMIT = 16 * 1024
TIMEOUT = 10.0


class _Refused(Exception):
    """The proxy answers no to a request (status for HTTP, reply code for SOCKS5)."""

    def __init__(self, status: int, reason: str, socks_reply: int) -> None:
        super().__init__(reason)
        self.status, self.reason, self.socks_reply = status, reason, socks_reply


class ConnectProxy:
    """Serve on ``127.0.0.1:<port>`` until :meth:`stop` (or the ``with`` block ends)."""

    def __init__(
        self,
        credentials: Optional[Tuple[str, str]] = None,
        refuse: bool = False,
        names: Optional[Mapping[str, str]] = None,
        tls: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.credentials = credentials
        self.refuse = refuse
        self.tls = tls  # an https:// proxy (HTTP CONNECT only) when set
        self.names = {name.lower(): address for name, address in (names or {}).items()}
        self.tunnels: List[str] = []  # "host:port" of each tunnel opened, as asked for
        self.refusals: List[str] = []  # why each refused request was refused
        self.changed = threading.Condition()  # notified when tunnels or refusals change
        self._lock = threading.Lock()  # guards _sockets and _closed
        self._sockets: List[socket.socket] = []
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="connect-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def wait(self, tunnels: int = 0, refusals: int = 0, timeout: float = TIMEOUT) -> None:
        """Block until at least that many tunnels and refusals were seen."""
        with self.changed:
            if not self.changed.wait_for(
                lambda: len(self.tunnels) >= tunnels and len(self.refusals) >= refusals, timeout
            ):
                raise AssertionError(f"proxy saw {self.tunnels} / {self.refusals} within {timeout}s")

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        _close(self._listener)  # shutdown wakes the accept loop; close alone does not
        for sock in sockets:
            _close(sock)
        self._thread.join(TIMEOUT)

    def __enter__(self) -> "ConnectProxy":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ plumbing
    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._sockets.append(sock)
            return True

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._track(client):
                client.close()
                return
            threading.Thread(target=self._serve, args=(client,), name="connect-proxy-conn",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(TIMEOUT)
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
                self._track(client)
            first = b"C" if self.tls is not None else client.recv(1, socket.MSG_PEEK)
            if first == b"\x05":
                upstream = self._serve_socks(client)
            elif first:
                upstream = self._serve_http(client)
            else:
                upstream = None
        except (OSError, AssertionError):  # a client gone mid-request (recv_exactly asserts)
            upstream = None
        if upstream is None:
            _close(client)
            return
        client.settimeout(None)
        upstream.settimeout(None)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def _record(self, target: str, refusal: Optional[str] = None) -> None:
        with self.changed:
            (self.refusals if refusal is not None else self.tunnels).append(refusal or target)
            self.changed.notify_all()

    def _open(self, host: str, port: int, authorized: bool) -> socket.socket:
        """The upstream connection, or :class:`_Refused`."""
        target = f"{host}:{port}"
        if not authorized:
            self._record(target, f"credentials for {target}")
            raise _Refused(407, "Proxy Authentication Required", 0x02)
        if self.refuse:
            self._record(target, f"policy for {target}")
            raise _Refused(403, "Forbidden", 0x02)
        address = self.names.get(host.lower(), host)
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            self._record(target, f"not loopback: {target}")
            raise _Refused(403, "Forbidden", 0x02)
        try:
            upstream = socket.create_connection((address, port), TIMEOUT)
        except OSError:
            self._record(target, f"unreachable: {target}")
            raise _Refused(502, "Bad Gateway", 0x05) from None
        if not self._track(upstream):
            upstream.close()
            raise _Refused(503, "Service Unavailable", 0x01)
        self._record(target)
        return upstream

    def _serve_http(self, client: socket.socket) -> Optional[socket.socket]:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk or len(head) > HEAD_LIMIT:
                return None
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        authority = rest.rpartition(" ")[0]
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return None
        host, _, port = authority.rpartition(":")
        try:
            upstream = self._open(host.strip("[]"), int(port), self._authorized_http(headers))
        except (_Refused, ValueError) as exc:
            status, reason = (exc.status, exc.reason) if isinstance(exc, _Refused) else (400, "Bad Request")
            extra = 'Proxy-Authenticate: Basic realm="testkit"\r\n' if status == 407 else ""
            client.sendall(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\n\r\n".encode())
            return None
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return upstream

    def _authorized_http(self, headers: Mapping[str, str]) -> bool:
        if self.credentials is None:
            return True
        scheme, _, token = headers.get("proxy-authorization", "").partition(" ")
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return scheme.lower() == "basic" and token == expected

    def _serve_socks(self, client: socket.socket) -> Optional[socket.socket]:
        _version, count = recv_exactly(client, 2)
        methods = recv_exactly(client, count)
        wanted = 0x02 if self.credentials is not None else 0x00
        if wanted not in methods:
            client.sendall(b"\x05\xff")
            return None
        client.sendall(bytes([5, wanted]))
        authorized = True
        if wanted == 0x02:
            _sub_version, size = recv_exactly(client, 2)
            user = recv_exactly(client, size).decode()
            password = recv_exactly(client, recv_exactly(client, 1)[0]).decode()
            authorized = (user, password) == self.credentials
            client.sendall(b"\x01\x00" if authorized else b"\x01\x01")
            if not authorized:
                self._record("", "socks credentials")
                return None
        _version, command, _reserved, kind = recv_exactly(client, 4)
        if kind == 0x01:
            host = socket.inet_ntop(socket.AF_INET, recv_exactly(client, 4))
        elif kind == 0x04:
            host = socket.inet_ntop(socket.AF_INET6, recv_exactly(client, 16))
        else:
            host = recv_exactly(client, recv_exactly(client, 1)[0]).decode()
        port = struct.unpack("!H", recv_exactly(client, 2))[0]
        try:
            if command != 0x01:
                raise _Refused(405, "not CONNECT", 0x07)
            upstream = self._open(host, port, authorized)
        except _Refused as exc:
            client.sendall(bytes([5, exc.socks_reply, 0, 1, 0, 0, 0, 0, 0, 0]))
            return None
        client.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port))
        return upstream


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until EOF, then pass the EOF on (half-close)."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        _close(sink)
        _close(source)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
