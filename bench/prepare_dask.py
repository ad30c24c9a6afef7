"""Preparation wall time: the flow with its default thread runner vs a local Dask cluster of N worker
processes vs the plain in-process stages, on one checkpoint, in one run (each in a subprocess).

    python bench/prepare_dask.py CHECKPOINT [--workers 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "moestream.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})
    if code:
        raise SystemExit(f"{' '.join(args)} failed; see {log}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/moestream-prepare-dask")
    a = ap.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for name, extra in (("plain (no Prefect)", ["--engine", "plain"]), ("flow, 2 threads", []),
                        (f"flow, Dask {a.workers} processes", ["--workers", str(a.workers)])):
        out = work / name.split()[0].strip(",")
        if out.exists():
            out = work / f"{out.name}-{len(rows)}"
        rows.append((name, run(["prepare", a.checkpoint, "--out", str(out), *extra], work / f"{out.name}.log")))
    print(f"{'run':<28}{'wall s':>8}")
    for name, wall in rows:
        print(f"{name:<28}{wall:>8.1f}")
    print(f"load average at end: {os.getloadavg()}; {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
