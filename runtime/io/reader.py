"""The extent reader: parallel positional reads of byte ranges ("extents") from files.

Why its own reader: `mx.load` reads whole tensors, so it cannot stream one expert, and the page
cache would silently hold the model (the memory budget would lie). So:

- reads bypass the page cache: `O_DIRECT` on Linux, `F_NOCACHE` on macOS; a buffered mode too,
  because on some machines trusting the OS wins (measure, don't assume);
- `os.preadv` releases the GIL, so a small thread pool keeps several reads in flight;
- buffers are anonymous `mmap`s, which are page-aligned as `O_DIRECT` requires, and are reused:
  a fresh 7 MB mapping costs ~1700 page faults plus zeroing, which on the 2-core VM here capped
  warm reads at ~1 GB/s against ~11 GB/s into a reused buffer;
- extents of one file that sit next to each other (the bundle places experts that fire together
  side by side) are coalesced into one larger read;
- a batch with extents larger than a fair share (one layer's few 7 MB experts on 8 threads) is cut
  into one equal share per thread, so that all threads read until the batch is done;
- how a batch's bytes are shared among the threads is a setting (READ_ORDERS): one contiguous
  share per thread (the default), or sub-read-sized pieces that the threads take in turn, in
  layout order or shuffled, because a disk behind a network block store may read the same bytes
  faster in one pattern than another (measure: `moestream bench --compare order:NAME`);
- how many reads are in the disk at once can be capped below the threads (`queue_depth`): a thread
  leaves its slot while it checks and hands off what it read, and a spare thread takes the slot,
  so the disk sees a steady queue of that depth where one thread per read would leave it short
  by the threads' own work;
- a caller may hand in its own memory (`into`): the bytes then go straight there (scatter reads, the
  padding between coalesced extents read into scratch), so expert bytes are never copied.

Requests may start anywhere (e.g. inside a safetensors file): in direct mode the reader reads the
4096-aligned superset and hands back a memoryview of exactly the requested bytes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import sys
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from ...common.errors import MoestreamError
from .workers import shared_pool

ALIGN = 4096  # O_DIRECT needs 512; 4096 covers 4K-sector drives and is the page size
# One coalesced read is capped: a single huge syscall serialises on one thread and Linux
# caps one read at ~2 GiB anyway.
DEFAULT_MAX_READ_BYTES = 64 << 20
DEFAULT_MAX_OPEN_FILES = 64
# A batch is split across the threads in shares of at least this size: below it, one more
# syscall costs more than the parallelism wins.
DEFAULT_SPLIT_MIN_BYTES = 1 << 20
# Reads of checked extents are issued in pieces of this size, each checked as soon as it is in.
CHECKED_READ_BYTES = 1 << 20
# How a batch is shared among the threads: "shares", one contiguous share per thread (see _split);
# "pieces", pieces of checked_read_bytes taken in turn, in layout order; "shuffled", the same
# pieces taken in a random order. runtime/measure/ceiling.py reads the same orders bare
# (READ_PATTERNS), so that the runtime can be set to what a bare reader measured best.
READ_ORDERS = ("shares", "pieces", "shuffled")
_IOV_MAX = 512  # buffers per preadv (Linux allows 1024)
# Idle read buffers kept for reuse. Counted in the memory budget ("buffers"); about two layers of
# 8 routed 7 MB experts.
DEFAULT_POOL_BYTES = 128 << 20
IO_MODES = ("direct", "buffered")


def read_order_problem(order: str) -> str | None:
    """What is wrong with a read order (None: nothing): one wording for the reader and its options."""
    if order not in READ_ORDERS:
        return f"read_order must be one of {', '.join(READ_ORDERS)}, got {order!r}"
    return None


def queue_depth_problem(depth: int | None) -> str | None:
    """What is wrong with a queue depth (None: nothing): one wording for the reader and its options."""
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        return f"queue_depth must be a positive integer or None, got {depth!r}"
    return None


def default_threads() -> int:
    """I/O threads mostly wait on the device, not the CPU, so more threads than cores is fine;
    an NVMe drive wants a queue depth of a few reads of MBs to reach full speed. On the H200's
    virtio disk 8 decoded and prefilled faster than 2, 4, 6 or 16, although 4 sometimes read
    faster in a bare read test: each thread also checks and copies what it read, so it keeps
    fewer reads in flight than a bare reader with as many threads (a prefill at 4 took 1.16x a
    bare 4-thread reader's time for the same bytes, at 8 1.0x). Cap at 8."""
    return min(8, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class ReadRequest:
    path: str
    offset: int
    nbytes: int
    label: str = ""  # names the extent in errors, e.g. "layer 3 expert 17 (experts/layer_003.bin)"
    # Checked as the bytes arrive: an object with `block_bytes` and `check(index, view)` (raises
    # on a mismatch); each block of the request is checked by the thread that completes it.
    check: object | None = None


class ReadError(MoestreamError, IOError):
    """A request could not be satisfied: names the extent (label), the file, offset, wanted and
    got bytes, so a truncated or damaged bundle points at the bad row, not at a syscall."""

    def __init__(self, reason: str, *, label: str, path: str, offset: int, wanted: int, got: int):
        self.label, self.path, self.offset, self.wanted, self.got = label, path, offset, wanted, got
        super().__init__(
            f"{label or 'extent'}: {reason}: file {path}, offset {offset}, "
            f"wanted {wanted} bytes, got {got}"
        )


class ReaderClosedError(MoestreamError, ValueError):
    """A read was asked of a closed reader (its model was closed)."""


@dataclass
class _Handle:
    fd: int
    direct: bool  # O_DIRECT is set: offsets, lengths and buffers must be ALIGN-aligned
    verified: bool = False  # a direct read succeeded: a later EINVAL is a real error
    users: int = 0  # reads in flight; only idle handles are closed by the fd cache


@dataclass
class _Group:
    """One read: a range of one file covering one or more requests."""

    path: str
    start: int
    end: int
    members: list[tuple[int, ReadRequest]] = field(default_factory=list)  # (caller index, request)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each member's (aligned) file range
    # where the bytes go: (file offset, destination) covering [start, end) in order
    segments: list[tuple[int, memoryview]] = field(default_factory=list)
    buffer: mmap.mmap | None = None  # the pool buffer the members are views of (no targets)
    targets: list[memoryview] = field(default_factory=list)  # per member, when the caller gave targets
    scratch: list[mmap.mmap] = field(default_factory=list)  # gaps between targets, discarded
    pieces: int = 0  # pieces not yet read
    got: list[tuple[int, int, int]] = field(default_factory=list)  # (start, start + got, end) per piece read
    # bytes not yet read of each checked block: (member, block) -> bytes
    unread: dict[tuple[int, int], int] = field(default_factory=dict)
    failed: bool = False
    finished: bool = False


class TakenInTurn:
    """Items handed out one at a time to whichever thread asks next (one iterator, shared by the
    threads; the lock keeps two threads from taking the same item)."""

    def __init__(self, items: list):
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> Self:
        return self

    def __next__(self):
        with self._lock:
            return next(self._items)


@dataclass
class _CallTiming:
    """When one read call's last read returned and its last check ended (perf_counter); the time
    its threads spent checking, and inside the read syscalls (summed over threads)."""

    last_read_end: float = 0.0
    last_check_end: float = 0.0
    check_s: float = 0.0
    pread_s: float = 0.0


def plan_reads(spans: list[tuple[str, int, int]], coalesce_gap: int, max_read_bytes: int,
               separate: bool = False) -> list[tuple[str, int, int, list[int]]]:
    """How the reader turns byte ranges into reads: sorted by (file, offset), ranges that touch,
    overlap or lie within `coalesce_gap` of each other merge into one read of at most
    `max_read_bytes`. spans: (file, start, end) per request (in direct mode, already aligned).
    Returns (file, start, end, indices of the spans it covers) per read. `separate`: spans may not
    overlap within a read (each is read into its own target)."""
    reads: list[tuple[str, int, int, list[int]]] = []
    for i in sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1])):
        path, start, end = spans[i]
        if reads:
            p, s, e, members = reads[-1]
            if (p == path and start <= e + coalesce_gap and max(end, e) - s <= max_read_bytes
                    and not (separate and start < e)):
                reads[-1] = (p, s, max(e, end), members + [i])
                continue
        reads.append((path, start, end, [i]))
    return reads


