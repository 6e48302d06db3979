"""Resumption benchmarks (issue 22): ``python -m benchmarks.resume``.

``remotedialer server`` and ``remotedialer client`` run as processes with a
cutting proxy (:mod:`testkit.cut_proxy`) between them, and the dummy file
server as the target of ``/client/`` downloads.

* **Throughput**: the same download with ``--resume-window 0`` (off) and
  ``30`` (on), alternated within one run; MB/s, and CPU seconds of server and
  client per GiB (from ``/proc``), medians of ``--runs``. Target: on ≥ 0.95×
  off.
* **Time to resume**: the tunnel's TCP connection is reset and new
  connections are refused for an outage (``--outage`` seconds), then the
  network comes back; the time from then until the client logs that it
  resumed. Target: under 1 s. One silent drop (no reset: the client must
  notice two missed pongs) is timed too, from the network coming back.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

from remotedialer.examples.file_server import DummyServer
from testkit.cut_proxy import CutProxy

from .procs import Proc

MiB = 1024 * 1024
TIMEOUT = 60.0


def _logged_at(text: str, pattern: str, count: int) -> float:
    """The wall-clock time (from the log line's timestamp) of the
    ``count``-th line matching ``pattern``."""
    lines = [line for line in text.splitlines() if re.search(pattern, line)]
    stamp = lines[count - 1][:23]  # "2026-12-07 18:05:01,123", the CLI's log format
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Stack:
    """Server, proxy and client, with resumption ``window`` (0: off)."""

    def __init__(self, window: float, web_port: int, log_dir: str) -> None:
        self.web_port = web_port
        name = f"window-{window:g}"
        self.server = Proc.remotedialer(f"{name}-server", [
            "server", "--listen", "127.0.0.1:0", "--timeout", "30", "--resume-window", f"{window:g}",
        ], log_dir)
        match = self.server.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)")[0]
        self.port = int(match.group(1))
        self.proxy = CutProxy(("127.0.0.1", self.port))
        self.client = Proc.remotedialer(f"{name}-client", [
            "client", "--connect", f"ws://127.0.0.1:{self.proxy.port}/connect", "--id", "foo",
            "--resume-window", f"{window:g}",
        ], log_dir)
        self.client.wait_for_log(r"connected to ")
        self.server.wait_for_log(r"client session started for foo ")

    def cpu_seconds(self) -> float:
        """CPU time of server and client so far."""
        return self.server.stats().cpu_seconds + self.client.stats().cpu_seconds

    def download(self, size: int) -> float:
        """Seconds to download ``size`` bytes through ``/client/``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        started = time.perf_counter()
        conn.request("GET", f"/client/foo/http/127.0.0.1:{self.web_port}/bytes/{size}")
        response = conn.getresponse()
        got = 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        elapsed = time.perf_counter() - started
        conn.close()
        if got != size:
            raise RuntimeError(f"downloaded {got} bytes of {size}")
        return elapsed

    def close(self) -> None:
        self.client.stop()
        self.proxy.close()
        self.server.stop()


def throughput(web_port: int, size: int, runs: int, log_dir: str) -> None:
    stacks = {"off": Stack(0, web_port, log_dir), "on": Stack(30, web_port, log_dir)}
    rates: Dict[str, List[float]] = {name: [] for name in stacks}
    cpu: Dict[str, List[float]] = {name: [] for name in stacks}
    try:
        for name in stacks:
            stacks[name].download(size // 4)  # warm up
        for _ in range(runs):
            for name, stack in stacks.items():
                before = stack.cpu_seconds()
                elapsed = stack.download(size)
                spent = stack.cpu_seconds() - before
                rates[name].append(size / elapsed / 1e6)
                cpu[name].append(spent / (size / (1024 * MiB)))
    finally:
        for stack in stacks.values():
            stack.close()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"download {size // MiB} MiB through /client/, {runs} runs each, alternated")
    for name in ("off", "on"):
        print(f"  resumption {name:3}: {statistics.median(rates[name]):7.1f} MB/s (runs: "
              + ", ".join(f"{r:.0f}" for r in rates[name])
              + f"), CPU server+client {statistics.median(cpu[name]):.2f} s/GiB")
    print(f"  ratio on/off: {on / off:.3f} (target >= 0.95)")


def time_to_resume(web_port: int, trials: int, outage: float, silent: bool, log_dir: str) -> None:
    stack = Stack(30, web_port, log_dir)
    delays: List[float] = []
    try:
        for trial in range(trials):
            suspended_before = stack.client.log_text().count("suspended for up to")
            if silent:
                stack.proxy.blackhole()
            else:
                stack.proxy.blackhole()  # refuse new connections during the outage
                stack.proxy.reset()  # and kill the current one
            stack.client.wait_for_log(r"suspended for up to", timeout=TIMEOUT, count=suspended_before + 1)
            time.sleep(outage)  # the outage itself
            back = time.time()
            stack.proxy.restore()
            stack.client.wait_for_log(r"resumed the tunnel", timeout=TIMEOUT, count=trial + 1)
            delays.append(_logged_at(stack.client.log_text(), r"resumed the tunnel", trial + 1) - back)
            stack.download(MiB)  # the tunnel works
    finally:
        stack.close()
    kind = "silent drop" if silent else "reset, then connections refused"
    print(f"time to resume after the network came back ({kind}, {outage:g} s outage, {trials} trials): "
          f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms "
          f"(target < 1000 ms)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resume", description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="download size in MiB (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="runs per setting (default 5)")
    parser.add_argument("--trials", type=int, default=5, help="resume trials (default 5)")
    parser.add_argument("--outage", type=float, default=2.0, help="seconds without network (default 2)")
    parser.add_argument("--no-silent", action="store_true", help="skip the silent-drop trial (~15 s)")
    args = parser.parse_args(argv)
    web = DummyServer(("127.0.0.1", 0))
    web.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-resume-") as log_dir:
            throughput(web.port, args.mib * MiB, args.runs, log_dir)
            time_to_resume(web.port, args.trials, args.outage, False, log_dir)
            if not args.no_silent:
                time_to_resume(web.port, 1, args.outage, True, log_dir)
    finally:
        web.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
