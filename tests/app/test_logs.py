"""The example programs' log lines (remotedialer.examples.logs)."""

from __future__ import annotations

import logging
import subprocess
import sys

from remotedialer.examples.logs import LOG_FORMAT, LineFormatter


def _record(created: float, message: str = "client session started for %s") -> logging.LogRecord:
    record = logging.LogRecord("remotedialer.x", logging.INFO, __file__, 1, message, ("agent-1",), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_line_formatter_writes_what_the_standard_formatter_does() -> None:
    """The time text, made once a second, is the standard one for every
    record: within a second, across seconds and back in time."""
    ours, standard = LineFormatter(), logging.Formatter(LOG_FORMAT)
    for created in (1_800_000_000.001, 1_800_000_000.999, 1_800_000_001.5, 1_800_000_000.25,
                    1_800_086_400.0):
        record = _record(created)
        assert ours.format(record) == standard.format(_record(created))
    hour = _record(1_800_000_000.5)
    assert ours.formatTime(hour, "%H") == standard.formatTime(hour, "%H")


def test_lean_log_records_keeps_the_line() -> None:
    """After lean_log_records() a line through setup_logging's handler reads
    as before (nothing it shows was looked up per record)."""
    code = (
        "import logging, time\n"
        "from remotedialer.examples.logs import setup_logging, lean_log_records\n"
        "setup_logging()\n"
        "lean_log_records()\n"
        "logging.getLogger('remotedialer.x').info('client session started for %s', 'agent-1')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip()
    assert line.endswith(" INFO  remotedialer.x: client session started for agent-1"), line
    assert "Logging error" not in result.stderr
