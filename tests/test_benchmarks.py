"""Smoke tests of the benchmark harness (no timed assertions: only that it
runs end to end and produces a well-formed table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loadgen import parse_wrk
from benchmarks.report import Report

ROOT = Path(__file__).resolve().parent.parent

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8123/x
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.91ms    1.01ms  20.01ms   91.23%
    Req/Sec     3.31k   201.11     3.60k    80.00%
  Latency Distribution
     50%    2.80ms
     75%    3.01ms
     90%    3.50ms
     99%    7.00ms
  16542 requests in 5.00s, 19.40MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:   3305.12
Transfer/sec:      3.88MB
"""


def test_parse_wrk():
    rate, p50, total, errors = parse_wrk(WRK_OUTPUT)
    assert rate == pytest.approx(3305.12)
    assert p50 == pytest.approx(2.8)
    assert (total, errors) == (16542, 3)
    assert parse_wrk(WRK_OUTPUT.replace("2.80ms", "470.00us"))[1] == pytest.approx(0.47)
    with pytest.raises(RuntimeError):
        parse_wrk("garbage")


def test_report_table_medians_and_run_counts():
    report = Report()
    row = report.row("download", "throughput", "MB/s", "Go 217")
    for value in (100.0, 300.0, 200.0):
        row.add("tunnel", value)
    row.add("direct", 1000.0)
    report.note("hello")
    table = report.table().splitlines()
    assert table[0].split() == ["workload", "metric", "tunnel", "direct", "tunnel/direct", "target"]
    assert "200 [100-300] (n=3)" in table[2]
    assert "1000 (n=1)" in table[2] and "0.20" in table[2] and "Go 217" in table[2]
    assert table[-1] == "note: hello"
    data = json.loads(report.to_json())
    assert data["rows"][0]["medians"] == {"tunnel": 200.0, "direct": 1000.0}
    assert "list-table" in report.rst_table()


def test_report_one_table_per_workload_with_go_ratios():
    report = Report()
    for connections, go in ((1, 1000.0), (10, 2000.0)):
        row = report.row(f"1 KiB GET c{connections}", "requests", "req/s")
        row.add("tunnel", 1500.0)
        row.add("go", go)
    report.row("raw forward", "requests", "req/s").add("forward", 10.0)
    report.rows[-1].add("ssh-R", 40.0)
    blocks = report.table().split("\n\n")
    assert len(blocks) == 2
    first, second = (block.splitlines() for block in blocks)
    assert first[0].split() == ["workload", "metric", "tunnel", "go", "tunnel/go", "target"]
    assert first[2].split()[-2:] == ["1.50", "-"] and first[3].split()[-2:] == ["0.75", "-"]
    assert second[0].split() == ["workload", "metric", "forward", "ssh-R", "forward/ssh-R", "target"]
    assert "0.25" in second[2]


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
