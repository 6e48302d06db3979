"""A rolling restart of three gunicorn instances under agents, at CI size.

The harness is the benchmark's, run as ``python -m benchmarks.rolling`` (DNS
on loopback, a Service balancer following readiness, real gunicorn processes,
real tunnel clients, a request loop through the Service the whole time); the
300-agent figures are in docs/benchmarks.rst. Here: fewer agents, short timings, and
the properties rather than the times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rolling_restart_loses_no_agent_and_leaves_nothing_stale(tmp_path: Path) -> None:
    out = tmp_path / "roll.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.rolling", "--agents", "24", "--instances", "3",
         "--peer-refresh", "0.5", "--drain-seconds", "0.5", "--request-threads", "3",
         "--request-timeout", "10", "--workdir", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    report = run.stdout
    assert result["moves"] >= 1, report  # at least the agents of the first instance moved
    assert result["agents_not_back"] == [], report
    assert result["stale_entries"] == [], report
    assert result["stalled"] == 0, report
    # Requests fail only while their own agent moves between instances.
    assert result["failed_otherwise"] == 0, report
    assert result["requests"] > 100, report  # the loop ran throughout
