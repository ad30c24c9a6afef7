"""The disk's read ceiling: O_DIRECT reads of one size, at random aligned offsets or in sequence, from
a thread pool for a fixed time, over existing files (a bundle's expert files), at the read sizes and
thread counts the runtime uses; and the time to read given extents once (read_extents)."""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..io.reader import ALIGN, READ_ORDERS, TakenInTurn


def read_ceiling(paths: list[Path], chunk: int, threads: int, seconds: float = 3.0, direct: bool = True,
                 sequential: bool = False) -> dict:
    """Reads of `chunk` bytes (rounded up to 4 KiB) from `paths` for `seconds`: at random aligned
    offsets, or (sequential) each thread on through its own stretch of the files laid end to end,
    from evenly spaced starts, wrapping around: how a long prefill reads its layers' experts. Each
    call reads other offsets than the last (fresh random ones, starts moved by a random amount), so
    that a disk or host that caches what was just read cannot serve a repeated trial from memory."""
    chunk = max(ALIGN, (chunk + ALIGN - 1) // ALIGN * ALIGN)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    files = []
    for p in paths:
        size = os.path.getsize(p) // ALIGN * ALIGN
        if size >= (ALIGN if sequential else chunk):  # in sequence, a read stops at a file's end
            files.append((os.open(p, flags), size))
    if not files:
        raise ValueError(f"no file among {len(paths)} is at least {ALIGN if sequential else chunk} bytes")
    starts = list(itertools.accumulate((size for _, size in files), initial=0))  # the files end to end
    total = starts[-1]
    done = [0] * threads
    calls = [0] * threads
    shift = random.randrange(total // ALIGN) * ALIGN
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        rng = random.Random()
        buf = mmap.mmap(-1, chunk)
        pos = (shift + total * i // threads // ALIGN * ALIGN) % total
        while time.perf_counter() < deadline:
            if sequential:
                k = bisect.bisect_right(starts, pos) - 1
                (fd, size), off = files[k], pos - starts[k]
                n = min(chunk, size - off)
                done[i] += os.preadv(fd, [memoryview(buf)[:n]], off)
                pos = (pos + n) % total
            else:
                fd, size = files[rng.randrange(len(files))]
                off = rng.randrange((size - chunk) // ALIGN + 1) * ALIGN
                done[i] += os.preadv(fd, [buf], off)
            calls[i] += 1

    elapsed = _run_threads(worker, threads, [fd for fd, _ in files])
    return {"chunk_bytes": chunk, "threads": threads, "direct": direct, "sequential": sequential, "seconds": elapsed,
            "bytes": sum(done), "reads": sum(calls), "gb_per_s": sum(done) / elapsed / 1e9}


def read_ceiling_rounds(paths: list[Path], cells: list[tuple[int, int, bool]], rounds: int = 3,
                        seconds: float = 1.0) -> list[dict]:
    """Each cell, (chunk, threads, sequential), read for `seconds` once per round, the cells taking
    turns within a round: a disk whose rate moves by tens of percent from one second to the next and
    drifts over minutes then treats every cell alike. Per cell: its windows' rates, its sustained
    rate (all its bytes over all its seconds), which is what a reader gets over a run of many
    windows, and its best window, a burst that the best of more windows would only raise."""
    out = [{"chunk_bytes": chunk, "threads": threads, "direct": True, "sequential": sequential, "windows": [],
            "bytes": 0, "seconds": 0.0} for chunk, threads, sequential in cells]
    for _ in range(rounds):
        for (chunk, threads, sequential), cell in zip(cells, out, strict=True):
            t = read_ceiling(paths, chunk, threads, seconds=seconds, sequential=sequential)
            cell["chunk_bytes"] = t["chunk_bytes"]
            cell["windows"].append(t["gb_per_s"])
            cell["bytes"] += t["bytes"]
            cell["seconds"] += t["seconds"]
    for cell in out:
        cell["gb_per_s"] = cell["bytes"] / max(cell["seconds"], 1e-12) / 1e9
        cell["best_window_gb_per_s"] = max(cell["windows"], default=0.0)
    return out


# How read_extents shares the bytes among its threads: the reader's own orders, read bare.
# "shares", one contiguous share per thread, each read in order (a sequential stream per thread);
# "pieces", piece-sized reads taken in turn (neighbouring pieces on different threads); "shuffled",
# the same pieces taken in a random order (the random-read ceiling's pattern, over exactly these
# bytes: whether the disk reads a prefill's bytes faster out of order than in layout order)
READ_PATTERNS = READ_ORDERS


def read_extents(ranges: list[tuple[Path, int, int]], threads: int, piece: int = 1 << 20,
                 pattern: str = "pieces") -> dict:
    """Read each (path, offset, nbytes) range once, O_DIRECT, in the order given: ranges that touch
    are joined, then read in `piece`-byte reads by `threads` threads, shared as `pattern` says
    (READ_PATTERNS). The time a reader that does nothing else needs for exactly these bytes, on the
    disk as it is now."""
    if pattern not in READ_PATTERNS:
        raise ValueError(f"pattern must be one of {READ_PATTERNS}, got {pattern!r}")
    piece = max(ALIGN, piece // ALIGN * ALIGN)
    joined: list[list] = []
    for path, offset, nbytes in ranges:
        start, end = offset // ALIGN * ALIGN, -(-(offset + nbytes) // ALIGN) * ALIGN
        if joined and joined[-1][0] == path and joined[-1][2] >= start:
            joined[-1][2] = max(joined[-1][2], end)
        else:
            joined.append([path, start, end])
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    fds = {p: os.open(p, flags) for p in {j[0] for j in joined}}
    if pattern in ("pieces", "shuffled"):
        pieces = [(fds[p], off, min(piece, end - off)) for p, start, end in joined for off in range(start, end, piece)]
        if pattern == "shuffled":
            random.shuffle(pieces)
        work = [TakenInTurn(pieces)] * threads
    else:
        work = [iter(share) for share in _shares([(fds[p], start, end) for p, start, end in joined], threads, piece)]
    done = [0] * threads

    def worker(i: int) -> None:
        buf = mmap.mmap(-1, piece)
        for fd, off, n in work[i]:
            done[i] += os.preadv(fd, [memoryview(buf)[:n]], off)

    elapsed = _run_threads(worker, threads, list(fds.values()))
    return {"piece_bytes": piece, "threads": threads, "pattern": pattern, "seconds": elapsed, "bytes": sum(done),
            "gb_per_s": sum(done) / elapsed / 1e9}


def _shares(ranges: list[tuple[int, int, int]], threads: int, piece: int) -> list[list[tuple[int, int, int]]]:
    """(fd, start, end) ranges laid end to end and cut into `threads` contiguous shares at ALIGN
    bounds; each share as its (fd, offset, nbytes) reads of at most `piece` bytes, in order."""
    total = sum(end - start for _, start, end in ranges)
    share = -(-total // max(threads, 1) // ALIGN) * ALIGN or ALIGN
    out: list[list] = [[] for _ in range(threads)]
    i, room = 0, share
    for fd, start, end in ranges:
        off = start
        while off < end:
            if room == 0 and i < threads - 1:
                i, room = i + 1, share
            n = min(piece, end - off, room if i < threads - 1 else end - off)
            out[i].append((fd, off, n))
            off += n
            room = max(0, room - n)
    return out


def _run_threads(worker, threads: int, fds: list[int]) -> float:
    """worker(i) for i in range(threads), each on its own thread; the seconds they took. The files
    are closed afterwards, whatever happened."""
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
    finally:
        for fd in fds:
            os.close(fd)
    return time.perf_counter() - start
