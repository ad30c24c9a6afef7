"""Where the per-read checksum's time goes in a real decode, from the reader's own counters: the
time its threads spend checking (summed over threads, and per token), the part of it after each
layer's last read (what checking adds to a token), the rate they hash at, and the decode's tok/s,
for a bundle under a budget. Each block is checked by the thread that read its last byte, while the
other threads' reads go on, so the summed time is an upper bound on what the check adds.

    python bench/checksum_cost.py BUNDLE [--share 0.25] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    import moestream
    from moestream.runtime.measure.bench import decode

    print(common.setup_line())
    budget = common.budget(args.bundle, args.share).budget_bytes
    with moestream.load(args.bundle, memory_budget=budget) as (model, _):
        decode(model, [1, 2, 3, 4], 4)  # kernels compiled
        r = decode(model, list(range(5, 21)), args.tokens)
    tokens = r["decode_tokens"]
    per_token_ms = 1e3 / r["tokens_per_s"]
    check_ms, tail_ms = (r[k] / tokens * 1e3 for k in ("check_s", "check_tail_s"))
    print(f"decode {r['tokens_per_s']:.2f} tok/s ({per_token_ms:.1f} ms per token); {r['bytes_read'] / 1e6:.1f} MB "
          f"read and checked at {r['bytes_read'] / max(r['check_s'], 1e-9) / 1e9:.1f} GB/s per thread; check time "
          f"summed over threads {check_ms:.2f} ms per token, {tail_ms:.2f} ms of it after the layers' last reads "
          f"({tail_ms / per_token_ms:.1%} of a token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
