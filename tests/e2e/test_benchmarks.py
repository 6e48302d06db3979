"""Smoke tests of the benchmark harness, run as subprocesses (tests do not
import ``benchmarks``): its self-check, and a tiny run end to end producing a
well-formed table. No timed assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent.parent


def test_harness_selfcheck() -> None:
    """The harness's own pieces (wrk parsing, report tables, the soak
    verdict): ``python -m benchmarks.selfcheck``."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.selfcheck"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("ok check_") >= 5, done.stdout


def test_quick_run_produces_a_table(tmp_path):
    """The real thing, tiny: server, client and file server as processes."""
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "idle", "--only", "download",
         "--download-mib", "2", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["workload", "metric", "tunnel"]  # then "go" when it is built
    assert set(lines[1]) <= {"-", " "}
    body = "\n".join(lines[2:])
    for label in ("RSS server (MiB)", "RSS client (MiB)", "download 2 MiB", "throughput (MB/s)"):
        assert label in body
    assert "(n=1)" in body
    assert "[download 2 MiB] tunnel run 1/1" in done.stderr  # progress goes to stderr
    data = json.loads(out_json.read_text())
    rows = {(row["workload"], row["metric"]): row for row in data["rows"]}
    rate = rows[("download 2 MiB", "throughput")]
    assert len(rate["values"]["tunnel"]) == 1 and rate["values"]["tunnel"][0] > 0
    assert len(rate["values"]["direct"]) == 1
