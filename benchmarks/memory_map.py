"""What a server's RSS is made of, from ``/proc/PID/smaps`` (Linux): the
touched part of its threads' C stacks, of CPython's per-thread frame stacks,
and the rest (Python objects, buffers, the interpreter itself).

* **thread stacks**: anonymous mappings of exactly the stack size
  ``remotedialer server`` gives its threads
  (:data:`remotedialer.server.process.THREAD_STACK_SIZE`) right above their
  guard page (an adjacent ``---p`` mapping): CPython's object arenas are
  1 MiB anonymous mappings too (3.10 and later), without a guard;
* **frame stacks**: anonymous 16 KiB mappings, the first chunk of the stack
  CPython (3.11 and later) keeps each thread's Python frames on;
* **the rest**: everything else resident.

Measured on a parked 10,000-agent server, a tunnel held 12.6 KiB of C stack,
8.0 KiB of frame stack and about 15 KiB of the rest (docs/benchmarks.rst,
"What a parked tunnel holds"; object arenas were still counted as stacks).
``python -m benchmarks.memory_map PID`` prints one process's figures.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

from remotedialer.server.process import THREAD_STACK_SIZE

__all__ = ["FRAME_STACK_CHUNK", "KINDS", "MemoryMap", "memory_map", "parse_smaps", "main"]

#: Size of the first chunk of CPython's per-thread frame stack (3.11+).
FRAME_STACK_CHUNK = 16 * 1024

THREAD_STACKS, FRAME_STACKS, REST = "thread stacks", "frame stacks", "the rest"
#: The kinds of resident memory told apart, in table order.
KINDS = (THREAD_STACKS, FRAME_STACKS, REST)

_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass(frozen=True)
class MemoryMap:
    """Resident bytes and mapping counts of one process, by kind (:data:`KINDS`)."""

    rss_bytes: Dict[str, int]
    mappings: Dict[str, int]

    def per(self, other: "MemoryMap", count: int) -> Dict[str, float]:
        """KiB per item of each kind grown from ``other`` (a reading before
        ``count`` items, e.g. tunnels, were added) to this reading."""
        return {kind: (self.rss_bytes[kind] - other.rss_bytes[kind]) / max(count, 1) / 1024 for kind in KINDS}


def _kind(size: int, name: str, stack_size: int, guarded: bool) -> str:
    if name:
        return REST
    if size == stack_size and guarded:
        return THREAD_STACKS
    if size == FRAME_STACK_CHUNK:
        return FRAME_STACKS
    return REST


def parse_smaps(lines: Iterable[str], stack_size: int = THREAD_STACK_SIZE) -> MemoryMap:
    """:class:`MemoryMap` from the text of ``/proc/PID/smaps``."""
    rss = dict.fromkeys(KINDS, 0)
    mappings = dict.fromkeys(KINDS, 0)
    kind: Optional[str] = None
    guard_end = -1  # where the last anonymous no-access mapping (a guard page) ends
    for line in lines:
        match = _MAPPING.match(line)
        if match:
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            name = match.group(4).strip()
            kind = _kind(end - start, name, stack_size, guarded=start == guard_end)
            guard_end = end if match.group(3) == "---p" and not name else -1
            mappings[kind] += 1
        elif line.startswith("Rss:") and kind is not None:
            rss[kind] += int(line.split()[1]) * 1024
    return MemoryMap(rss, mappings)


def memory_map(pid: int, stack_size: int = THREAD_STACK_SIZE) -> Optional[MemoryMap]:
    """The :class:`MemoryMap` of process ``pid``; None where there is no
    ``/proc/PID/smaps`` (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as handle:
            return parse_smaps(handle, stack_size)
    except OSError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m benchmarks.memory_map PID", file=sys.stderr)
        return 2
    found = memory_map(int(args[0]))
    if found is None:
        print(f"no /proc/{args[0]}/smaps", file=sys.stderr)
        return 1
    for kind in KINDS:
        print(f"{kind:14s} {found.rss_bytes[kind] / (1 << 20):9.1f} MiB in {found.mappings[kind]} mappings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
