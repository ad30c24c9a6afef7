"""The disk's read ceiling, measured the way ../shared/tools/iobench.py does (O_DIRECT, random
aligned offsets, a thread pool, fixed duration), but over existing files (a bundle's expert
files) at the read size and thread count the runtime actually uses."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096


def read_ceiling(paths: list[Path], chunk: int, threads: int, seconds: float = 3.0, direct: bool = True) -> dict:
    """Random-offset reads of `chunk` bytes (rounded up to 4 KiB) from `paths` for `seconds`."""
    chunk = max(ALIGN, (chunk + ALIGN - 1) // ALIGN * ALIGN)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    files = []
    for p in paths:
        size = os.path.getsize(p) // ALIGN * ALIGN
        if size >= chunk:
            files.append((os.open(p, flags), size))
    if not files:
        raise ValueError(f"no file among {len(paths)} is at least {chunk} bytes")
    done = [0] * threads
    calls = [0] * threads
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        buf = mmap.mmap(-1, chunk)
        while time.perf_counter() < deadline:
            fd, size = files[rng.randrange(len(files))]
            off = rng.randrange((size - chunk) // ALIGN + 1) * ALIGN
            done[i] += os.preadv(fd, [buf], off)
            calls[i] += 1

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
    finally:
        for fd, _ in files:
            os.close(fd)
    elapsed = time.perf_counter() - start
    return {"chunk_bytes": chunk, "threads": threads, "direct": direct, "seconds": elapsed,
            "bytes": sum(done), "reads": sum(calls), "gb_per_s": sum(done) / elapsed / 1e9}


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
