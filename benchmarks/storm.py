"""Reconnect storm (issue 12): ``N`` agents hold tunnels on the example
server; the server stops (SIGTERM) and a new one starts on the same port;
every agent reconnects at once (jitter up to 1 s). Reports how long until
every agent was back, connection attempts that failed while no server
listened and handshakes that failed once the new one did,
and the new server's RSS against the first one's at the same load.

``python -m benchmarks.storm [--agents 3000] [--runs 1]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from remotedialer.server.process import raise_open_files_limit

from .procs import FleetProc
from .procs import Proc, free_port, wait_until

__all__ = ["run_storm", "main"]

MIB = 1024 * 1024


def _server(name: str, port: int, log_dir: str) -> Proc:
    proc = Proc.remotedialer(name, ["server", "--listen", f"127.0.0.1:{port}"], log_dir)
    proc.wait_for_log(r"listening on http://127\.0\.0\.1:")
    return proc


def _status(fleet: FleetProc) -> Dict[str, float]:
    return {key: float(value) for key, value in fleet.last().items()  # type: ignore[arg-type]
            if isinstance(value, (int, float))}


def run_storm(agents: int, settle: float = 10.0) -> Dict[str, float]:
    """One storm; blocks for about a minute. Raises ``BenchError`` on failure."""
    raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="remotedialer-storm-") as log_dir:
        port = free_port()
        procs: List[Proc] = []
        fleet: Optional[FleetProc] = None
        try:
            first = _server("server-1", port, log_dir)
            procs.append(first)
            fleet = FleetProc(port, agents, log_dir, reconnect=True, report=0.2)
            opened = fleet.wait_opened(timeout=60 + agents / 50)
            time.sleep(settle)  # the steady level: every agent has pinged
            rss_first = first.stats().rss_bytes
            first.stop(timeout=30)
            wait_until(lambda: _status(fleet).get("open", 1) == 0, 60, "every agent to see the server gone")
            failed_while_down = _status(fleet).get("failed", 0.0)
            started = time.monotonic()
            second = _server("server-2", port, log_dir)
            procs.append(second)
            listening = time.monotonic() - started
            time.sleep(0.5)  # the fleet's next status (every 0.2 s) comes after the listener opened
            failed_before_listening = _status(fleet).get("failed", 0.0)
            wait_until(lambda: _status(fleet).get("open", 0) == agents, 120, "every agent back")
            back = time.monotonic() - started
            failed = _status(fleet).get("failed", 0.0)
            time.sleep(settle)
            rss_second = second.stats().rss_bytes
            status = fleet.stop()
            fleet = None
            return {
                "agents": agents, "first_open_s": opened, "new_server_listening_s": listening,
                "all_back_s": back,
                "attempts_failed_while_restarting": failed_before_listening - failed_while_down,
                "handshakes_failed_once_listening": failed - failed_before_listening,
                "dropped_after_restart": float(status.get("dropped", 0)) - agents,  # type: ignore[arg-type]
                "rss_first_mib": rss_first / MIB, "rss_second_mib": rss_second / MIB,
                "second_alive": float(second.alive()),
            }
        finally:
            if fleet is not None:
                fleet.stop()
            for proc in procs:
                proc.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    for run in range(1, args.runs + 1):
        result = run_storm(args.agents)
        print(f"storm run {run}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
