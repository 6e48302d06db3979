"""The code stays lint-clean (ruff) and fully typed (mypy --strict), as the
house style asks (docs/contributing.rst); configuration in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", "remotedialer", "benchmarks", "fuzz", "testkit", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = run("mypy", "--strict", "remotedialer")
    assert result.returncode == 0, result.stdout + result.stderr
