"""The extent reader of another git revision against the current one, in one run, on batches the
size of one layer's missed experts (the I/O engine alone: no MLX, no compute).

Each round reads --batches batches of --batch random 7 MB extents (16 KiB-aligned, as the bundle
writer places them) with each reader in turn, O_DIRECT, at each thread count; then the disk's
O_DIRECT ceiling (runtime.measure.ceiling) at the extent size and at each reader's mean read size.

    python bench/reader_compare.py [--old 6d117c3] [--path /var/tmp/moestream_reader_cmp.bin]
        [--size-gib 2] [--batch 5] [--threads 4,8] [--rounds 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent


def reader_at(rev: str):
    """The extent reader as it was at `rev`, imported as a standalone module: runtime/reader.py
    before the restructuring (e6baf9e), runtime/io/reader.py since (its relative imports made
    absolute, against the installed package)."""
    for path in ("runtime/io/reader.py", "runtime/reader.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"no reader at {rev}: {shown.stderr.strip()}")
    source = re.sub(r"^from \.\.\.", "from moestream.", shown.stdout, flags=re.M)
    source = re.sub(r"^from \.\.", "from moestream.runtime.", source, flags=re.M)
    source = re.sub(r"^from \.", "from moestream.runtime.io.", source, flags=re.M)
    file = Path(tempfile.mkdtemp()) / f"reader_{rev}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module


def run(module, threads: int, work: list[list[tuple]]) -> dict:
    r = module.ExtentReader("direct", threads=threads)
    try:
        t0 = time.perf_counter()
        for batch in work:
            views = r.read([module.ReadRequest(p, o, n, f"extent@{o}") for p, o, n in batch])
            del views
        elapsed = time.perf_counter() - t0
        s = r.stats()
    finally:
        r.close()
    return {"gb_per_s": s["bytes_read"] / elapsed / 1e9, "mean_read_mb": s["mean_read_bytes"] / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="6d117c3", help="git revision of the reader to compare against")
    ap.add_argument("--path", default="/var/tmp/moestream_reader_cmp.bin")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--extent-mb", type=float, default=7.08)
    ap.add_argument("--batch", type=int, default=5, help="extents per read() call: one layer's misses")
    ap.add_argument("--batches", type=int, default=12, help="read() calls per measurement")
    ap.add_argument("--threads", default="4,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ceiling-seconds", type=float, default=3.0)
    ap.add_argument("--keep", action="store_true", help="keep the file afterwards")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from moestream.runtime.io import reader as current

    size, extent = int(args.size_gib * 2**30), int(args.extent_mb * 1e6) // 4096 * 4096
    path = str(common.extent_file(args.path, size))
    offsets = common.extent_offsets(size, extent)
    readers = {args.old: reader_at(args.old), "current": current}
    threads = [int(x) for x in args.threads.split(",")]
    print(common.setup_line())
    print(f"{args.batches} batches of {args.batch} x {extent / 1e6:.2f} MB extents per measurement, O_DIRECT, file "
          f"{size / 2**30:.1f} GiB; reader {args.old} vs current; GB/s (mean read MB)", flush=True)
    seen: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for t in threads:
            rng = random.Random(rnd * 100 + t)
            work = [[(path, off, extent) for off in rng.sample(offsets, args.batch)] for _ in range(args.batches)]
            cells = []
            for name, module in readers.items():  # the same batches for each reader, the old one first
                m = run(module, t, work)
                seen.setdefault((name, t), []).append(m)
                cells.append(f"{name} {m['gb_per_s']:.2f} ({m['mean_read_mb']:.1f})")
            print(f"round {rnd} threads {t}: " + "   ".join(cells), flush=True)
    rows = []
    for t in threads:
        sizes = sorted({extent} | {int(seen[name, t][0]["mean_read_mb"] * 1e6) for name in readers})
        ceil = {s: common.ceiling([Path(path)], s, t, trials=1, seconds=args.ceiling_seconds)["gb_per_s"] for s in sizes}
        best = max(ceil.values())
        row = {"threads": t, "ceiling_by_read_mb": {f"{s / 1e6:.2f}": g for s, g in ceil.items()}, "best_ceiling": best}
        for name in readers:
            row[name] = statistics.median(m["gb_per_s"] for m in seen[name, t])
            row[f"{name} / ceiling"] = row[name] / best
        rows.append(row)
        print(f"threads {t}: ceiling " + ", ".join(f"{s / 1e6:.2f} MB: {g:.2f}" for s, g in ceil.items()))
    columns = [("threads", "threads", "d"), ("best ceiling", "best_ceiling", ".2f")]
    for name in readers:
        columns += [(f"{name} median", name, ".2f"), (f"{name} / ceiling", f"{name} / ceiling", ".2f")]
    print(common.table(rows, columns))
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "runs": {f"{n} {t}": v for (n, t), v in
                                                                                            seen.items()}, "rows": rows})
    if not args.keep:
        Path(path).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
