"""End-to-end decode with and without each profile-driven piece, in one run: a profile-ordered layout,
a profile-driven cache policy, router-lookahead prefetch, and all three. Same prompt (real text),
greedy, same budget, timed by `moestream bench`'s decode. (`moestream bench BUNDLE --compare
policy:lrfu,prefetch` measures the policy and prefetch one at a time on random prompt tokens.)

    python bench/pieces.py CHECKPOINT PROFILE_DIR TEXT_FILE [--budget-fraction 0.10 0.25] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("profile", help="a profile folder (`moestream profile CHECKPOINT --out DIR`)")
    ap.add_argument("text")
    ap.add_argument("--budget-fraction", type=float, nargs="+", default=[0.10, 0.25])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--policy", default="lrfu")
    ap.add_argument("--workdir", default="/tmp/moestream-pieces")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import moestream
    from moestream.runtime.measure.bench import decode

    work, profile = Path(args.workdir), Path(args.profile)
    bundles = {"identity": common.prepare_bundle(args.checkpoint, work / "identity")[0],
               "profile": common.prepare_bundle(args.checkpoint, work / "profile", profile=profile)[0]}
    configs = [
        ("baseline: identity layout, lru", "identity", "lru", False),
        ("+ profile layout", "profile", "lru", False),
        (f"+ {args.policy} policy", "identity", args.policy, False),
        ("+ prefetch", "identity", "lru", True),
        (f"all: profile layout, {args.policy}, prefetch", "profile", args.policy, True),
    ]
    print(common.setup_line())
    rows, prompt = [], None
    for fraction in args.budget_fraction:
        for name, layout, policy, prefetch in configs:
            budget = common.budget(bundles[layout], fraction).budget_bytes
            with moestream.load(bundles[layout], memory_budget=budget, cache_policy=policy, prefetch=prefetch,
                                profile=profile) as (model, tokenizer):
                prompt = prompt or tokenizer.encode(Path(args.text).read_text())[: args.prompt_tokens]
                r = decode(model, prompt, args.tokens)
                s = moestream.runtime_of(model).stats()
            n = max(r["decode_tokens"], 1)
            rows.append({"budget": fraction, "config": name, "tokens_per_s": r["tokens_per_s"], "hit_rate": r["hit_rate"],
                         "mb_per_token": r["bytes_read"] / n / 1e6, "reads_per_token": r["reads"] / n,
                         "prefetch_used": s["prefetch_used"], "prefetch_issued": s["prefetch_issued"]})
    print(common.table(rows, [
        ("budget", "budget", ".0%"), ("config", "config", ""), ("tok/s", "tokens_per_s", ".1f"), ("hit", "hit_rate", ".1%"),
        ("MB/tok", "mb_per_token", ".3f"), ("reads/tok", "reads_per_token", ".1f"),
        ("prefetch used/issued", lambda r: f"{r['prefetch_used']}/{r['prefetch_issued']}" if r["prefetch_issued"] else "-", "")]))
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
