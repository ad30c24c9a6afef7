"""The OS page cache, for honest cold starts and budgets: evict a file's cached pages, and count how
many of them are cached."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def evict_page_cache(paths: list[Path]) -> None:
    """Drop the files' cached pages (cold-start runs), after writing back any dirty ones (the
    kernel keeps dirty pages whatever it is advised)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def page_cache_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files resident in the page cache (mincore), None where it can't tell."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    total = 0
    for p in paths:
        size = Path(p).stat().st_size
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * -(-size // page))()
            rc = libc.mincore(addr, size, vec)
            libc.munmap(addr, size)
            if rc != 0:
                return None
            total += sum(b & 1 for b in vec) * page
        finally:
            os.close(fd)
    return total
