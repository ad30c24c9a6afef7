"""The supported-families table: every transformers-written fixture (tests/fixtures/transformers)
prepared at source precision (its experts' 16-wide projections admit no quantization group), with
the bundle's bytes read per token and the relative L2 distance of its logits from transformers'
own fp32 logits saved beside the checkpoint: streamed from the bundle under a 30% expert-cache
budget, and from the unprepared checkpoint. Prints a Markdown table.

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


def rel_l2(path: Path, family: str, share: float | None) -> float:
    ref = mx.load(str(FIXTURES / family / "reference.safetensors"))
    budget = moestream.plan_memory(path, expert_cache_share=share).budget_bytes if share else None
    with moestream.load(path, dtype="float32", memory_budget=budget) as (model, _):
        got = np.array(model(ref["input_ids"].astype(mx.int32)), dtype=np.float64)
    want = np.array(ref["logits"], dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def row(family: str, work: Path) -> str:
    out = work / family
    try:
        t = time.perf_counter()
        moestream.prepare(FIXTURES / family, out, engine="plain", expert_bits=16)
        prepare_s = time.perf_counter() - t
        info = moestream.inspect(out)
        cells = [f"{info['moe_layers']} x {info['experts']}, top-{info['experts_per_token']}",
                 f"{info['expert_bytes_per_token'] / 1e3:.1f} KB", f"{prepare_s:.1f} s",
                 f"{rel_l2(out, family, 0.3):.1e}", f"{rel_l2(FIXTURES / family, family, None):.1e}"]
    except moestream.MoestreamError as e:
        cells = [f"refused: {e}", "", "", "", ""]
    return "| " + " | ".join([family] + cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--families", default=None, help="comma list (default: every fixture)")
    args = ap.parse_args(argv)
    families = args.families.split(",") if args.families else sorted(
        p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
    print("| family | MoE layers x experts | read/token | prepare | rel. L2, bundle (30% budget) | "
          "rel. L2, unprepared |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for family in families:
            print(row(family, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
