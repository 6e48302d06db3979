"""The soak command (``python -m benchmarks.soak``, run as a subprocess): a
quick smoke run in the default suite, the full 10-minute run with ``-m slow``.
Its verdict and argument checks are in ``python -m benchmarks.selfcheck``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_soak_runs_clean(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "3", "--connections", "5", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    table = run.stdout
    assert run.returncode == 0, table + run.stderr[-3000:]
    assert "0 errors" in table
    figures = json.loads(out.read_text())
    assert figures["errors"] == 0 and figures["died"] == []
    assert figures["echo_round_trips"] > 0 and figures["http_requests"] > 0
    for name in ("server", "client"):
        assert figures["samples"][name], f"no samples of the {name}"
        assert name in figures["idle"]
        assert f"\n{name} " in table


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_soak(tmp_path: Path) -> None:
    """100 connections for 10 minutes (the defaults): zero errors, and the
    processes' threads and descriptors back to their start once idle."""
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=840,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["errors"] == 0
    for name in ("server", "client"):
        start = figures["samples"][name][0]
        idle = figures["idle"][name]
        assert idle["threads"] <= start["threads"] + 2, (name, start, idle)
        assert idle["fds"] <= start["fds"] + 4, (name, start, idle)