def align_down(x: int) -> int:
    return x - x % ALIGN


def align_up(x: int) -> int:
    return align_down(x + ALIGN - 1)


def _open_direct(path: str) -> int:
    if hasattr(os, "O_DIRECT"):  # Linux
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if sys.platform == "darwin":  # macOS has no O_DIRECT; F_NOCACHE (48) is its equivalent
        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
    return fd


def _preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, bufs, offset)
    data = os.pread(fd, sum(len(b) for b in bufs), offset)  # platforms without preadv: one extra copy
    done = 0
    for b in bufs:
        n = min(len(b), len(data) - done)
        b[:n] = data[done : done + n]
        done += n
    return len(data)


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers after their first n bytes (what a partial scatter read left to fill)."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class _BufferPool:
    """Page-aligned read buffers, reused once every view handed out from them is gone.

    A memoryview cannot be weak-referenced, but the numpy array it is made from can: each
    request's view is `memoryview(numpy slice)`, and a finalizer on each slice returns the
    buffer when the last one dies. The buffer protocol keeps the slice alive as long as the view
    or anything made from it (np.frombuffer, view[a:b]) lives, so a buffer in use is never reused.
    """

    def __init__(self, max_idle_bytes: int):
        self.max_idle_bytes = max_idle_bytes
        self._free: list[mmap.mmap] = []
        self._idle_bytes = 0
        self.allocations = 0
        self.closed = False  # views outliving the reader must not refill its pool
        self._lock = threading.RLock()  # finalizers may run in any thread, even re-entrantly

    def take(self, n: int) -> mmap.mmap:
        with self._lock:
            fits = [b for b in self._free if n <= len(b) <= 2 * n + (1 << 20)]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                self._idle_bytes -= len(buf)
                return buf
            self.allocations += 1
        step = 1 << 20 if n > 1 << 20 else ALIGN  # round up so that near sizes share buffers
        return mmap.mmap(-1, -(-n // step) * step)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if not self.closed and self._idle_bytes + len(buf) <= self.max_idle_bytes:
                self._free.append(buf)
                self._idle_bytes += len(buf)
            # else: dropped; the mapping is unmapped when its last reference goes

    def views(self, buf: mmap.mmap, spans: list[tuple[int, int]]) -> list[memoryview]:
        """One view per (start, stop) of buf; buf goes back to the pool when all are gone."""
        whole = np.frombuffer(buf, dtype=np.uint8)
        left = [len(spans)]

        def release() -> None:
            with self._lock:
                left[0] -= 1
                if left[0] == 0:
                    self.give(buf)

        out = []
        for a, b in spans:
            part = whole[a:b]
            weakref.finalize(part, release).atexit = False
            out.append(memoryview(part))
        return out

    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._free.clear()
            self._idle_bytes = 0


class ExtentReader:
    """Reads lists of extents in parallel; see the module docstring.

    io_mode: "direct" (bypass the page cache; falls back to "buffered" per file where the
    filesystem refuses O_DIRECT, reported as io_mode_in_use) or "buffered".
    threads: read threads (default: default_threads()).
    coalesce_gap: extents of one file whose (aligned) ranges are at most this many bytes apart
    are read with one syscall, the gap read and discarded.
    max_read_bytes: no coalesced read grows past this. max_open_files: descriptors kept open.
    pool_bytes: idle read buffers kept for reuse. split_min_bytes: a batch is cut into one share
    per thread, each at least this large (a large extent is then read by several threads).
    """

    def __init__(
        self,
        io_mode: str = "direct",
        threads: int | None = None,
        coalesce_gap: int = 0,
        *,
        max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        pool_bytes: int = DEFAULT_POOL_BYTES,
        split_min_bytes: int = DEFAULT_SPLIT_MIN_BYTES,
    ):
        if io_mode not in IO_MODES:
            raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}")
        if coalesce_gap < 0 or max_read_bytes < ALIGN:
            raise ValueError("coalesce_gap must be >= 0 and max_read_bytes >= 4096")
        self.io_mode = io_mode
        self.io_mode_in_use = io_mode
        self.threads = threads or default_threads()
        self.coalesce_gap = coalesce_gap
        self.max_read_bytes = max_read_bytes
        self.max_open_files = max_open_files
        self.split_min_bytes = split_min_bytes
        self.checked_read_bytes = CHECKED_READ_BYTES  # the sub-read of a checked extent (see _work)
        self.read_order = "shares"  # see the property
        self.queue_depth = None  # see the property
        self._pool = shared_pool(self.threads)
        self._lock = threading.Lock()  # guards the fd cache and the stats
        self._files: OrderedDict[str, _Handle] = OrderedDict()
        self._buffers = _BufferPool(pool_bytes)
        self._closed = False
        self.reset_stats()

    @property
    def read_order(self) -> str:
        """How a read call's bytes are shared among the threads (READ_ORDERS; see _split)."""
        return self._read_order

    @read_order.setter
    def read_order(self, order: str) -> None:
        if problem := read_order_problem(order):
            raise ValueError(problem)
        self._read_order = order

    @property
    def queue_depth(self) -> int | None:
        """At most this many reads are inside a read syscall at once, whatever the threads (None:
        one per thread). With more threads than this, a thread that checks or hands off what it
        read has left its slot to another, so the disk is kept at this depth."""
        return self._queue_depth

    @queue_depth.setter
    def queue_depth(self, depth: int | None) -> None:
        if problem := queue_depth_problem(depth):
            raise ValueError(problem)
        self._queue_depth = depth
        self._slots = threading.BoundedSemaphore(depth) if depth is not None else None

    # ---- public API -------------------------------------------------------------------------

    def read(self, requests: list[ReadRequest], convert=None, into=None) -> list:
        """One memoryview per request, in order, exactly `nbytes` long. The views keep their
        buffer alive; it returns to the pool when the caller has dropped them all.

        With `convert(index, view)`, each request's view is converted in the I/O thread that
        completed it, as soon as all its bytes are in, and the results are returned instead:
        turning bytes into arrays then overlaps with the other reads instead of following them.

        With `into(needs) -> targets`, the bytes are read straight into the caller's memory (no
        copy): it is called once, with (request index, bytes needed) for each request with nbytes
        > 0 (bytes needed: its ALIGN-aligned span in direct mode, the request itself otherwise),
        and returns one writable buffer per need, at least that large (ALIGN-aligned in direct
        mode); the views handed out are slices of them."""
        if self._closed:
            raise ReaderClosedError("the expert reader is closed (the model was closed): load the model again")
        t0 = time.perf_counter()
        try:
            return self._read(requests, convert, into)
        finally:
            with self._lock:
                self._stats["io_wait_s"] += time.perf_counter() - t0
                self._stats["requests"] += len(requests)
                self._stats["requested_bytes"] += sum(r.nbytes for r in requests)

    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
        s["mean_read_bytes"] = s["bytes_read"] / s["reads"] if s["reads"] else 0.0
        s["io_mode"] = self.io_mode_in_use
        s["threads"] = self.threads
        s["buffer_pool_idle_bytes"] = self._buffers.idle_bytes()
        s["buffer_allocations"] = self._buffers.allocations
        return s

    def limit_idle_buffers(self, nbytes: int) -> None:
        """Keep at most nbytes of idle read buffers (what a memory budget allows for them)."""
        self._buffers.max_idle_bytes = nbytes

    def reset_stats(self) -> None:
        # check_s: time spent checking blocks, summed over threads; check_tail_s: of that, the
        # part after a call's last read returned (what checking adds to the call's time);
        # pread_s: time inside the reads themselves, summed over threads (over io_wait_s: how
        # many reads the threads kept in flight, on average, while a caller waited)
        self._stats = {"bytes_read": 0, "reads": 0, "io_wait_s": 0.0, "requested_bytes": 0,
                       "requests": 0, "check_s": 0.0, "check_tail_s": 0.0, "pread_s": 0.0}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # reads are synchronous: none is in flight once the caller closes
        with self._lock:
            for h in self._files.values():
                os.close(h.fd)
            self._files.clear()
        self._buffers.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- planning ---------------------------------------------------------------------------

    def _read(self, requests: list[ReadRequest], convert=None, into=None) -> list:
        for r in requests:
            if r.offset < 0 or r.nbytes < 0:
                raise ValueError(f"{r.label or r.path}: negative offset or size in {r}")
        out: list = [memoryview(b"")] * len(requests)
        groups = self._plan(requests, separate=into is not None)
        try:
            if into is not None:
                self._give_targets(groups, into)
            else:
                for g in groups:
                    g.buffer = self._buffers.take(g.end - g.start)
                    g.segments = [(g.start, memoryview(g.buffer)[: g.end - g.start])]
            work = self._split(groups)
            timing = _CallTiming()
            if len(work) == 1:  # no pool hand-off for a single worker's share
                results = [self._work(work[0], convert, timing)]
            else:
                futures = [self._pool.submit(self._work, w, convert, timing) for w in work]
                wait(futures)  # let every read finish before raising, so none outlives the call
                results = [f.result() for f in futures]
            with self._lock:
                self._stats["check_s"] += timing.check_s
                self._stats["pread_s"] += timing.pread_s
                self._stats["check_tail_s"] += max(0.0, timing.last_check_end - timing.last_read_end)
        finally:
            for g in groups:
                if not g.finished:  # failed or never read: its buffers are not handed out
                    self._drop_group(g)
        for members in results:
            for i, value in members:
                out[i] = value
        return out

    def _span(self, r: ReadRequest) -> tuple[int, int]:
        # Opening here (not in the worker) tells us whether the file fell back to buffered
        # at open, so its reads carry no alignment padding; a missing file fails early.
        h = self._acquire(r)
        self._release(h, 0, 0)
        if h.direct:
            return align_down(r.offset), align_up(r.offset + r.nbytes)
        return r.offset, r.offset + r.nbytes

    def _plan(self, requests: list[ReadRequest], separate: bool = False) -> list[_Group]:
        """The reads for `requests` (see plan_reads), as groups to fill."""
        live = [i for i, r in enumerate(requests) if r.nbytes]
        spans = [(requests[i].path, *self._span(requests[i])) for i in live]
        groups = []
        for path, start, end, members in plan_reads(spans, self.coalesce_gap, self.max_read_bytes, separate):
            g = _Group(path, start, end)
            for m in members:
                r = requests[live[m]]
                if r.check is not None:
                    block = r.check.block_bytes
                    for k in range(-(-r.nbytes // block)):
                        g.unread[(len(g.members), k)] = min(block, r.nbytes - k * block)
                g.members.append((live[m], r))
                g.spans.append(spans[m][1:])
            groups.append(g)
        return groups

    def _give_targets(self, groups: list[_Group], into) -> None:
        """Ask the caller for one target per request (one batch call) and lay each group's
        range out as [target, gap scratch, target ...], read with scatter reads."""
        members = [(g, k) for g in groups for k in range(len(g.members))]
        sizes = [g.spans[k][1] - g.spans[k][0] for g, k in members]
        targets = into([(g.members[k][0], size) for (g, k), size in zip(members, sizes, strict=True)])
        if len(targets) != len(sizes):
            raise ValueError(f"into() returned {len(targets)} targets for {len(sizes)} requests")
        for (g, k), size, t in zip(members, sizes, targets, strict=True):
            t = memoryview(t).cast("B")
            if len(t) < size or t.readonly:
                raise ValueError(f"target for {g.members[k][1].label or g.path} must be writable and hold {size} bytes")
            g.targets.append(t[:size])
        for g in groups:
            cursor = g.start
            for (start, end), t in zip(g.spans, g.targets, strict=True):
                if start > cursor:  # the padding between extents, read and discarded
                    scratch = self._buffers.take(start - cursor)
                    g.scratch.append(scratch)
                    g.segments.append((cursor, memoryview(scratch)[: start - cursor]))
                if self._direct(g) and _address(t) % ALIGN:
                    raise ValueError(f"target for {g.path} at offset {start} is not {ALIGN}-byte aligned")
                g.segments.append((start, t))
                cursor = end

    def _direct(self, g: _Group) -> bool:
        with self._lock:
            h = self._files.get(g.path)
            return h is not None and h.direct

    def _split(self, groups: list[_Group]):
        """Who reads what: one iterable of (group, start, end) pieces per worker thread.

        With read_order "pieces" or "shuffled", every group is cut into pieces of
        checked_read_bytes, which all workers take in turn from one shared iterator (in layout
        order, or shuffled), so neighbouring pieces are in flight on different threads at once.
        Otherwise (the default, "shares"):

        Where some group is larger than a fair share of the batch (a few 7 MB experts on 8
        threads), the groups are laid end to end and cut into one equal share per thread (at ALIGN
        boundaries, each at least split_min_bytes), so that every thread reads until the batch is
        done instead of a few large extents keeping a few threads busy while the others idle.
        Otherwise each group is one piece, and the pool balances them."""
        if self.read_order != "shares":
            step = max(ALIGN, self.checked_read_bytes // ALIGN * ALIGN)
            pieces = [(g, a, min(g.end, a + step)) for g in groups for a in range(g.start, g.end, step)]
            if self.read_order == "shuffled":
                random.shuffle(pieces)
            for g, _, _ in pieces:
                g.pieces += 1
            taken = TakenInTurn(pieces)
            return [taken] * min(self.threads, len(pieces))
        total = sum(g.end - g.start for g in groups)
        n = min(self.threads, total // max(self.split_min_bytes, 1))
        if n < 2 or max(g.end - g.start for g in groups) * self.threads <= total:
            work = [[(g, g.start, g.end)] for g in groups]
        else:
            share = align_up(-(-total // n))
            work, room = [[]], share
            for g in groups:
                a = g.start
                while a < g.end:
                    if room < ALIGN:
                        work.append([])
                        room = share
                    take = min(g.end - a, room // ALIGN * ALIGN)
                    work[-1].append((g, a, a + take))
                    room -= take
                    a += take
        for w in work:
            for g, _, _ in w:
                g.pieces += 1
        return [w for w in work if w]

    def _work(self, pieces, convert, timing: _CallTiming) -> list[tuple[int, object]]:
        """Read this thread's pieces; finish (views, convert) each group whose last piece it read."""
        out = []
        for g, a, b in pieces:
            # A checked piece is read in sub-reads of checked_read_bytes, each checked at once: the
            # thread's hashing then trails its last sub-read, not its whole share.
            step = self.checked_read_bytes if g.unread else b - a
            lo = a
            while lo < b:
                hi = min(b, lo + step)
                try:
                    with self._slots or nullcontext():
                        t_read = time.perf_counter()
                        got = self._read_piece(g, lo, hi)
                        t0 = time.perf_counter()
                    with self._lock:
                        timing.pread_s += t0 - t_read
                        g.got.append((lo, lo + got, hi))
                        complete = self._completed_blocks(g, lo, lo + got) if g.unread else []
                        timing.last_read_end = max(timing.last_read_end, t0)
                    for k, index, start, end in complete:
                        g.members[k][1].check.check(index, self._bytes(g, k, start, end))
                except BaseException:
                    with self._lock:
                        g.failed = True
                    raise
                if complete:
                    t1 = time.perf_counter()
                    with self._lock:
                        timing.check_s += t1 - t0
                        timing.last_check_end = max(timing.last_check_end, t1)
                if got < hi - lo:
                    break  # the file ended: the group's finish reports the short read
                lo = hi
            with self._lock:  # counted once its blocks are checked: the group finishes after every check
                g.pieces -= 1
                last = g.pieces == 0 and not g.failed
            if last:
                out.extend(self._finish(g, convert))
        return out

    @staticmethod
    def _completed_blocks(g: _Group, a: int, b: int) -> list[tuple[int, int, int, int]]:
        """Count the file range [a, b) as read; the checked blocks it completes, as (member, block
        index, start, end) with file ranges. Called under the lock."""
        done = []
        for k, (_, r) in enumerate(g.members):
            lo, hi = max(a, r.offset), min(b, r.offset + r.nbytes)
            if r.check is None or lo >= hi:
                continue
            block = r.check.block_bytes
            for index in range((lo - r.offset) // block, (hi - 1 - r.offset) // block + 1):
                start = r.offset + index * block
                end = min(start + block, r.offset + r.nbytes)
                g.unread[(k, index)] -= min(hi, end) - max(lo, start)
                if g.unread[(k, index)] == 0:
                    done.append((k, index, start, end))
        return done

    @staticmethod
    def _bytes(g: _Group, k: int, lo: int, hi: int) -> memoryview:
        """Member k's bytes at file range [lo, hi), where they were read to."""
        if g.buffer is not None:
            return memoryview(g.buffer)[lo - g.start : hi - g.start]
        start = g.spans[k][0]
        return g.targets[k][lo - start : hi - start]

    def _read_piece(self, g: _Group, a: int, b: int) -> int:
        bufs = []
        for off, view in g.segments:
            lo, hi = max(a, off), min(b, off + len(view))
            if lo < hi:
                bufs.append(view[lo - off : hi - off])
        h = self._acquire(g.members[0][1])
        got = calls = 0
        try:
            got, calls = self._fill(h, g, bufs, a)
        finally:
            self._release(h, got, calls)
        return got

    def _finish(self, g: _Group, convert) -> list[tuple[int, object]]:
        """Check every member arrived, then hand out its bytes (converted in this thread)."""
        valid = g.start  # bytes known good, contiguously from the group's start
        for a, end, b in sorted(g.got):
            if a > valid:
                break
            valid = max(valid, end)
            if end < b:
                break
        try:
            self._check_complete(g, valid - g.start)
            if g.buffer is not None:
                spans = [(r.offset - g.start, r.offset - g.start + r.nbytes) for _, r in g.members]
                views = self._buffers.views(g.buffer, spans)
            else:
                views = [t[r.offset - s : r.offset - s + r.nbytes]
                         for (_, r), (s, _), t in zip(g.members, g.spans, g.targets, strict=True)]
            g.finished = True
            for buf in g.scratch:
                self._buffers.give(buf)
            g.scratch = []
        except BaseException:
            self._drop_group(g)
            raise
        return [(i, convert(i, v) if convert else v) for (i, _), v in zip(g.members, views, strict=True)]

    def _drop_group(self, g: _Group) -> None:
        g.finished = True
        for buf in g.scratch + ([g.buffer] if g.buffer is not None else []):
            self._buffers.give(buf)
        g.scratch, g.buffer = [], None

    # ---- one read ---------------------------------------------------------------------------

    def _fill(self, h: _Handle, g: _Group, bufs: list[memoryview], offset: int) -> tuple[int, int]:
        """Scatter-read [offset, offset + len(bufs)) until full or the file ends; returns
        (bytes got, syscalls)."""
        length = sum(len(b) for b in bufs)
        got = calls = 0
        while got < length:
            was_direct = h.direct
            rest = _skip(bufs, got)[:_IOV_MAX]
            try:
                calls += 1
                n = _preadv(h.fd, rest, offset + got)
            except OSError as e:
                if e.errno == errno.EINVAL and was_direct and not h.verified:
                    self._fall_back(h)  # the filesystem refuses O_DIRECT: retry buffered
                    continue
                r = g.members[0][1]
                raise ReadError(e.strerror or str(e), label=r.label, path=g.path,
                                offset=r.offset, wanted=r.nbytes, got=0) from e
            h.verified = h.verified or was_direct
            if n == 0:
                break  # end of file
            got += n
            if h.direct and got % ALIGN:
                break  # O_DIRECT only returns a partial block at end of file
        return got, calls

    def _check_complete(self, g: _Group, got: int) -> None:
        for _, r in g.members:
            have = g.start + got - r.offset  # bytes of this request that arrived
            if have < r.nbytes:
                raise ReadError("short read (file truncated?)", label=r.label, path=g.path,
                                offset=r.offset, wanted=r.nbytes, got=max(0, have))

    # ---- file descriptors -------------------------------------------------------------------

    def _acquire(self, r: ReadRequest) -> _Handle:
        with self._lock:
            h = self._files.get(r.path)
            if h is None:
                h = self._open(r)
                self._files[r.path] = h
            self._files.move_to_end(r.path)
            h.users += 1
            self._close_idle()
            return h

    def _release(self, h: _Handle, got: int, calls: int) -> None:
        with self._lock:
            h.users -= 1
            self._stats["bytes_read"] += got
            self._stats["reads"] += calls

    def _open(self, r: ReadRequest) -> _Handle:
        try:
            if self.io_mode == "direct":
                try:
                    return _Handle(_open_direct(r.path), direct=hasattr(os, "O_DIRECT"))
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.io_mode_in_use = "buffered"  # filesystem refuses O_DIRECT at open
            return _Handle(os.open(r.path, os.O_RDONLY | os.O_CLOEXEC), direct=False)
        except OSError as e:
            raise ReadError(f"cannot open ({e.strerror or e})", label=r.label, path=r.path,
                            offset=r.offset, wanted=r.nbytes, got=0) from e

    def _fall_back(self, h: _Handle) -> None:
        """Clear O_DIRECT on the open descriptor (Linux allows it via F_SETFL), so threads
        already holding this handle keep a valid fd."""
        with self._lock:
            if h.direct:
                flags = fcntl.fcntl(h.fd, fcntl.F_GETFL)
                fcntl.fcntl(h.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                h.direct = False
                self.io_mode_in_use = "buffered"

    def _close_idle(self) -> None:
        """Keep at most max_open_files descriptors; never close one a read is using."""
        excess = len(self._files) - self.max_open_files
        if excess <= 0:
            return
        for path in [p for p, h in self._files.items() if h.users == 0][:excess]:
            os.close(self._files.pop(path).fd)
