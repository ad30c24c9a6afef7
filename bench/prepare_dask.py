"""Preparation wall time: the flow with its default thread runner vs a local Dask cluster of N worker
processes vs the plain engine (no Prefect), on one checkpoint, each a cold subprocess: the jobs
prepare, dask and plain of prepare_vs_convert.py (same measurement: wall time, peak RSS of the
process tree, Prefect's start-up and shutdown apart).

    python bench/prepare_dask.py CHECKPOINT [--workers 2] [--repeats 1] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys

import prepare_vs_convert


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/moestream-prepare-dask")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return prepare_vs_convert.main(["--source", args.checkpoint, "--jobs", "plain,prepare,dask", "--workers",
                                    str(args.workers), "--repeats", str(args.repeats), "--workdir", args.workdir]
                                   + (["--json", args.json] if args.json else []))


if __name__ == "__main__":
    sys.exit(main())
