"""Process settings for a server holding thousands of tunnels: the
interpreter's switch interval, the open-files limit, the thread cap and
stack size, the listen backlog.

``remotedialer server`` applies them at start; under gunicorn, call
:func:`tune_interpreter_for_many_threads` from the ``post_worker_init`` hook
(docs/deployment.rst). Linux (POSIX) calls with fallbacks: nothing here
fails where ``resource`` is missing.
"""

from __future__ import annotations

import sys

__all__ = [
    "DEFAULT_MAX_THREADS",
    "RESERVED_DESCRIPTORS",
    "THREAD_STACK_SIZE",
    "SWITCH_INTERVAL",
    "LISTEN_BACKLOG",
    "tune_interpreter_for_many_threads",
    "raise_open_files_limit",
    "default_max_threads",
]

#: Threads the built-in server may run at once when the descriptor limit is
#: unknown: one per tunnel plus one per request in flight. Further connections
#: wait to be accepted. See :func:`default_max_threads`.
DEFAULT_MAX_THREADS = 1024

#: Descriptors kept free for everything that is not a request's socket
#: (listeners, log files, dials through tunnels...) when sizing the thread cap.
RESERVED_DESCRIPTORS = 256

#: Stack reserved per request thread (``threading.stack_size``). A tunnel's
#: reader touches about 12 KiB of it; 8 MiB (the usual default) only costs
#: address space, but 10,000 tunnels would reserve 80 GiB of it.
THREAD_STACK_SIZE = 1024 * 1024

#: ``sys.setswitchinterval`` of a server process. Every thread waiting for
#: the GIL wakes up once per interval; with thousands of tunnel threads the
#: default 5 ms meant a million futex wake-ups a second, and past ~6,000
#: tunnels the server stopped accepting and answering pings. 50 ms carried
#: 10,000 tunnels for 75 s but fell behind in a 5-minute hold on a loaded
#: machine (pongs up to 233 s late); 0.5 s held 10,000 for 3 minutes with
#: every pong within 0.4 s. The threads are I/O-bound and release the GIL on
#: every socket call, so a longer interval only delays the neighbours of a
#: CPU-bound request (1 KiB GETs with 3,000 idle tunnels were no slower).
SWITCH_INTERVAL = 0.5


def tune_interpreter_for_many_threads() -> None:
    """Set :data:`SWITCH_INTERVAL` (if the interval is still shorter), as
    ``remotedialer server`` does at start; under gunicorn, call it from the
    ``post_worker_init`` hook (docs/deployment.rst)."""
    if sys.getswitchinterval() < SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


#: Connections waiting in the listen queue (the kernel caps it at somaxconn):
#: werkzeug's 128 overflowed when agents reconnected all at once.
LISTEN_BACKLOG = 4096


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (as Go programs do at
    start); return the soft limit now in force (0: unknown or unlimited)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # pragma: no cover - e.g. macOS caps at OPEN_MAX
            pass
    return 0 if soft == resource.RLIM_INFINITY else int(soft)


def default_max_threads(open_files: int) -> int:
    """The thread cap for a process allowed ``open_files`` descriptors: each
    tunnel and each request holds one descriptor and one thread, so a cap
    below the descriptor limit only stops tunnels that could be served
    (about 31-35 KiB of RSS each, see docs/deployment.rst)."""
    if open_files <= 0:
        return DEFAULT_MAX_THREADS
    return max(64, open_files - RESERVED_DESCRIPTORS)
