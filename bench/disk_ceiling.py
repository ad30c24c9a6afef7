"""The disk alone: O_DIRECT random-read rate (or, --sequential, the rate of each thread reading on in
sequence) over a bundle's expert files (or any files) for each thread count and read size, --rounds
times (runtime.measure.ceiling.read_ceiling, the ceiling `moestream bench` measures at the runtime's
own settings). Shows whether the runtime's thread count is the disk's best, and how bursty the disk is.

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

    files = [f for p in map(Path, args.paths) for f in (common.expert_files(p) if p.is_dir() else [p])]
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    print(common.setup_line())
    print(f"O_DIRECT {'reads in sequence' if args.sequential else 'random reads'} over {len(files)} files ({sum(f.stat().st_size for f in files) / 1e9:.2f} GB), "
          f"{args.seconds:g} s per cell; GB/s by round and threads (rows) and read size (columns)", flush=True)
    rows = []
    for rnd in range(args.rounds):
        for t in (int(x) for x in args.threads.split(",")):
            row = {"round": rnd, "threads": t}
            for size in sizes:
                row[size] = common.ceiling(files, size, t, trials=1, seconds=args.seconds, sequential=args.sequential)["gb_per_s"]
            rows.append(row)
    print(common.table(rows, [("round", "round", "d"), ("threads", "threads", "d")]
                       + [(f"{s / 1e6:g} MB", s, ".2f") for s in sizes]))
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
