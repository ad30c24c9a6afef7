"""The extent reader of another git revision against the current one, in one run, on batches the
size of one layer's missed experts (the I/O engine alone: no MLX, no compute).

Each round reads --rounds batches of --batch random 7 MB extents (16 KiB-aligned, as the bundle
writer places them) with each reader in turn, O_DIRECT, at each thread count; then the bare
O_DIRECT ceiling of runtime/iobench.py at the extent size and at each reader's mean read size.

usage: python bench/reader_compare.py [--old 6d117c3] [--path /var/tmp/moestream_reader_cmp.bin]
           [--size-gib 2] [--batch 5] [--threads 4,8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reader_bench import STRIDE_ALIGN, write_file  # same folder: the 7 MB-extent file both benches read

from moestream.runtime import reader as current
from moestream.runtime.iobench import read_ceiling


def reader_at(rev: str):
    """runtime/reader.py as it was at `rev`, imported as a standalone module."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:runtime/reader.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"reader_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module




def batches(path: str, size: int, extent: int, batch: int, count: int, seed: int) -> list[list[tuple]]:
    stride = -(-extent // STRIDE_ALIGN) * STRIDE_ALIGN
    offsets = list(range(0, size - extent + 1, stride))
    rng = random.Random(seed)
    return [[(path, off, extent) for off in rng.sample(offsets, batch)] for _ in range(count)]


def run(module, threads: int, work: list[list[tuple]]) -> dict:
    r = module.ExtentReader("direct", threads=threads)
    try:
        t0 = time.perf_counter()
        for b in work:
            views = r.read([module.ReadRequest(p, o, n, f"extent@{o}") for p, o, n in b])
            del views
        elapsed = time.perf_counter() - t0
        s = r.stats()
    finally:
        r.close()
    return {"gb_per_s": s["bytes_read"] / elapsed / 1e9, "mean_read_mb": s["mean_read_bytes"] / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="6d117c3", help="git revision of the reader to compare against")
    ap.add_argument("--path", default="/var/tmp/moestream_reader_cmp.bin")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--extent-mb", type=float, default=7.08)
    ap.add_argument("--batch", type=int, default=5, help="extents per read() call: one layer's misses")
    ap.add_argument("--batches", type=int, default=12, help="read() calls per measurement")
    ap.add_argument("--threads", default="4,8")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    size, extent = int(args.size_gib * 2**30), int(args.extent_mb * 1e6) // 4096 * 4096
    write_file(args.path, size)
    old = reader_at(args.old)
    print(f"{args.batches} batches of {args.batch} x {extent / 1e6:.2f} MB extents per measurement, O_DIRECT, "
          f"file {size / 2**30:.1f} GiB; reader {args.old} vs current; GB/s (mean read MB)")
    seen: dict = {}
    for rnd in range(args.rounds):
        for t in [int(x) for x in args.threads.split(",")]:
            work = batches(args.path, size, extent, args.batch, args.batches, seed=rnd * 100 + t)
            cells = []
            for name, module in ((args.old, old), ("current", current)):
                m = run(module, t, work)
                seen.setdefault((name, t), []).append(m)
                cells.append(f"{name} {m['gb_per_s']:.2f} ({m['mean_read_mb']:.1f})")
            print(f"round {rnd} threads {t}: " + "   ".join(cells), flush=True)
    for t in [int(x) for x in args.threads.split(",")]:
        sizes = {extent} | {int(ms[0]["mean_read_mb"] * 1e6) for (n, tt), ms in seen.items() if tt == t}
        ceil = {s: read_ceiling([Path(args.path)], s, t)["gb_per_s"] for s in sorted(sizes)}
        med = {n: sorted(m["gb_per_s"] for m in ms)[len(ms) // 2] for (n, tt), ms in seen.items() if tt == t}
        best = max(ceil.values())
        print(f"threads {t}: ceiling " + ", ".join(f"{s / 1e6:.2f} MB: {g:.2f}" for s, g in ceil.items())
              + "; median " + ", ".join(f"{n} {g:.2f} GB/s = {g / best:.2f} of the best ceiling" for n, g in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
