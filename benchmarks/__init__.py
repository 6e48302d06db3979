"""The remotedialer benchmark suite: ``python -m benchmarks`` (or ``remotedialer bench``).

Starts the example server, client and file server as real processes on
loopback, runs each workload with a warm-up and several runs, and prints the
medians with min-max and run counts, beside the direct path (no tunnel).
See ``python -m benchmarks --help`` and docs/benchmarks.rst.
"""

from .main import main

__all__ = ["main"]
