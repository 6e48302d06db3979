"""HTTP request-rate measurement: wrk when installed, else a built-in load
generator run in its own process (``python -m benchmarks.loadgen``).

The built-in generator keeps ``N`` HTTP/1.1 keep-alive connections busy with
``GET`` requests from one selector loop for a fixed time and reports the
request rate and latency percentiles as JSON. It understands
``Content-Length`` and chunked bodies and reconnects after ``Connection:
close``. Every socket gets ``TCP_NODELAY``.
"""

from __future__ import annotations

import argparse
import json
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["LoadResult", "run_load", "run_wrk", "run_builtin", "wrk_path", "parse_wrk"]


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    requests_per_second: float
    p50_ms: float
    requests: int
    errors: int
    tool: str


def wrk_path() -> Optional[str]:
    """The wrk binary, if installed."""
    return shutil.which("wrk")


def run_load(url: str, connections: int, duration: float, use_wrk: bool = True) -> LoadResult:
    """Load ``url`` with ``connections`` keep-alive connections for ``duration``
    seconds; blocks for about that long. Raises ``RuntimeError`` if the tool fails."""
    if use_wrk and wrk_path():
        return run_wrk(url, connections, duration)
    return run_builtin(url, connections, duration)


# ------------------------------------------------------------------- wrk
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(output: str) -> Tuple[float, float, int, int]:
    """``(requests/s, p50 ms, requests, errors)`` from ``wrk --latency`` output."""
    rate = re.search(r"Requests/sec:\s*([\d.]+)", output)
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rate and p50 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(group) for group in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    return float(rate.group(1)), float(p50.group(1)) * _UNITS_MS[p50.group(2)], int(total.group(1)), errors


def run_wrk(url: str, connections: int, duration: float) -> LoadResult:
    """Run ``wrk --latency`` (one thread per connection up to 2)."""
    binary = wrk_path()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    threads = max(1, min(2, connections))
    seconds = max(1, int(round(duration)))
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    rate, p50, total, errors = parse_wrk(done.stdout)
    return LoadResult(rate, p50, total, errors, "wrk")


# --------------------------------------------------------- built-in generator
def run_builtin(url: str, connections: int, duration: float) -> LoadResult:
    """Run the built-in generator in a separate process and read its JSON."""
    argv = [sys.executable, "-m", "benchmarks.loadgen", url, "-c", str(connections), "-d", str(duration)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr}")
    data = json.loads(done.stdout)
    return LoadResult(data["rps"], data["p50_ms"], data["requests"], data["errors"], "python")


class _Client:
    """One keep-alive connection of the built-in generator."""

    __slots__ = ("sock", "buffer", "started", "need", "chunked", "header_done", "close_after")

    def __init__(self, address: Tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = bytearray()
        self.started = 0.0
        self.need = -1
        self.chunked = False
        self.header_done = False
        self.close_after = False

    def response_complete(self) -> Optional[bool]:
        """Parse what is buffered: True when a whole response arrived (and was
        consumed), None if more is needed. Raises ``ValueError`` on garbage."""
        buf = self.buffer
        if not self.header_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            head = bytes(buf[:end]).decode("latin-1").lower()
            if not head.startswith("http/1."):
                raise ValueError(f"not an HTTP response: {head[:40]!r}")
            del buf[: end + 4]
            self.header_done = True
            self.chunked = "transfer-encoding: chunked" in head
            length = re.search(r"content-length:\s*(\d+)", head)
            self.need = int(length.group(1)) if length else -1
            self.close_after = "connection: close" in head or head.startswith("http/1.0")
            if not self.chunked and self.need < 0:
                raise ValueError("response without length")
        if self.chunked:
            while True:
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    return None
                size = int(bytes(buf[:line_end]).split(b";")[0], 16)
                if size == 0:
                    trailer_end = buf.find(b"\r\n\r\n", line_end)
                    if trailer_end < 0:
                        return None
                    del buf[: trailer_end + 4]
                    return True
                if len(buf) < line_end + 2 + size + 2:
                    return None
                del buf[: line_end + 2 + size + 2]
        if len(buf) < self.need:
            return None
        del buf[: self.need]
        return True


def generate(url: str, connections: int, duration: float) -> Dict[str, Any]:
    """Drive the load in this process; return the result as a dict."""
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    latencies: List[float] = []
    errors = 0

    def start(client: _Client) -> None:
        client.header_done = False
        client.started = time.perf_counter()
        client.sock.send(request)

    def open_client() -> None:
        client = _Client(address)
        selector.register(client.sock, selectors.EVENT_READ, client)
        start(client)

    for _ in range(connections):
        open_client()
    began = time.perf_counter()
    end = began + duration
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, _ in selector.select(min(0.5, end - now)):
            client = key.data
            try:
                data = client.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                client.buffer += data
                while True:
                    done = client.response_complete()
                    if not done:
                        break
                    finished = time.perf_counter()
                    latencies.append(finished - client.started)
                    if client.close_after:
                        raise ConnectionResetError("connection: close")
                    if finished < end:
                        start(client)
                    break
            except (OSError, ValueError) as exc:
                if not isinstance(exc, ConnectionResetError) or "connection: close" not in str(exc):
                    errors += 1
                selector.unregister(client.sock)
                client.sock.close()
                if time.perf_counter() < end:
                    open_client()
    elapsed = time.perf_counter() - began
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    return {"rps": len(latencies) / elapsed, "p50_ms": p50, "requests": len(latencies), "errors": errors}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    json.dump(generate(args.url, args.connections, args.duration), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
