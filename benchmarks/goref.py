"""Where the Go reference programs are: the example server, client and file
server of rancher/remotedialer, built outside this project (by the workplace's
``shared/goref/build.sh``) into ``$REMOTEDIALER_GOREF`` or
``~/.cache/rd-goref/bin``. Benchmarks run them side by side when present."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["GOREF_HINT", "go_binary"]

GOREF_HINT = "build the Go reference with shared/goref/build.sh, or set REMOTEDIALER_GOREF"


def go_binary(name: str) -> Optional[Path]:
    """The Go reference program ``name`` (``server``, ``client``, ``dummy``), or None."""
    folder = os.environ.get("REMOTEDIALER_GOREF") or Path.home() / ".cache" / "rd-goref" / "bin"
    path = Path(folder) / name
    return path if os.access(path, os.X_OK) else None
