"""The ``remotedialer`` command, in process: argument parsing, logging
set-up and the ``bench`` subcommand."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from remotedialer.cli import build_parser, main, setup_logging
from remotedialer.ha.peering import PeerSpec, parse_peers

# ------------------------------------------------------------------ parsing


def test_parse_peers() -> None:
    assert parse_peers("") == []
    assert parse_peers(None) == []
    assert parse_peers("a:t1:ws://h:8123/connect, b:t2:wss://[::1]:9/connect,") == [
        PeerSpec("a", "t1", "ws://h:8123/connect"),
        PeerSpec("b", "t2", "wss://[::1]:9/connect"),
    ]
    for bad in ("a:t1", "a::ws://x", ":t:ws://x"):
        with pytest.raises(ValueError):
            parse_peers(bad)


def test_defaults_are_the_go_examples() -> None:
    parser = build_parser()
    server = parser.parse_args(["server"])
    assert (server.listen, server.id, server.token, server.peers, server.debug) == (
        ("0.0.0.0", 8123), "", "", "", False,
    )
    assert server.timeout == 15.0
    client = parser.parse_args(["client"])
    assert (client.connect, client.id) == ("ws://localhost:8123/connect", "foo")
    dummy = parser.parse_args(["dummy"])
    assert (dummy.listen, dummy.directory) == (("0.0.0.0", 8125), ".")
    demo = parser.parse_args(["demo"])
    assert demo.size == 64


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--listen", "nowhere"])
    assert exited.value.code == 2
    assert "invalid listen address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


def test_server_help_carries_the_open_relay_warning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "WARNING: without --credentials this server is an open relay" in text
    assert "listens on every interface" in text
    assert "--listen 127.0.0.1:8123" in text and "Running the server for real" in text


@pytest.mark.parametrize("spec, reason", [
    ("9125=foo:udp:127.0.0.1:53", "cannot forward proto 'udp'"),
    ("9125=foo:tcp", "want LISTEN=CLIENT_KEY:PROTO:ADDRESS"),
])
def test_bad_forward_exits_2_before_starting(
    spec: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--listen", "127.0.0.1:0", "--forward", spec])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --forward" in err and reason in err


# ------------------------------------------------------------------ logging


@pytest.fixture
def clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    names = ["", "werkzeug", "remotedialer", "remotedialer.trace", "urllib3", "websocket",
             "simple_websocket", "gunicorn"]
    levels = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.getLogger().handlers)
    # setenv first: monkeypatch then removes the variable again afterwards,
    # even when the test's setup_logging(debug=True) set it (a bare delenv of
    # an absent variable restores nothing, and tracing leaked into later tests)
    monkeypatch.setenv("CATTLE_TUNNEL_DATA_DEBUG", "")
    monkeypatch.delenv("CATTLE_TUNNEL_DATA_DEBUG")
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_setup_logging_levels(clean_logging: None) -> None:
    setup_logging()
    assert logging.getLogger().level == logging.INFO
    assert not logging.getLogger("remotedialer.trace").isEnabledFor(logging.DEBUG)
    setup_logging(quiet=True)
    assert logging.getLogger().level == logging.ERROR
    assert logging.getLogger("werkzeug").level == logging.ERROR


def test_cattle_tunnel_data_debug_enables_only_the_trace(
    clean_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CATTLE_TUNNEL_DATA_DEBUG", "true")
    setup_logging()
    assert logging.getLogger("remotedialer.trace").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("remotedialer.session").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("remotedialer.session").isEnabledFor(logging.INFO)


def test_debug_turns_tracing_on(clean_logging: None) -> None:
    setup_logging(debug=True)
    assert os.environ["CATTLE_TUNNEL_DATA_DEBUG"] == "true"
    assert logging.getLogger("remotedialer.session").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("remotedialer.trace").isEnabledFor(logging.DEBUG)


def test_bench_subcommand_runs_the_benchmarks_command(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``remotedialer bench`` runs ``python -m benchmarks`` from a source
    checkout, in a child process: this process's ``sys.path`` is untouched."""
    path_before = list(sys.path)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["bench", "--help"]) == 0
    assert "python -m benchmarks" in capfd.readouterr().out
    monkeypatch.chdir(tmp_path)  # not a checkout
    assert main(["bench", "--help"]) == 2
    assert "source checkout" in caplog.text
    assert sys.path == path_before


# --------------------------------------- request smuggling at the front end
# Each request is followed on the same connection by a second one, GET
# /smuggled: a refused request must close the connection without answering
# it (bytes another parser could have read as part of the first request
# are never served as a request of their own).
_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


# ------------------------------------------------------------------ waiting for a stop signal
# The main thread waits in wait_for_stop while a second thread counts its
# sleeps (voluntary context switches) over two seconds, then has SIGTERM
# delivered to itself, not to the main thread: only the signals' wake-up
# descriptor can end the wait before STOP_CHECK_SECONDS (60 s) then.
WAIT_FOR_STOP = """
import os, signal, sys, threading, time
from remotedialer.cli import install_stop_signals, wait_for_stop

def sleeps(tid):
    with open(f"/proc/self/task/{tid}/status") as status:
        return int(next(line for line in status if line.startswith("voluntary_ctxt_switches:")).split()[1])

stop = install_stop_signals()
main_thread = threading.get_native_id()

def count_then_signal():
    time.sleep(0.5)  # the main thread is in its wait by then
    before = sleeps(main_thread)
    time.sleep(2.0)  # the window the main thread's sleeps are counted over
    print(sleeps(main_thread) - before, flush=True)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=count_then_signal, daemon=True).start()
wait_for_stop(stop)
print("stopped", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_wait_for_stop_sleeps_until_a_signal_on_another_thread() -> None:
    """An idle ``remotedialer client`` does not wake its main thread twice a
    second (the wait in slices of 0.5 s did: 4 sleeps in 2 s, where this
    allows 1), and a SIGTERM taken by another thread still ends the wait at
    once (within the test's timeout, far below the 60 s fallback slice)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", WAIT_FOR_STOP],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    sleeps, stopped = done.stdout.split()
    assert stopped == "stopped"
    assert int(sleeps) <= 1, done.stdout
