"""Where the per-read checksum's time goes in a real decode: the time the reader threads spend in
the check (summed over threads, and per token; each block is checked by the thread that read its
last byte, while the other threads' reads go on), the rate they hash at, and the decode's tok/s, for
a bundle under a budget. The threads check in parallel with other reads, so the summed time is an
upper bound on what the check adds to a token.

    python bench/checksum_cost.py BUNDLE [--share 0.25] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    import moestream
    from moestream.runtime.io.stores import ExtentCheck
    from moestream.runtime.measure.bench import decode

    print(common.setup_line())
    spent = {"s": 0.0, "bytes": 0, "calls": 0}
    lock = threading.Lock()
    real = ExtentCheck.check

    def timed_check(self, index, data):
        t = time.perf_counter()
        real(self, index, data)
        with lock:
            spent["s"] += time.perf_counter() - t
            spent["bytes"] += len(data)
            spent["calls"] += 1

    ExtentCheck.check = timed_check
    budget = common.budget(args.bundle, args.share).budget_bytes
    with moestream.load(args.bundle, memory_budget=budget) as (model, _):
        decode(model, [1, 2, 3, 4], 4)  # kernels compiled
        for k in spent:
            spent[k] = 0
        r = decode(model, list(range(5, 21)), args.tokens)
    tokens = r["decode_tokens"] + 1
    per_token_ms = 1e3 / r["tokens_per_s"]
    check_ms = spent["s"] / tokens * 1e3
    print(f"decode {r['tokens_per_s']:.2f} tok/s ({per_token_ms:.1f} ms per token); {spent['calls']} blocks checked, "
          f"{spent['bytes'] / 1e6:.1f} MB at {spent['bytes'] / max(spent['s'], 1e-9) / 1e9:.1f} GB/s per thread; "
          f"check time summed over threads {check_ms:.2f} ms per token ({check_ms / per_token_ms:.1%} of a token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
