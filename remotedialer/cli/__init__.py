"""The ``remotedialer`` command: ``server``, ``client``, ``dummy``, ``demo``, ``admin`` and ``bench``.

Each subcommand lives in its own module (``server.py``, ``client.py``,
``dummy.py``, ``demo.py``, ``admin.py``) with an ``add_arguments(parser)`` and a
``run(args) -> int``; this module wires them into one argument parser and
sets up logging. Only the module of the subcommand being run is imported (a
``remotedialer server`` never loads ``requests`` for the demo), which keeps the
idle memory of each process down. ``bench`` runs ``python -m benchmarks``
(from a source checkout).

``--debug`` (or ``CATTLE_TUNNEL_DATA_DEBUG=true``) logs every protocol message
sent and received through the ``remotedialer.trace`` logger, as the Go
implementation does.

A command that cannot run says why in one line on stderr, without a
traceback: exit status 2 for a usage error (an option's value, a
:class:`~remotedialer.errors.ConfigurationError`), 1 for a runtime one (a
port in use, any other error; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
import threading
from typing import Any, List, NoReturn, Optional, Sequence, Tuple

from ..addresses import ALL_INTERFACES, parse_listen_address
from ..errors import ConfigurationError, RemotedialerError, error_text
from ..examples.logs import LOG_FORMAT, setup_logging

__all__ = ["main", "build_parser", "setup_logging", "OneLineErrorParser", "LOG_FORMAT", "read_secret"]

log = logging.getLogger(__name__)

def read_secret(token_file: Optional[str], env_name: str) -> Optional[str]:
    """A secret from ``token_file`` (its first line, white space stripped)
    or, without a file, from the environment variable ``env_name``; ``None``
    if neither gives one. Secrets are never taken from the command line,
    where ``ps`` shows them to every user. Raises ``OSError`` if the file
    cannot be read."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            secret = f.readline().strip()
        return secret or None
    return os.environ.get(env_name, "").strip() or None


def install_stop_signals() -> threading.Event:
    """An event set by SIGINT (Ctrl-C) or SIGTERM; call from the main thread.
    The command then waits on it and shuts down cleanly."""
    import signal  # when a command runs: 11 M instructions, not for --help

    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


#: The longest the main thread sleeps in :func:`wait_for_stop` without
#: looking at the event (a fallback: a signal wakes it at once).
STOP_CHECK_SECONDS = 60.0


def wait_for_stop(stop: threading.Event) -> None:
    """Block the main thread until ``stop`` is set by a signal handler of
    :func:`install_stop_signals`, asleep in between (an idle agent wakes for
    its heartbeat only). A signal delivered to another thread only runs its
    Python handler once the main thread wakes up, so the wait is on the
    signals' wake-up descriptor (:func:`signal.set_wakeup_fd`, a socket pair:
    portable to Windows), which every signal writes to, whichever thread
    takes it. Off the main thread (no wake-up descriptor there) it looks at
    the event twice a second."""
    import signal  # see install_stop_signals

    reader, writer = socket.socketpair()
    try:
        writer.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            while not stop.wait(0.5):
                pass
            return
        try:
            reader.settimeout(STOP_CHECK_SECONDS)
            while not stop.is_set():  # the handler runs before this call, on this thread
                try:
                    reader.recv(64)
                except socket.timeout:
                    pass
        finally:
            signal.set_wakeup_fd(previous)
    finally:
        reader.close()
        writer.close()


def positive_int(text: str) -> int:
    """The argparse ``type`` of counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def seconds(text: str) -> float:
    """The argparse ``type`` of durations: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also NaN
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, not {text}")
    return value


def listen_address_type(text: str) -> Tuple[str, int]:
    """The argparse ``type`` of ``--listen`` options (see
    :func:`~remotedialer.addresses.parse_listen_address`; a bare port listens
    on every interface)."""
    try:
        return parse_listen_address(text, ALL_INTERFACES)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_COMMANDS = (
    ("server", "run the example tunnel server (/connect and /client/...)"),
    ("client", "connect to a server and serve its dials"),
    ("dummy", "serve a directory (and generated data) over HTTP"),
    ("demo", "run server, client and file server in one process and try them"),
    ("admin", "list, show and disconnect the agents of a server (its admin API)"),
)


def _run_bench(bench_args: Sequence[str]) -> int:
    """``remotedialer bench ARGS``: runs ``python -m benchmarks ARGS`` in the
    current directory, which must be a source checkout (the benchmarks are
    not installed with the package); returns its exit status."""
    if not os.path.isfile(os.path.join("benchmarks", "__main__.py")):
        log.error("the benchmarks package was not found: run from a source checkout of remotedialer")
        return 2
    import subprocess  # only here: the agent's CLI never starts a process

    return subprocess.call([sys.executable, "-m", "benchmarks", *bench_args])


def _terminal_columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it:
    ``COLUMNS``, then standard output's terminal, else 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):  # not a terminal, or a stand-in without a descriptor
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter with the width found without ``shutil``:
    argparse imports it for the width each time a formatter is made (once
    per argument, to check it), and ``shutil`` brings ``bz2``, ``lzma`` and
    ``zlib`` with it, 0.5 MiB of an idle agent."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line (``remotedialer client: error: ...``), exit 2;
    ``--help`` shows the usage. Its subcommand parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser of the ``remotedialer`` command. With ``command``,
    only that subcommand's module is imported and its options parsed (the
    others are listed but take no options)."""
    parser = OneLineErrorParser(
        prog="remotedialer",
        description="Reverse tunnels over one WebSocket (a port of rancher/remotedialer).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"remotedialer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, summary in _COMMANDS:
        if command is not None and command != name:
            commands.add_parser(name, help=summary)
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        first_line = (module.__doc__ or "").split("\n", 1)[0]
        sub = commands.add_parser(name, help=summary, description=first_line.split(": ", 1)[-1],
                                  epilog=getattr(module, "HELP_EPILOG", None))
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    bench = commands.add_parser("bench", help="run the benchmarks (python -m benchmarks; --help for options)",
                                add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=lambda args: _run_bench(args.bench_args))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``remotedialer`` console script; returns the exit status."""
    arguments = list(argv) if argv is not None else sys.argv[1:]
    names = {name for name, _ in _COMMANDS}
    command = next((arg for arg in arguments if not arg.startswith("-")), None)
    if command == "bench":  # every option after it is the benchmarks' own
        return _run_bench(arguments[arguments.index("bench") + 1 :])
    parser = build_parser(command if command in names else None)
    args = parser.parse_args(arguments)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ConfigurationError as exc:
        print(f"remotedialer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, not a traceback; --debug shows it
        log.debug("%s failed", args.command, exc_info=True)
        known = isinstance(exc, (OSError, RemotedialerError))
        text = error_text(exc) if known else f"{type(exc).__name__}: {exc}"
        print(f"remotedialer {args.command}: error: {text}", file=sys.stderr)
        return 1


def subcommand_main(command: str) -> int:
    """Entry point of the ``bin/remotedialer-<command>`` wrappers."""
    argv: List[str] = [command, *sys.argv[1:]]
    return main(argv)
