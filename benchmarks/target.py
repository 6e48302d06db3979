"""A tiny TCP target for the scale workload (``python -m benchmarks.target``).

One selector thread: every accepted connection is greeted with one byte
(``+``) and then echoed, so a client can time dial -> first byte and check
that an idle connection is still alive. It prints ``listening on HOST:PORT``
once bound (port 0 picks a free port).
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
from typing import Optional, Sequence

from remotedialer.server.process import raise_open_files_limit

GREETING = b"+"


def serve(host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT; blocks."""
    raise_open_files_limit()
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    print(f"listening on {host}:{listener.getsockname()[1]}", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    running = [True]

    def stop(_signum: int, _frame: object) -> None:
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running[0]:
        for key, _ in selector.select(0.5):
            if key.data is None:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # out of descriptors: try later
                        break
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        conn.send(GREETING)
                    except OSError:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, True)
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
                if data:
                    conn.setblocking(True)
                    conn.sendall(data)
                    conn.setblocking(False)
                    continue
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                pass
            selector.unregister(conn)
            conn.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.target")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    serve(host.strip("[]") or "127.0.0.1", int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
