"""Cache policies and expert layout, measured by replaying routing traces (no compute).

1. synth a random-weight checkpoint (default: qwen3_moe "small": 6 MoE layers x 64 experts, top-8);
2. profile it: the shipped calibration text through the source-precision model (stages/profile.py);
3. split the trace by sequence: 75% calibration (profile, seriation), 25% held out (what is measured);
4. layout: reads per token and mean read size, identity vs profile order, analytically
   (stages/seriate.measure_layout) and through the real reader on two bundles (identity-ordered and
   profile-ordered) replayed with LRU, with the runtime's coalesce_gap (0) and with 16 KiB;
5. caching: hit rate of every policy at 5/10/25/50% of the expert bytes vs LRU (runtime/replay.py,
   real ExpertCache and ExtentReader, O_DIRECT), with Belady's offline optimum ("opt") as the ceiling.

Random-weight routers have less structure than trained ones: popularity skew is planted by the synth
stage, but co-activation and token-to-token reuse come only from the text and the random projections,
so the layout and recency gains here are a floor, not a forecast.

usage: python bench/replay_policies.py [--preset small|tiny] [--family qwen3_moe] [--tokens 4096]
       [--work /var/tmp/moestream_replay] [--io-mode direct] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moestream.manifests.open import open_bundle
from moestream.runtime.replay import format_table, replay
from moestream.runtime.trace import trace_arrays
from moestream.stages.profile import aggregate, profile_model, summarize, write_aggregates
from moestream.stages.sequential import prepare_sequential
from moestream.stages.seriate import (
    adjacency_score,
    bundle_extent_bytes,
    compare_layouts,
    order_experts,
    split_trace,
)
from moestream.stages.synth import synth_checkpoint


def build_bundle(checkpoint: Path, out: Path, bits: int, orders: dict[int, list[int]] | None) -> Path:
    if not out.exists():
        prepare_sequential(checkpoint, out, bits, 64, None, orders=orders)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens profiled (all splits)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--work", default="/var/tmp/moestream_replay")
    ap.add_argument("--io-mode", default="direct")
    ap.add_argument("--budgets", default="0.05,0.10,0.25,0.50")
    ap.add_argument("--policies", default="lru,lfu,hot,prior,lrfu,opt")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--source", default=None, help="a checkpoint folder to use instead of a synth one (e.g. the fixture)")
    args = ap.parse_args()
    if args.source:
        args.family, args.preset = "source", Path(args.source).name
    work = Path(args.work) / f"{args.family}-{args.preset}"
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"family": args.family, "preset": args.preset}

    ck = Path(args.source) if args.source else work / "checkpoint"
    if not ck.exists():
        t0 = time.perf_counter()
        synth_checkpoint(args.family, ck, preset=args.preset)
        print(f"synth {args.family}/{args.preset}: {time.perf_counter() - t0:.1f} s")

    prof_dir = work / f"profile-{args.tokens}"
    if not (prof_dir / "trace.parquet").exists():
        r = profile_model(ck, None, prof_dir, max_tokens=args.tokens, seq_len=args.seq_len, plots=True)
        print(f"profile: {r.run['tokens']} tokens in {r.run['seconds']:.1f} s ({r.run['tokens_per_s']:.0f} tok/s)")
    trace = prof_dir / "trace.parquet"
    full = aggregate(trace)
    report["profile_summary"] = summarize(full)
    print("profile summary (all calibration tokens):")
    for key in ("tokens", "num_experts", "experts_per_token", "hot_mass_share", "hot_count_share",
                "next_token_reuse", "next_token_reuse_if_independent", "frequency_entropy_ratio"):
        print(f"  {key:34s} {report['profile_summary'][key]}")

    cal, held = split_trace(trace, holdout=0.25)
    cal_agg = aggregate(cal)
    cal_dir = work / f"profile-{args.tokens}-cal"
    write_aggregates(cal_agg, cal_dir)
    held_t = trace_arrays(held)
    n_held = len(set(zip(held_t.seq.tolist(), held_t.token.tolist(), strict=True)))
    print(f"held-out: {n_held} tokens; calibration: {int(cal_agg.tokens.max())} tokens")

    # ---- layout --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    orders = {}
    for i, layer in enumerate(cal_agg.layers):
        orders[layer] = order_experts(cal_agg.coactivation[i], cal_agg.frequency[i])
    seriation_s = time.perf_counter() - t0
    held_agg = aggregate(held)
    score = {
        "identity": sum(adjacency_score(range(held_agg.num_experts), held_agg.coactivation[i])
                        for i in range(len(held_agg.layers))),
        "profile": sum(adjacency_score(orders[layer], held_agg.coactivation[i])
                       for i, layer in enumerate(held_agg.layers)),
    }
    per_method = {}
    for method in ("greedy", "chain", "spectral"):
        t1 = time.perf_counter()
        o = {layer: order_experts(cal_agg.coactivation[i], cal_agg.frequency[i], method=method)
             for i, layer in enumerate(cal_agg.layers)}
        per_method[method] = {
            "held_out_adjacency": sum(adjacency_score(o[layer], held_agg.coactivation[i])
                                      for i, layer in enumerate(held_agg.layers)),
            "seconds": time.perf_counter() - t1,
        }
    report["seriation"] = {"seconds_auto": seriation_s, "held_out_adjacency": score, "methods": per_method}
    print(f"\nseriation ({seriation_s:.1f} s): held-out co-activation on neighbouring extents "
          f"identity {score['identity']:.0f} -> profile {score['profile']:.0f}")
    for m, v in per_method.items():
        print(f"  {m:9s} {v['held_out_adjacency']:.0f} ({v['seconds']:.1f} s)")

    ident_bundle = build_bundle(ck, work / f"bundle-q{args.bits}-identity", args.bits, None)
    prof_bundle = build_bundle(ck, work / f"bundle-q{args.bits}-profile-{args.tokens}", args.bits, orders)
    sizes = bundle_extent_bytes(open_bundle(ident_bundle))
    layouts = {"identity": None, "profile": orders}
    report["layout_model"] = {}
    print("\nlayout, analytic (stages/seriate.measure_layout on the held-out trace; neighbours coalesce):")
    print(f"  {'cache':>6} {'order':>9} {'reads/tok':>9} {'experts/read':>12} {'mean read MB':>12}")
    for frac in (0.0, 0.10, 0.25):
        res = compare_layouts(held, layouts, sizes, cache_fraction=frac)
        report["layout_model"][str(frac)] = res
        for name, m in res.items():
            print(f"  {frac:>6.0%} {name:>9} {m['reads_per_token']:>9.2f} {m['experts_per_read']:>12.2f} "
                  f"{m['mean_read_bytes'] / 1e6:>12.3f}")

    report["layout_reader"] = []
    print("\nlayout, real reader (runtime/replay.py, LRU, O_DIRECT), identity vs profile-ordered bundle:")
    print(f"  {'budget':>6} {'gap':>6} {'order':>9} {'hit':>6} {'reads/tok':>9} {'mean read MB':>12} {'MB/tok':>7}")
    for gap in (0, 16384):
        for name, b in (("identity", ident_bundle), ("profile", prof_bundle)):
            rows = replay(b, held, budgets=[0.10, 0.25], policies=["lru"], io_mode=args.io_mode, coalesce_gap=gap)
            for r in rows:
                r.update(order=name, coalesce_gap=gap)
                report["layout_reader"].append(r)
                print(f"  {r['budget']:>6.0%} {gap:>6} {name:>9} {r['hit_rate']:>6.3f} {r['reads_per_token']:>9.2f} "
                      f"{r['mean_read_bytes'] / 1e6:>12.3f} {r['bytes_per_token'] / 1e6:>7.2f}")

    # ---- caching -------------------------------------------------------------------------------
    budgets = [float(x) for x in args.budgets.split(",")]
    policies = args.policies.split(",")
    t0 = time.perf_counter()
    rows = replay(ident_bundle, held, budgets=budgets, policies=policies, io_mode=args.io_mode, profile=cal_dir)
    report["policies"] = rows
    print(f"\ncache policies (held-out trace, identity bundle, {args.io_mode}, "
          f"{time.perf_counter() - t0:.0f} s; profile = calibration split):")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
