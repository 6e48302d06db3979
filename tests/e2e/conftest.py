"""Fixtures shared by the end-to-end tests of peering and scale-out (the
helpers behind them: testkit.peering)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

from testkit.peering import Processes, free_port, port_open, wait_until


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes started by the test (logs in ``tmp_path``), killed at teardown."""
    processes = Processes(tmp_path)
    yield processes
    processes.close()


@pytest.fixture
def files(tmp_path: Path, procs: Processes) -> Dict[str, object]:
    """A dummy file server with a small and a 3 MiB file."""
    root = tmp_path / "files"
    root.mkdir()
    (root / "small.txt").write_bytes(b"hello through the mesh\n")
    big = os.urandom(3 * 1024 * 1024)
    (root / "big.bin").write_bytes(big)
    port = free_port()
    cli = [sys.executable, "-m", "remotedialer.cli"]
    procs.start("dummy", cli + ["dummy", "--listen", f"127.0.0.1:{port}", str(root)])
    wait_until(lambda: port_open(port), "the file server")
    return {"port": port, "big_sha": hashlib.sha256(big).hexdigest()}
