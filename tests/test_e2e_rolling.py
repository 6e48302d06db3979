"""A rolling restart of three gunicorn instances under agents, at CI size.

The harness is the benchmark's (benchmarks/rolling.py: DNS on loopback, a
Service balancer following readiness, real gunicorn processes, real tunnel
clients, a request loop through the Service the whole time); the 300-agent
figures are in docs/benchmarks.rst. Here: fewer agents, short timings, and
the properties rather than the times.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.rolling import RollOptions, run_roll


def test_rolling_restart_loses_no_agent_and_leaves_nothing_stale(tmp_path: Path) -> None:
    options = RollOptions(agents=24, instances=3, peer_refresh=0.5, drain_seconds=0.5,
                          request_threads=3, request_timeout=10.0, workdir=str(tmp_path))
    result = run_roll(options)
    report = "\n".join([result.summary(), *result.timeline, *result.failed_otherwise_examples,
                        *result.stale_entries])
    assert result.moves >= 1, report  # at least the agents of the first instance moved
    assert result.agents_not_back == [], report
    assert result.stale_entries == [], report
    assert result.stalled == 0, report
    # Requests fail only while their own agent moves between instances.
    assert result.failed_otherwise == 0, report
    assert result.requests > 100, report  # the loop ran throughout
