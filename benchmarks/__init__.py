"""The remotedialer benchmark suite: ``python -m benchmarks`` (or ``remotedialer bench``).

Starts the example server, client and file server as real processes on
loopback, runs each workload with a warm-up and several runs, and prints the
medians with min-max and run counts, beside the direct path (no tunnel) and,
in the same run, the Go reference's server and client (when built), their
pairings with the Python ones, gunicorn gthread and ``ssh -R``.
See ``python -m benchmarks --help`` and docs/benchmarks.rst.
"""

from .main import main

__all__ = ["main"]
