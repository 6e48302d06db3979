"""``remotedialer demo``: server, client and file server in one process, tried out.

The command line of :mod:`remotedialer.examples.demo`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..examples.demo import Check, Demo, MiB, human_size, human_time

__all__ = ["add_arguments", "run", "Demo", "Check", "human_size", "human_time"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``remotedialer demo`` options."""
    parser.add_argument("--size", type=int, default=64, metavar="MIB",
                        help="size of the large download in MiB (default 64)")
    parser.add_argument("--verbose", action="store_true", help="show the components' logs")
    parser.add_argument("--debug", action="store_true", help="debug logs, every tunnel message")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 if every check passed, 1 otherwise."""
    from . import setup_logging

    setup_logging(args.debug, quiet=not (args.verbose or args.debug))
    if args.size < 1:
        log.error("--size must be at least 1 (MiB)")
        return 2
    demo = Demo(args.size * MiB)
    try:
        ok = demo.run()
    except (OSError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1

