"""The supported-families table: every transformers-written fixture (tests/fixtures/transformers)
prepared at 4-bit and at source precision, with the bundle's bytes read per token and the
relative L2 distance of its logits (streamed under a 30% expert-cache budget) from transformers'
own fp32 logits saved beside the checkpoint. Prints a Markdown table.

    python scripts/family_table.py [--out DIR] [--families a,b]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import moestream

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "transformers"


def rel_l2(bundle: Path, family: str) -> float:
    ref = mx.load(str(FIXTURES / family / "reference.safetensors"))
    budget = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    with moestream.load(bundle, dtype="float32", memory_budget=budget) as (model, _):
        got = np.array(model(ref["input_ids"].astype(mx.int32)), dtype=np.float64)
    want = np.array(ref["logits"], dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def row(family: str, work: Path) -> str:
    cells = [family]
    for bits in (4, 16):
        out = work / f"{family}-{bits}"
        try:
            t = time.perf_counter()
            moestream.prepare(FIXTURES / family, out, engine="plain", expert_bits=bits)
            info = moestream.inspect(out)
            cells += [f"{info['expert_bytes_per_token'] / 1e3:.1f} KB", f"{rel_l2(out, family):.1e}",
                      f"{time.perf_counter() - t:.1f} s"]
        except moestream.MoestreamError as e:
            cells += [f"refused: {e}", "", ""]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--families", default=None, help="comma list (default: every fixture)")
    args = ap.parse_args(argv)
    families = args.families.split(",") if args.families else sorted(
        p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
    print("| family | 4-bit: read/token | 4-bit: rel. L2 | 4-bit: prepare+check | "
          "source: read/token | source: rel. L2 | source: prepare+check |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for family in families:
            print(row(family, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
