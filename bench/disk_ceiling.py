"""The disk alone: O_DIRECT random-read rate (or, --sequential, the rate of each thread reading on in
sequence) over a bundle's expert files (or any files) for each thread count and read size, in
--rounds windows, the cells taking turns (runtime.measure.ceiling.read_ceiling_rounds, as `moestream
bench` measures its ceiling at the runtime's own settings): each window, then each cell's sustained
rate (all its bytes over all its seconds) and its best window. Shows whether the runtime's thread
count is the disk's best, and how bursty the disk is.

    python bench/disk_ceiling.py BUNDLE_OR_FILE... [--threads 2,4,8,16] [--sizes 1MB,3MB,7MB,16MB]
        [--rounds 2] [--seconds 2] [--sequential] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="a bundle folder (its expert files are read) or files")
    ap.add_argument("--threads", default="2,4,8,16")
    ap.add_argument("--sizes", default="1MB,3MB,7MB,16MB")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="per cell")
    ap.add_argument("--sequential", action="store_true",
                    help="each thread reads on in sequence through its own stretch of the files (a long prefill's reads)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from moestream.common.units import parse_bytes
    from moestream.runtime.measure.ceiling import read_ceiling_rounds

    files = [f for p in map(Path, args.paths) for f in (common.expert_files(p) if p.is_dir() else [p])]
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    print(common.setup_line())
    print(f"O_DIRECT {'reads in sequence' if args.sequential else 'random reads'} over {len(files)} files ({sum(f.stat().st_size for f in files) / 1e9:.2f} GB), "
          f"{args.seconds:g} s per cell; GB/s by round and threads (rows) and read size (columns)", flush=True)
    threads = [int(x) for x in args.threads.split(",")]
    cells = read_ceiling_rounds(files, [(size, t, args.sequential) for t in threads for size in sizes],
                                rounds=args.rounds, seconds=args.seconds)
    by_cell = {(c["threads"], size): c for c, size in zip(cells, [s for _ in threads for s in sizes], strict=True)}
    rows = [{"round": rnd, "threads": t, **{size: by_cell[t, size]["windows"][rnd] for size in sizes}}
            for rnd in range(args.rounds) for t in threads]
    columns = [(f"{s / 1e6:g} MB", s, ".2f") for s in sizes]
    print(common.table(rows, [("round", "round", "d"), ("threads", "threads", "d")] + columns))
    summary = [{"threads": t, "what": what, **{size: by_cell[t, size][key] for size in sizes}}
               for t in threads for what, key in (("sustained", "gb_per_s"), ("best window", "best_window_gb_per_s"))]
    print(f"\neach cell over its {args.rounds} windows: sustained (all its bytes over all its seconds) and best window, GB/s")
    print(common.table(summary, [("threads", "threads", "d"), ("", "what", "")] + columns))
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "rows": rows, "cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
