"""What one tunnel handshake costs the example server, in one thread:
``python -m benchmarks.handshake_cost {accept,prepare} N``.

``N`` agents' upgrade heads (distinct client keys) are queued in the
listen backlog; ``accept`` then serves them one after another on this
thread with the example server's front end and app (``make_app()`` under
:class:`~remotedialer.gateway.frontend.BoundedThreadedWSGIServer`, logging
as ``remotedialer server`` sets it up): through the listener's head reader
and ``Server.handshake`` where the front end has them, else through
``finish_request`` of the thread-per-request server. The session's reader
is not run (no thread, no teardown). ``prepare`` only queues the
connections. For instructions per handshake, which a loaded machine does
not disturb, run both under callgrind and divide the difference by ``N``::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python -m benchmarks.handshake_cost accept 300

With ``PYTHONPATH`` set to another checkout it measures that one (the
script needs nothing the older front end lacks).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import sys
import threading
from typing import Any, List, Optional, Sequence

from remotedialer.app import make_app
from remotedialer.examples.logs import lean_log_records, setup_logging
from remotedialer.gateway.frontend import BoundedThreadedWSGIServer
from remotedialer.server.tunnel_server import Server

HEAD = ("GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "X-Tunnel-ID: agent-{}\r\n\r\n")


def _serve_queued(httpd: Any, count: int) -> None:
    """Serve ``count`` queued handshakes on this thread, readers not run."""
    if hasattr(httpd, "_accept_one"):  # the listener's own handshake
        from remotedialer.gateway.head_reader import HeadReader

        threading.Thread.start = lambda self: None  # type: ignore[method-assign]
        httpd.socket.setblocking(False)
        httpd._heads = HeadReader(selectors.DefaultSelector(), 10.0, httpd._head_arrived)
        while httpd._accept_one():
            pass
        return
    Server._serve_until_detached = staticmethod(lambda *args: None)  # type: ignore[method-assign,assignment]
    for _ in range(count):
        sock, address = httpd.get_request()
        httpd.finish_request(sock, address)
        httpd.shutdown_request(sock)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("accept", "prepare"):
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    mode, count = args[0], int(args[1])
    setup_logging()
    lean_log_records()
    for handler in logging.getLogger().handlers:  # the line is formatted and written, to nowhere
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))
    app = make_app(peers="", timeout=5.0)
    httpd = BoundedThreadedWSGIServer("127.0.0.1", 0, app, max_threads=count + 16)
    clients: List[socket.socket] = []
    for index in range(count):
        client = socket.create_connection(("127.0.0.1", httpd.port))
        client.sendall(HEAD.format(index).encode("ascii"))
        clients.append(client)
    if mode == "accept":
        _serve_queued(httpd, count)
        served = len(app.server.session_manager.all_sessions())
        if served != count:
            print(f"only {served} of {count} sessions opened", file=sys.stderr)
            return 1
    print(f"{mode}: {count} handshakes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
