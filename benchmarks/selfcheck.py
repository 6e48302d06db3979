"""Checks of the harness's own pieces that need no processes: wrk output
parsing, the report tables, the soak verdict and its argument checks.

``python -m benchmarks.selfcheck`` runs them and exits 0 when all pass (the
test suite runs it as a subprocess, so tests never import ``benchmarks``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from typing import Callable, List

from .fast_target import mark_target_limited
from .loadgen import parse_wrk
from .memory_map import FRAME_STACKS, REST, THREAD_STACKS, memory_map, parse_smaps
from .report import Report
from .soak import Sample, SoakResult
from .soak import main as soak_main

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


def check_parse_wrk() -> None:
    rate, p50, total, errors = parse_wrk(WRK_OUTPUT)
    assert math.isclose(rate, 3305.12) and math.isclose(p50, 2.8), (rate, p50)
    assert (total, errors) == (16542, 3)
    assert math.isclose(parse_wrk(WRK_OUTPUT.replace("2.80ms", "470.00us"))[1], 0.47)
    try:
        parse_wrk("garbage")
    except RuntimeError:
        pass
    else:
        raise AssertionError("parse_wrk accepted garbage")


def check_report_table_medians_and_run_counts() -> None:
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


def check_report_one_table_per_workload_with_go_ratios() -> None:
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


def check_soak_errors_and_deaths_fail_the_run() -> None:
    sample = Sample(0.0, 1 << 20, 5, 10)
    result = SoakResult(seconds=1, connections=1, samples={"server": [sample]})
    assert result.ok
    result.errors = 1
    result.first_errors.append("echo worker 0: ConnectionResetError()")
    assert not result.ok and "error: echo worker 0" in result.table()
    result.errors = 0
    result.died.append("client")
    assert not result.ok and "process died: client" in result.table()


def check_soak_bad_arguments() -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        assert soak_main(["--seconds", "0"]) == 2
        assert soak_main(["--seconds", "1", "--connections", "0"]) == 2


def check_rows_limited_by_the_target_are_marked() -> None:
    report = Report()
    row = report.row("1 KiB GET c10", "requests", "req/s")
    for path, rates in (("direct", (9000, 9100, 8900)), ("tunnel", (2000, 2100, 1900)),
                        ("go", (3200, 3000, 3100))):
        for rate in rates:
            row.add(path, rate)
    report.row("1 KiB GET c10", "CPU server", "us/req").add("tunnel", 9999)  # not a rate: ignored
    marked = mark_target_limited(report)
    assert len(marked) == 1 and "go: 3100 req/s" in marked[0] and "limited by the target" in marked[0], marked
    assert marked[0] in report.table()


SMAPS = """\
7effffff0000-7efffffff000 rw-p 00000000 00:00 0
Rss:                   0 kB
7efffffff000-7f0000000000 ---p 00000000 00:00 0
Rss:                   0 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  12 kB
7f0000500000-7f0000600000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 500 kB
7f0000100000-7f0000104000 rw-p 00000000 00:00 0
Rss:                   8 kB
7f0000200000-7f0000204000 rw-p 00000000 00:00 0 \x20
Rss:                   4 kB
55e000000000-55e000100000 rw-p 00000000 00:00 0                          [heap]
Rss:                 100 kB
7f0000300000-7f0000400000 r--p 00000000 08:01 42                         /usr/lib/libc.so.6
Rss:                1024 kB
"""


def check_memory_map_kinds() -> None:
    found = parse_smaps(SMAPS.splitlines(True), stack_size=1024 * 1024)
    # the 1 MiB mapping above the guard is a stack; the one after it (an object arena) is not
    assert found.rss_bytes == {THREAD_STACKS: 12 * 1024, FRAME_STACKS: 12 * 1024, REST: 1624 * 1024}, found
    assert found.mappings == {THREAD_STACKS: 1, FRAME_STACKS: 2, REST: 5}, found
    before = parse_smaps([], stack_size=1024 * 1024)
    assert found.per(before, 2)[THREAD_STACKS] == 6.0


def check_memory_map_of_live_threads() -> None:
    """Threads started with the server's stack size show as thread stacks."""
    import os
    import threading

    from remotedialer.server.process import THREAD_STACK_SIZE

    if memory_map(os.getpid()) is None:
        return  # no /proc (not Linux): nothing to check
    previous = threading.stack_size(THREAD_STACK_SIZE)
    done = threading.Event()
    threads = [threading.Thread(target=done.wait, args=(30,)) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        found = memory_map(os.getpid())
    finally:
        done.set()
        threading.stack_size(previous)
        for thread in threads:
            thread.join(30)
    assert found is not None and found.mappings[THREAD_STACKS] >= 4, found
    assert found.rss_bytes[THREAD_STACKS] >= 4 * 4096, found


CHECKS: List[Callable[[], None]] = [
    check_memory_map_kinds,
    check_memory_map_of_live_threads,
    check_parse_wrk,
    check_rows_limited_by_the_target_are_marked,
    check_report_table_medians_and_run_counts,
    check_report_one_table_per_workload_with_go_ratios,
    check_soak_errors_and_deaths_fail_the_run,
    check_soak_bad_arguments,
]


def main() -> int:
    """Run every check; print one line each; 0 when all passed."""
    failed = 0
    for check in CHECKS:
        try:
            check()
        except Exception as exc:  # an AssertionError, or the harness broke
            failed += 1
            print(f"FAIL {check.__name__}: {exc!r}")
        else:
            print(f"ok {check.__name__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
