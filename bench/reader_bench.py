"""Extent reader throughput: direct vs buffered (cold and warm page cache), at several thread counts.

Writes a file of 7 MB extents at 16 KiB-aligned offsets (as the bundle writer places them), then
reads every extent once per pass, in random order, in batches of --batch (one layer's routed experts
per read() call). The first row is the disk's O_DIRECT random-read ceiling at the extent size
(runtime.measure.ceiling, as `moestream bench` measures it): what the reader's own overhead
(planning, buffers, views) is measured against. Cells: GB/s (mean read MB, page cache growth MB).

    python bench/reader_bench.py [--path /var/tmp/moestream_reader_bench.bin] [--size-gib 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import common


def one_pass(mode: str, threads: int, path: str, offsets: list[int], extent: int, batch: int, seed: int) -> dict:
    from moestream.runtime.io.pagecache import page_cache_bytes
    from moestream.runtime.io.reader import ExtentReader, ReadRequest

    order = offsets[:]
    random.Random(seed).shuffle(order)
    reqs = [ReadRequest(path, off, extent, f"extent@{off}") for off in order]
    cached0 = page_cache_bytes([path]) or 0
    with ExtentReader(mode, threads=threads) as reader:
        t0 = time.perf_counter()
        for i in range(0, len(reqs), batch):
            views = reader.read(reqs[i : i + batch])
            del views  # the buffers go back to the pool
        wall = time.perf_counter() - t0
        s = reader.stats()
    return {"gb_per_s": s["requested_bytes"] / wall / 1e9, "mean_read_mb": s["mean_read_bytes"] / 1e6,
            "cache_growth_mb": ((page_cache_bytes([path]) or 0) - cached0) / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="/var/tmp/moestream_reader_bench.bin")
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--extent-mb", type=float, default=7.0)
    ap.add_argument("--batch", type=int, default=8, help="extents per read() call")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--keep", action="store_true", help="keep the file afterwards")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from moestream.runtime.io.pagecache import evict_page_cache

    size, extent = int(args.size_gib * 2**30), int(args.extent_mb * 1e6)
    path = str(common.extent_file(args.path, size))
    offsets = common.extent_offsets(size, extent)
    threads = [int(t) for t in args.threads.split(",")]
    print(common.setup_line())
    print(f"{len(offsets)} extents of {args.extent_mb} MB in {size / 2**30:.2f} GiB, random order, {args.batch} per "
          f"read(); GB/s (mean read MB, page cache growth MB)", flush=True)
    rows = []
    try:
        for mode in ("ceiling", "direct", "buffered-cold", "buffered-warm"):
            row = {"mode": mode}
            for t in threads:
                evict_page_cache([path])
                if mode == "ceiling":
                    c = common.ceiling([path], extent, t, trials=1, seconds=args.ceiling_seconds)
                    s = {"gb_per_s": c["gb_per_s"], "mean_read_mb": c["chunk_bytes"] / 1e6, "cache_growth_mb": 0.0}
                else:
                    io = mode.split("-")[0]
                    if mode == "buffered-warm":
                        one_pass(io, t, path, offsets, extent, args.batch, seed=t + 1)  # fill the page cache
                    s = one_pass(io, t, path, offsets, extent, args.batch, seed=t)
                row[t] = s
            rows.append(row)
            print(f"  {mode} done", flush=True)
    finally:
        evict_page_cache([path])
        if not args.keep:
            Path(path).unlink()
    cell = lambda t: lambda r: f"{r[t]['gb_per_s']:.2f} ({r[t]['mean_read_mb']:.1f}, {r[t]['cache_growth_mb']:.0f})"  # noqa: E731
    print(common.table(rows, [("mode", "mode", "")] + [(f"{t} threads", cell(t), "") for t in threads]))
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
