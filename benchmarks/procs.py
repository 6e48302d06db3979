"""Processes under test: start them, find their ports in their logs, read
their CPU time, memory and thread count from ``/proc``, stop them.

Every process logs to its own file in the run's temporary directory, so that
nothing blocks on a full pipe and the logs can be shown when something fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from remotedialer.server.process import raise_open_files_limit

__all__ = [
    "BenchError", "FleetProc", "Proc", "ProcStats", "free_port", "Usage", "usage", "wait_listening",
    "wait_until",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A benchmark could not run (a process failed to start, a port never showed up...)."""


def free_port() -> int:
    """A port that was free a moment ago, for programs that cannot bind port 0
    and report it (sshd). Only use where a retry on collision is possible."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``check`` until it is true; raise :class:`BenchError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class ProcStats:
    """One reading of a process's ``/proc`` entries."""

    cpu_seconds: float  # user + system time of the process (all its threads)
    rss_bytes: int
    threads: int


class Proc:
    """A child process started for a benchmark, logging to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: str, env: Optional[Dict[str, str]] = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=raise_open_files_limit,
        )

    @classmethod
    def remotedialer(cls, name: str, args: Sequence[str], log_dir: str) -> "Proc":
        """Run ``remotedialer ARGS`` (through this interpreter)."""
        return cls(name, [sys.executable, "-m", "remotedialer.cli", *args], log_dir)

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def log_text(self) -> str:
        """Everything the process logged so far."""
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> List["re.Match[str]"]:
        """Block until ``pattern`` matched ``count`` times in the log; return the
        matches. Raises :class:`BenchError` if the process exits or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            matches = list(regex.finditer(self.log_text()))
            if len(matches) >= count:
                return matches[:count]
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name}: no {pattern!r} in its log after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stats(self) -> ProcStats:
        """CPU seconds, RSS and thread count from ``/proc/PID/stat``."""
        fields = _stat_fields(self.pid)
        # fields[0] is field 3 (state): utime is field 14, stime 15, threads 20, rss 24
        utime, stime = int(fields[11]), int(fields[12])
        threads = int(fields[17])
        rss_pages = int(fields[21])
        return ProcStats((utime + stime) / _CLOCK_TICKS, rss_pages * _PAGE_SIZE, threads)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                try:  # SIGKILL ends it, but on a machine at a load of thousands not within seconds
                    self.popen.wait(max(timeout, 60.0))
                except subprocess.TimeoutExpired:
                    print(f"{self.name}: still not reaped 60 s after SIGKILL", file=sys.stderr)
        self._log.close()


def _stat_fields(pid: int) -> List[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rpartition(")")[2].split()


@dataclass(frozen=True)
class Usage:
    """What a process (with its children, if asked) used so far: CPU seconds
    (user + system) and the times one of its threads went to sleep
    (voluntary context switches: each is a later wake-up). Threads that
    already exited are not in the sleep count."""

    cpu_seconds: float
    sleeps: int

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(self.cpu_seconds - other.cpu_seconds, self.sleeps - other.sleeps)


def _sleeps(pid: int) -> int:
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as handle:
                for line in handle:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue  # the thread exited while we looked
    return total


def _children(pid: int) -> List[int]:
    """``pid`` and all its live descendants."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, ()))
    return found


def usage(pid: int, with_children: bool = False) -> Usage:
    """CPU seconds and sleeps of ``pid`` (plus its live descendants and what
    its waited-for children used, with ``with_children``: for servers that
    fork per connection or work in a child, as sshd and gunicorn). Linux only."""
    cpu = 0
    sleeps = 0
    for current in _children(pid) if with_children else [pid]:
        try:
            fields = _stat_fields(current)
        except OSError:
            continue
        # utime, stime (fields 14-15), cutime, cstime (16-17) of waited-for children
        cpu += sum(int(value) for value in fields[11:15 if with_children else 13])
        sleeps += _sleeps(current)
    return Usage(cpu / _CLOCK_TICKS, sleeps)


class FleetProc:
    """The agents' process (:mod:`testkit.fleet`) and its JSON records."""

    def __init__(
        self, port: int, count: int, log_dir: str, name: str = "fleet",
        reconnect: bool = False, report: float = 2.0,
    ) -> None:
        self.count = count
        argv = [sys.executable, "-m", "testkit.fleet", "--port", str(port),
                "--count", str(count), "--report", str(report)]
        self.proc = Proc(name, argv + (["--reconnect"] if reconnect else []), log_dir)

    def records(self) -> List[Dict[str, object]]:
        out = []
        for line in self.proc.log_text().splitlines():
            if line.startswith("{") and line.endswith("}"):
                out.append(json.loads(line))
        return out

    def last(self, event: str = "status") -> Dict[str, object]:
        found = [r for r in self.records() if r.get("event") == event]
        return found[-1] if found else {}

    def wait_opened(self, timeout: float) -> float:
        """Block until every agent is open; the seconds it took. Raises
        :class:`BenchError` after ``timeout`` (with the last status)."""
        deadline = time.monotonic() + timeout
        while True:
            opened = self.last("opened")
            if opened:
                return float(opened["seconds"])  # type: ignore[arg-type]
            if not self.proc.alive():
                raise BenchError(f"the fleet exited:\n{self.proc.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"not all {self.count} agents open after {timeout:.0f}s: {self.last()}")
            time.sleep(0.2)

    def stop(self) -> Dict[str, object]:
        """Stop the fleet; its final status."""
        self.proc.stop(timeout=30)
        return self.last()


def wait_listening(proc: Proc, port: int, timeout: float = 20.0) -> None:
    """Block until something accepts on 127.0.0.1:``port``; :class:`BenchError`
    if ``proc`` exits first (a port collision) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} did not listen on :{port} within {timeout:.0f}s") from None
            time.sleep(0.05)
