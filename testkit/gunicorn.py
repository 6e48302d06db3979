"""A real gunicorn process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import requests

from .support import TIMEOUT

__all__ = ["Gunicorn", "EXAMPLE_APP"]

REPO = Path(__file__).resolve().parents[1]

#: The documented deployment's app: the example server's factory.
EXAMPLE_APP = "remotedialer.cli.server:make_app()"


class Gunicorn:
    """``gunicorn -k <worker> <app>`` (by default the ``gthread`` worker with
    3 threads and :mod:`testkit.gunicorn_app`) on 127.0.0.1, port 0; its log
    (stderr) is collected in ``lines``. ``env`` adds environment variables."""

    def __init__(
        self,
        *extra_args: str,
        app: str = "testkit.gunicorn_app:app",
        worker: str = "gthread",
        threads: int = 3,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.lines: List[str] = []
        self._listening = threading.Event()
        self.port = 0
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn",
                "-k", worker, "--threads", str(threads), "--workers", "1",
                "--bind", "127.0.0.1:0", "--graceful-timeout", "3", "--log-level", "info",
                *extra_args, app,
            ],
            cwd=str(REPO),
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._listening.wait(TIMEOUT * 3):
            self.stop()
            raise AssertionError("gunicorn did not start:\n" + "".join(self.lines))
        tls = "--certfile" in extra_args
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.url = f"{'wss' if tls else 'ws'}://127.0.0.1:{self.port}/connect"

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"Listening at: https?://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._listening.set()

    def log_text(self) -> str:
        return "".join(self.lines)

    def clients(self, verify: Any = True) -> List[str]:
        """The client keys ``testkit.gunicorn_app`` has sessions for."""
        response = requests.get(f"{self.base}/clients", timeout=TIMEOUT, verify=verify)
        response.raise_for_status()
        return response.text.split()

    def errors(self) -> List[str]:
        return [line for line in self.lines if "[ERROR]" in line or "Traceback" in line]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover - reported by the test
            self.process.kill()
            self.process.wait(TIMEOUT)
