"""A small threaded HTTP file server for tests and benchmarks (``remotedialer dummy``).

Serves a directory (files with ``sendfile``, directory listings) plus a few
generated resources that need no files on disk:

* ``/bytes/<n>``: ``n`` bytes of deterministic pseudo-random data (see
  :func:`generated_sha256`), optionally ``?seed=S``;
* ``/drip/<n>?interval=SECONDS&chunks=K``: ``n`` bytes sent in ``K`` pieces with
  a pause between them, to exercise idle timeouts with a flowing download;
* ``/stall?seconds=S``: headers at once, then silence for ``S`` seconds, then a
  short body.

HTTP/1.1 with keep-alive, ``TCP_NODELAY`` and large writes, so that it is not
the bottleneck when a benchmark pulls a gigabyte through a tunnel.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import random
import re
import shutil
import socket
import socketserver
import threading
import time
import urllib.parse
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from ..addresses import join_host_port
from ..errors import ListenError

__all__ = ["DummyServer", "generated_bytes", "generated_sha256", "BLOCK_SIZE"]

log = logging.getLogger(__name__)

#: Generated bodies repeat a block of this many pseudo-random bytes.
BLOCK_SIZE = 1 << 20
_WRITE_SIZE = 1 << 20
#: Files up to this size are answered with one write, head and body together.
SMALL_FILE = 64 * 1024
_BYTES_PATH = re.compile(r"^/bytes/(\d+)$")
_DRIP_PATH = re.compile(r"^/drip/(\d+)$")
_MAX_GENERATED = 1 << 40


@lru_cache(maxsize=8)
def _block(seed: int) -> bytes:
    rng = random.Random(seed)
    return rng.getrandbits(BLOCK_SIZE * 8).to_bytes(BLOCK_SIZE, "little")


def generated_bytes(size: int, seed: int = 0) -> bytes:
    """The body of ``/bytes/<size>?seed=<seed>`` (for small sizes in tests)."""
    block = _block(seed)
    whole, rest = divmod(size, BLOCK_SIZE)
    return block * whole + block[:rest]


def generated_sha256(size: int, seed: int = 0) -> str:
    """Hex sha256 of ``/bytes/<size>?seed=<seed>``, computed without building it."""
    block = _block(seed)
    digest = hashlib.sha256()
    whole, rest = divmod(size, BLOCK_SIZE)
    for _ in range(whole):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


def _query_number(query: Dict[str, List[str]], name: str, default: float) -> float:
    values = query.get(name)
    if not values:
        return default
    return float(values[0])


class DummyHandler(http.server.SimpleHTTPRequestHandler):
    """Static files from the server's directory plus the generated resources."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "remotedialer-dummy"
    #: Responses go through a buffer that http.server flushes when the request
    #: is done, so a small answer's head and body leave in one write (as Go's
    #: net/http sends them) instead of two segments a tunnel carries as two
    #: messages. Larger bodies go with ``sendfile`` after a flush.
    wbufsize = SMALL_FILE
    server: "DummyServer"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=self.server_directory(args), **kwargs)

    @staticmethod
    def server_directory(args: Tuple[Any, ...]) -> str:
        server = args[2] if len(args) > 2 else None
        return str(getattr(server, "directory", os.getcwd()))

    # --------------------------------------------------------------- routing
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if not self._generated(head=False):
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if not self._generated(head=True):
            super().do_HEAD()

    def _generated(self, head: bool) -> bool:
        """Serve a generated resource if the path names one; False otherwise."""
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        try:
            match = _BYTES_PATH.match(url.path)
            if match:
                self._send_bytes(int(match.group(1)), int(_query_number(query, "seed", 0)), head)
                return True
            match = _DRIP_PATH.match(url.path)
            if match:
                self._send_drip(
                    int(match.group(1)),
                    _query_number(query, "interval", 0.1),
                    int(_query_number(query, "chunks", 10)),
                    head,
                )
                return True
            if url.path == "/stall":
                self._send_stall(_query_number(query, "seconds", 5.0), head)
                return True
        except ValueError as exc:
            self.send_error(400, str(exc))
            return True
        return False

    def _start(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_bytes(self, size: int, seed: int, head: bool) -> None:
        if size > _MAX_GENERATED:
            raise ValueError("size too large")
        self._start(size)
        if head:
            return
        block = memoryview(_block(seed))
        left = size
        while left:
            count = min(left, _WRITE_SIZE, BLOCK_SIZE)
            self.wfile.write(block[:count])
            left -= count

    def _send_drip(self, size: int, interval: float, chunks: int, head: bool) -> None:
        if size > 64 << 20 or chunks < 1 or not 0 <= interval <= 60:
            raise ValueError("bad drip parameters")
        self._start(size)
        if head:
            return
        body = generated_bytes(size)
        step = max(1, -(-size // chunks))
        for offset in range(0, size, step):
            if offset:
                time.sleep(interval)  # pacing is the point of this resource
            self.wfile.write(body[offset : offset + step])
            self.wfile.flush()

    def _send_stall(self, seconds: float, head: bool) -> None:
        if not 0 <= seconds <= 300:
            raise ValueError("bad stall duration")
        body = b"finally\n"
        self._start(len(body))
        self.wfile.flush()
        if head:
            return
        self.server.stop_event.wait(seconds)
        self.wfile.write(body)

    # ------------------------------------------------------------ file bodies
    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Send a file body: up to :data:`SMALL_FILE` bytes into the response
        buffer (one write with the head), more with ``sendfile`` when the
        source is a real file."""
        try:
            size = os.fstat(source.fileno()).st_size
        except (AttributeError, ValueError, OSError):
            size = -1
        if 0 <= size <= SMALL_FILE:
            outputfile.write(source.read(SMALL_FILE))
            return
        outputfile.flush()
        try:
            self.connection.sendfile(source)
        except (AttributeError, ValueError, OSError) as exc:
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise
            shutil.copyfileobj(source, outputfile, _WRITE_SIZE)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


class DummyServer(http.server.ThreadingHTTPServer):
    """A threaded file server bound to ``(host, port)`` (port 0 picks a free one)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], directory: Optional[str] = None) -> None:
        self.directory = os.path.abspath(directory or os.getcwd())
        self.stop_event = threading.Event()
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, DummyHandler)

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup of the host; raise
        :class:`~remotedialer.errors.ListenError` when the address cannot be had."""
        try:
            socketserver.TCPServer.server_bind(self)
        except OSError as exc:
            raise ListenError.binding(self.server_address, exc) from exc
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self.server_address[1])

    def url(self, host: str = "127.0.0.1") -> str:
        """``http://host:port`` for this server."""
        return f"http://{join_host_port(host, self.port)}"

    def start(self) -> threading.Thread:
        """Serve on a daemon thread and return it."""
        thread = threading.Thread(target=self.serve_forever, name="remotedialer-dummy", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop serving and close the listening socket; blocks until the loop ended."""
        self.stop_event.set()
        self.shutdown()
        self.server_close()
