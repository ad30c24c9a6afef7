"""Extent reader throughput: direct vs buffered (cold and warm page cache) for 1/2/4/8 threads.

The first row, raw-direct, is bare O_DIRECT preadv into per-thread reused buffers, as iobench.py
does: the ceiling the reader's own overhead (planning, buffers, views) is measured against.

Writes a file of 7 MB extents at 16 KiB-aligned offsets (as the bundle writer places them), then
reads every extent once per pass, in random order, in batches of --batch (one layer's routed
experts per read() call). Compare with /work/shared/tools/iobench.py, the raw O_DIRECT ceiling.

usage: python bench/reader_bench.py [--path /var/tmp/moestream_reader_bench.bin] [--size-gib 1]
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from moestream.runtime.iobench import evict_page_cache
from moestream.runtime.reader import ExtentReader, ReadRequest

STRIDE_ALIGN = 16 * 1024


def write_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    block = os.urandom(64 << 20)  # incompressible, so no layer below can cheat
    with open(path, "wb") as f:
        f.writelines(block[: size - done] for done in range(0, size, len(block)))
        f.flush()
        os.fsync(f.fileno())




def page_cache_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def extents(path: str, size: int, extent: int) -> list[ReadRequest]:
    stride = -(-extent // STRIDE_ALIGN) * STRIDE_ALIGN
    return [ReadRequest(path, off, extent, f"extent {i}")
            for i, off in enumerate(range(0, size - extent + 1, stride))]


def one_pass(mode: str, threads: int, reqs: list[ReadRequest], batch: int, seed: int) -> dict:
    order = reqs[:]
    random.Random(seed).shuffle(order)
    cache0 = page_cache_bytes()
    with ExtentReader(mode, threads=threads) as reader:
        t0 = time.perf_counter()
        for i in range(0, len(order), batch):
            views = reader.read(order[i : i + batch])
            del views  # the runtime copies into mx arrays here; buffers are freed
        wall = time.perf_counter() - t0
        s = reader.stats()
    s["gbps"] = s["requested_bytes"] / wall / 1e9
    s["cache_growth_mb"] = (page_cache_bytes() - cache0) / 1e6
    return s


def raw_pass(threads: int, reqs: list[ReadRequest], seed: int) -> dict:
    order = reqs[:]
    random.Random(seed).shuffle(order)
    fd = os.open(order[0].path, os.O_RDONLY | os.O_DIRECT)
    local = threading.local()

    def read_one(r: ReadRequest) -> int:
        start, end = r.offset // 4096 * 4096, -(-(r.offset + r.nbytes) // 4096) * 4096
        if getattr(local, "buf", None) is None:
            local.buf = mmap.mmap(-1, end - start)
        return os.preadv(fd, [memoryview(local.buf)[: end - start]], start)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        done = sum(ex.map(read_one, order))
    wall = time.perf_counter() - t0
    os.close(fd)
    return {"gbps": sum(r.nbytes for r in order) / wall / 1e9, "mean_read_bytes": done / len(order),
            "cache_growth_mb": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="/var/tmp/moestream_reader_bench.bin")
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--extent-mb", type=float, default=7.0)
    ap.add_argument("--batch", type=int, default=8, help="extents per read() call")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = ap.parse_args()

    size = int(args.size_gib * (1 << 30))
    reqs = extents(args.path, size, int(args.extent_mb * 1e6))
    write_file(args.path, size)
    print(f"{len(reqs)} extents of {args.extent_mb} MB in {size / 2**30:.2f} GiB, random order, "
          f"{args.batch} per read(); GB/s (mean read MB, page cache growth MB)")
    threads = [int(t) for t in args.threads.split(",")]
    print(f"{'mode':<15}" + "".join(f"{t:>8}t{'':14}" for t in threads))
    try:
        for mode in ("raw-direct", "direct", "buffered-cold", "buffered-warm"):
            cells = []
            for t in threads:
                io = "direct" if mode == "direct" else "buffered"
                evict_page_cache([args.path])
                if mode == "buffered-warm":
                    one_pass(io, t, reqs, args.batch, seed=t + 1)  # fill the page cache
                if mode == "raw-direct":
                    s = raw_pass(t, reqs, seed=t)
                else:
                    s = one_pass(io, t, reqs, args.batch, seed=t)
                cells.append(f"{s['gbps']:9.2f} ({s['mean_read_bytes'] / 1e6:4.1f},"
                             f"{s['cache_growth_mb']:6.0f})")
            print(f"{mode:<15}" + "".join(cells), flush=True)
    finally:
        evict_page_cache([args.path])
        if not args.keep:
            os.unlink(args.path)


if __name__ == "__main__":
    main()
