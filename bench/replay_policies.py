"""Cache policies and expert layout, measured by replaying routing traces (no compute).

1. a checkpoint: a synth one (default: qwen3_moe "small": 6 MoE layers x 64 experts, top-8) or --source;
2. its profile: the shipped calibration text through the source-precision model (stages/profile.py);
3. the trace split by sequence: 75% calibration (profile, seriation), 25% held out (what is measured);
4. layout: held-out co-activation of neighbouring extents for each seriation method; reads per token
   and mean read size, identity vs profile order, from the runtime's own read planning
   (runtime.measure.layout.compare_layouts) and through the real reader on two bundles
   (identity-ordered, and prepared with the calibration profile) replayed with LRU, with the
   runtime's coalesce gap and with none;
5. caching: hit rate of every policy at each budget (a share of the expert bytes) vs LRU
   (runtime.measure.replay: real ExpertCache and ExtentReader, O_DIRECT), with Belady's offline
   optimum ("opt") as the ceiling. The caching part alone is `moestream replay BUNDLE --trace ...`.

Random-weight routers have less structure than trained ones: popularity skew is planted by the synth
stage, but co-activation and token-to-token reuse come only from the text and the random projections,
so the layout and recency gains here are a floor, not a forecast.

    python bench/replay_policies.py [--preset small|tiny] [--family qwen3_moe] [--source CHECKPOINT]
        [--tokens 4096] [--work /var/tmp/moestream_replay] [--io-mode direct] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common

SUMMARY_KEYS = ("tokens", "num_experts", "experts_per_token", "hot_mass_share", "hot_count_share",
                "next_token_reuse", "next_token_reuse_if_independent", "frequency_entropy_ratio")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--source", default=None, help="a checkpoint folder to use instead of a synth one (e.g. the fixture)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens profiled (all splits)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--work", default="/var/tmp/moestream_replay")
    ap.add_argument("--io-mode", default="direct")
    ap.add_argument("--budgets", default="0.05,0.10,0.25,0.50")
    ap.add_argument("--policies", default="lru,lfu,hot,prior,lrfu,opt")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)

    from moestream.manifests.open import open_bundle
    from moestream.manifests.profile import write_aggregates
    from moestream.runtime.measure.layout import bundle_extent_bytes, compare_layouts
    from moestream.runtime.measure.replay import format_table, replay
    from moestream.runtime.model.load import COALESCE_GAP
    from moestream.stages.profile import aggregate, profile_model, summarize
    from moestream.stages.seriate import adjacency_score, profile_orders, split_trace

    name = Path(args.source).name if args.source else f"{args.family}-{args.preset}"
    work = Path(args.work) / name
    ck = Path(args.source) if args.source else common.synth(work, args.family, args.preset)[0]
    print(common.setup_line())
    report: dict = {"args": vars(args), "setup": common.setup_line()}

    prof_dir = work / f"profile-{args.tokens}"
    if not (prof_dir / "trace.parquet").exists():
        r = profile_model(ck, None, prof_dir, max_tokens=args.tokens, seq_len=args.seq_len, plots=True)
        print(f"profile: {r.run['tokens']} tokens in {r.run['seconds']:.1f} s ({r.run['tokens_per_s']:.0f} tok/s)")
    trace = prof_dir / "trace.parquet"
    report["profile_summary"] = summarize(aggregate(trace))
    print("profile summary (all calibration tokens):")
    for key in SUMMARY_KEYS:
        print(f"  {key:34s} {report['profile_summary'][key]}")

    cal, held = split_trace(trace, holdout=0.25)
    cal_dir = work / f"profile-{args.tokens}-cal"  # the calibration split's aggregates: orders and policies
    cal_agg, held_agg = aggregate(cal), aggregate(held)
    write_aggregates(cal_agg, cal_dir)
    print(f"held-out: {held_agg.tokens.max()} tokens; calibration: {cal_agg.tokens.max()} tokens")

    # ---- layout
    def held_out_adjacency(orders) -> float:
        identity = range(held_agg.num_experts)
        return sum(adjacency_score((orders or {}).get(layer, identity), held_agg.coactivation[i])
                   for i, layer in enumerate(held_agg.layers))

    seriation = {"identity": {"held_out_adjacency": held_out_adjacency(None), "seconds": 0.0}}
    for method in ("auto", "greedy", "chain", "spectral"):
        o, s = common.timed(profile_orders, cal_dir, method=method)
        seriation[method] = {"held_out_adjacency": held_out_adjacency(o), "seconds": s}
    report["seriation"] = seriation
    print("\nseriation: held-out co-activation on neighbouring extents (calibration-split orders)")
    print(common.table([{"method": k, **v} for k, v in seriation.items()],
                       [("method", "method", ""), ("adjacency", "held_out_adjacency", ".0f"), ("s", "seconds", ".1f")]))

    ident = common.prepare_bundle(ck, work / f"bundle-q{args.bits}-identity", expert_bits=args.bits)[0]
    prof = common.prepare_bundle(ck, work / f"bundle-q{args.bits}-profile-{args.tokens}", expert_bits=args.bits,
                                 profile=cal_dir)[0]
    sizes = bundle_extent_bytes(open_bundle(ident))
    layouts = {"identity": None, "profile": profile_orders(cal_dir)}
    rows = []
    for frac in (0.0, 0.10, 0.25):
        for order, m in compare_layouts(held, layouts, sizes, cache_fraction=frac).items():
            rows.append({"cache": frac, "order": order, **m})
    report["layout_planned"] = rows
    print(f"\nlayout, the runtime's read planning on the held-out trace (LRU cache, coalesce gap {COALESCE_GAP}):")
    print(common.table(rows, [("cache", "cache", ".0%"), ("order", "order", ""), ("reads/tok", "reads_per_token", ".2f"),
                              ("experts/read", "experts_per_read", ".2f"),
                              ("mean read MB", lambda r: r["mean_read_bytes"] / 1e6, ".3f")]))

    rows = []
    for gap in (0, COALESCE_GAP):
        for order, bundle in (("identity", ident), ("profile", prof)):
            for r in replay(bundle, held, budgets=[0.10, 0.25], policies=["lru"], io_mode=args.io_mode, coalesce_gap=gap):
                rows.append({**r, "order": order, "coalesce_gap": gap})
    report["layout_reader"] = rows
    print(f"\nlayout, real reader (runtime.measure.replay, LRU, {args.io_mode}), identity vs profile-ordered bundle:")
    print(common.table(rows, [("budget", "budget", ".0%"), ("gap", "coalesce_gap", "d"), ("order", "order", ""),
                              ("hit", "hit_rate", ".3f"), ("reads/tok", "reads_per_token", ".2f"),
                              ("mean read MB", lambda r: r["mean_read_bytes"] / 1e6, ".3f"),
                              ("MB/tok", lambda r: r["bytes_per_token"] / 1e6, ".2f")]))

    # ---- caching
    t0 = time.perf_counter()
    rows = replay(ident, held, budgets=[float(x) for x in args.budgets.split(",")], policies=args.policies.split(","),
                  io_mode=args.io_mode, profile=cal_dir)
    report["policies"] = rows
    print(f"\ncache policies (held-out trace, identity bundle, {args.io_mode}, {time.perf_counter() - t0:.0f} s; "
          f"profile = calibration split):")
    print(format_table(rows))
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
