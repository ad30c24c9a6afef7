"""Hold memory away from the page cache, so that a buffered-I/O run competes on equal memory.

A run that trusts the OS page cache (io mode "buffered") is otherwise given every free byte of
the machine for caching experts, while our expert cache gets only what the budget leaves it: on a
machine with more RAM than the model, the page cache "wins" by holding everything. To race them
fairly, a helper process takes all available memory but what the budget would give the cache
(anonymous pages, populated and locked where allowed), for the length of the run, and gives it
back when the run ends. Linux only: elsewhere there is no MemAvailable to aim at, and the run says
that it was not held.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
# what the kernel needs for itself, other processes' growth and the run's own activations beyond
# its plan: held back from the holder so that holding never pushes the machine into the OOM killer
SAFETY_BYTES = 512 << 20

# The holder: map anonymous memory with its pages populated, try to lock it (no swap-out), say
# "held N locked|unlocked", then wait until the parent closes stdin or kills it.
_HOLDER = r"""
import ctypes, mmap, sys
n = int(sys.argv[1])
buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
if not getattr(mmap, "MAP_POPULATE", 0):
    for i in range(0, n, mmap.PAGESIZE):
        buf[i] = 1
libc = ctypes.CDLL(None, use_errno=True)
libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
locked = libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) == 0
print("held", n, "locked" if locked else "unlocked", flush=True)
sys.stdin.read()
"""


@dataclass
class Held:
    """What a hold did: bytes taken (0: none), whether they were locked, and why not held if not."""

    bytes: int = 0
    locked: bool = False
    available_before: int | None = None
    available_during: int | None = None
    why_not: str | None = None
    pid: int | None = None  # the holding process, while it holds

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextmanager
def leave_available(target_bytes: int):
    """Hold memory so that about `target_bytes` stay available for the page cache and the run's
    growth, for the duration of the block. Yields a Held describing what was done."""
    before = mem_available()
    if before is None:
        yield Held(why_not="no /proc/meminfo: the page cache may use all free memory")
        return
    hold = before - target_bytes - SAFETY_BYTES
    if hold <= 0:
        yield Held(available_before=before, why_not="already no more than the target available")
        return
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(hold)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "held":
            yield Held(available_before=before, why_not=f"the holder did not start (exit {proc.poll()})")
            return
        time.sleep(2.0)  # the kernel folds its per-CPU counters into MemAvailable about once a second
        yield Held(int(line[1]), line[2] == "locked", before, mem_available(), pid=proc.pid)
    finally:
        proc.kill()
        proc.wait()
