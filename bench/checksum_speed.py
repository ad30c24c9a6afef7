"""How fast each candidate per-read checksum runs on this machine, alone and from several threads at
once as the expert reader calls it (one extent share per thread): xxh3-64 (xxhash) and CRC32C
(google-crc32c), against CRC32 (zlib). A checksum that holds Python's GIL does not scale with
threads; the reader hashes in its I/O threads, so the aggregate rate is the one that matters.

    python bench/checksum_speed.py [--size 3.3MB] [--threads 1,2,4,8] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import zlib

import common
from moestream.common.units import parse_bytes


def candidates() -> dict:
    found = {"crc32 (zlib)": zlib.crc32}
    try:
        import xxhash

        found["xxh3_64 (xxhash)"] = xxhash.xxh3_64_intdigest
    except ImportError:
        pass
    try:
        import google_crc32c

        found[f"crc32c (google-crc32c, {google_crc32c.implementation})"] = google_crc32c.value
    except ImportError:
        pass
    return found


def aggregate_gb_per_s(fn, buffers: list[bytes], seconds: float) -> float:
    """Every thread hashes its own buffer over and over for `seconds`; total bytes / wall time."""
    done = [0] * len(buffers)
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            fn(buffers[i])
            done[i] += len(buffers[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(buffers))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3.3MB", help="bytes hashed per call (the runtime's read share on the H200)")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    size, counts = parse_bytes(args.size), [int(t) for t in args.threads.split(",")]
    print(f"{common.setup_line()}; {size / 1e6:.2f} MB per call")
    rows = []
    for name, fn in candidates().items():
        rates = {n: aggregate_gb_per_s(fn, [os.urandom(size) for _ in range(n)], args.seconds) for n in counts}
        rows.append({"checksum": name, **rates})
    print(common.table(rows, [("checksum", "checksum", "")]
                       + [(f"{n} thread{'s' * (n > 1)} GB/s", n, ".1f") for n in counts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
