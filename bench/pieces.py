"""End-to-end decode with and without each piece of issue 5, in one run: profile-ordered layout,
a profile-driven cache policy, router-lookahead prefetch. Same prompt, greedy, same budget.

    python bench/pieces.py CHECKPOINT PROFILE_DIR TEXT_FILE [--budget-fraction 0.10] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("profile")
    ap.add_argument("text")
    ap.add_argument("--budget-fraction", type=float, nargs="+", default=[0.10, 0.25])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--policy", default="lrfu")
    ap.add_argument("--workdir", default="/tmp/moestream-pieces")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import moestream
    from moestream.runtime.bench import budget_for, decode
    from moestream.stages.sequential import prepare_sequential

    work = Path(a.workdir)
    bundles = {"identity": work / "identity", "profile": work / "profile"}
    if not (bundles["identity"] / "bundle.json").exists():
        prepare_sequential(Path(a.checkpoint), bundles["identity"])
    if not (bundles["profile"] / "bundle.json").exists():
        prepare_sequential(Path(a.checkpoint), bundles["profile"], profile_dir=Path(a.profile))
    _, tok = moestream.load(bundles["identity"])
    prompt = tok.encode(Path(a.text).read_text())[: a.prompt_tokens]
    configs = [
        ("baseline: identity layout, lru", "identity", "lru", False),
        ("+ profile layout", "profile", "lru", False),
        (f"+ {a.policy} policy", "identity", a.policy, False),
        ("+ prefetch", "identity", "lru", True),
        (f"all: profile layout, {a.policy}, prefetch", "profile", a.policy, True),
    ]
    rows = []
    for fraction in a.budget_fraction:
        for name, layout, policy, prefetch in configs:
            probe, _ = moestream.load(bundles[layout])
            budget = budget_for(probe, fraction)
            del probe
            model, _ = moestream.load(bundles[layout], memory_budget=budget, cache_policy=policy, prefetch=prefetch,
                                      profile=Path(a.profile))
            r = decode(model, prompt, a.tokens)
            n = max(r["decode_tokens"], 1)
            s = moestream.stats(model)
            rows.append({"budget": fraction, "config": name, "tokens_per_s": r["tokens_per_s"], "hit_rate": r["hit_rate"],
                         "mb_per_token": r["bytes_read"] / n / 1e6, "reads_per_token": r["reads"] / n,
                         "prefetch_used": s["prefetch_used"], "prefetch_issued": s["prefetch_issued"]})
    print(f"{'budget':>6}  {'config':<44}{'tok/s':>7}{'hit':>7}{'MB/tok':>8}{'reads/tok':>10}{'prefetch used/issued':>22}")
    for r in rows:
        pf = f"{r['prefetch_used']}/{r['prefetch_issued']}" if r["prefetch_issued"] else "-"
        print(f"{r['budget']:>6.0%}  {r['config']:<44}{r['tokens_per_s']:>7.1f}{r['hit_rate']:>7.1%}"
              f"{r['mb_per_token']:>8.3f}{r['reads_per_token']:>10.1f}{pf:>22}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
