"""The disk's read ceiling: O_DIRECT reads of one size at random aligned offsets from a thread pool
for a fixed time, over existing files (a bundle's expert files), at the read size and thread count
the runtime actually uses."""

from __future__ import annotations

import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..io.reader import ALIGN


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
