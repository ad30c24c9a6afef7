"""End-to-end streaming benchmark at real read sizes, fully disclosed.

synth (Qwen3.5-397B-A17B layer shapes by default) -> prepare (the stages, no Prefect) -> the disk's
O_DIRECT ceiling over the bundle's own files at its read size -> decode with a memory budget well
under the expert bytes, cold then warm -> per-layer phase timings -> the figure scaled to the full
model's layer count (labelled as scaled) -> mlx-lm fully in memory on the same weights, for scale.

    python bench/stream_e2e.py --workdir /tmp/e2e --family qwen3_5_moe --preset a397b --layers 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def _timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def decode(model, prompt: list[int], gen_tokens: int) -> dict:
    """Greedy decode with mlx-lm's own generate_step; per-token wall times."""
    from mlx_lm.generate import generate_step

    import moestream
    from moestream.runtime.load import reset_stats

    streaming = hasattr(model, "_moestream")
    if streaming:
        reset_stats(model)
    times, start, after_prefill = [], time.perf_counter(), None
    for _ in generate_step(mx.array(prompt), model, max_tokens=gen_tokens):
        times.append(time.perf_counter())
        if streaming and after_prefill is None:
            after_prefill = moestream.stats(model)  # prefill + first token: kept out of decode figures
    gaps = np.diff(np.array(times))
    decode_s = times[-1] - times[0]
    out = {
        "ttft_s": times[0] - start,
        "tokens_per_s": (len(times) - 1) / decode_s,
        "p50_token_ms": float(np.percentile(gaps, 50) * 1e3),
        "p99_token_ms": float(np.percentile(gaps, 99) * 1e3),
        "decode_s": decode_s,
    }
    if streaming:
        s, p = moestream.stats(model), after_prefill
        out["prefill_bytes_read"] = p["bytes_read"]
        for k in ("bytes_read", "reads", "io_wait_s", "moe_calls", "route_sync_s", "expert_fetch_s", "expert_compute_s",
                  "cache_hits", "cache_misses"):
            out[k] = s[k] - p[k]  # decode only
        lookups = out["cache_hits"] + out["cache_misses"]
        out["hit_rate"] = out["cache_hits"] / lookups if lookups else 0.0
        out["mean_read_bytes"] = out["bytes_read"] / out["reads"] if out["reads"] else 0.0
        out["decode_tokens"] = len(times) - 1
        out.update({k: s[k] for k in ("expert_cache_peak_bytes", "cache_capacity_bytes", "io_mode")})
    return out


def naive_run(bundle_path: Path, prompt: list[int], gen_tokens: int, budget: int) -> dict:
    """The "LLM in a flash" baseline: every routed expert's tensors read one by one with plain
    buffered reads, no cache to speak of (one layer's experts), no coalescing, no threads."""
    import moestream
    from moestream.manifests.bundle import unpack_extent
    from moestream.runtime.stores import _cast

    model, _ = moestream.load(bundle_path, memory_budget=budget)
    rt = model._moestream
    rt.cache.capacity_bytes = rt.plan.min_layer_bytes
    store, counters = rt.store, {"bytes": 0, "reads": 0}

    def naive_read(layer, experts):
        out = {}
        for e in experts:
            x = store.bundle.extent(layer, e)
            parts = bytearray(x.raw_nbytes)
            with open(store.bundle.path(x.file), "rb") as f:
                for t in x.tensors:  # one read per tensor
                    f.seek(x.offset + t.offset)
                    parts[t.offset : t.offset + t.nbytes] = f.read(t.nbytes)
                    counters["bytes"] += t.nbytes
                    counters["reads"] += 1
            out[e] = _cast(unpack_extent(bytes(parts), x.tensors), store.dtype)
        return out

    store.read = naive_read
    out = decode(model, prompt, gen_tokens)
    out["bytes_read"], out["reads"] = counters["bytes"], counters["reads"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moestream-e2e")
    ap.add_argument("--family", default="qwen3_5_moe")
    ap.add_argument("--preset", default="a397b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget-fraction", type=float, default=0.25, help="expert cache as a share of the expert bytes")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--io-mode", default="direct")
    ap.add_argument("--full-layers", type=int, default=60, help="layer count of the real model, for the scaled figure")
    ap.add_argument("--delete-source", action="store_true", help="delete the synth checkpoint once the bundle is made")
    ap.add_argument("--no-reference", action="store_true", help="skip mlx-lm fully in memory")
    ap.add_argument("--compare-naive", action="store_true", help="also run the naive loader baseline")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import moestream
    from moestream.manifests.open import open_bundle
    from moestream.runtime.iobench import evict_page_cache, read_ceiling
    from moestream.stages.sequential import prepare_sequential
    from moestream.stages.synth import synth_checkpoint

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, bundle_path = work / f"{args.family}-{args.preset}", work / f"{args.family}-{args.preset}-bundle"
    report = {"platform": {"machine": platform.platform(), "python": sys.version.split()[0], "mlx": mx.__version__,
                           "device": str(mx.default_device())}, "args": vars(args)}
    if not bundle_path.exists():
        if not src.exists():
            r, report["synth_s"] = _timed(synth_checkpoint, args.family, src, preset=args.preset, layers=args.layers)
            print(f"synth: {r.total_bytes / 1e9:.2f} GB in {report['synth_s']:.1f}s", flush=True)
        _, report["prepare_s"] = _timed(prepare_sequential, src, bundle_path, args.bits, 64)
        print(f"prepare: {report['prepare_s']:.1f}s", flush=True)
    bundle = open_bundle(bundle_path)
    extents = list(bundle.extents.values())
    files = sorted({bundle.path(e.file) for e in extents})
    mean_extent = int(np.mean([e.nbytes for e in extents]))
    report["bundle"] = moestream.inspect(bundle_path)

    # the model, to learn its budget plan and read settings
    model, _ = moestream.load(bundle_path, io_mode=args.io_mode)
    rt = model._moestream
    threads = rt.reader.stats().get("threads", 8)
    ceiling = read_ceiling(files, mean_extent, threads)
    report["ceiling"] = ceiling
    print(f"O_DIRECT ceiling at {mean_extent / 1e6:.2f} MB x {threads} threads: {ceiling['gb_per_s']:.2f} GB/s", flush=True)

    expert_mem = sum(rt.store.nbytes(layer, e) for (layer, e) in bundle.extents)
    plan = rt.plan
    cache = max(plan.min_layer_bytes, int(args.budget_fraction * expert_mem))
    budget = plan.resident_bytes + plan.kv_reserve_bytes + plan.buffer_bytes + cache
    del model
    # Warm-up on a throwaway model: the first call of each kernel compiles it (seconds to a minute
    # on MLX's CUDA backend); "cold" below means an empty expert cache and evicted pages, not that.
    model, _ = moestream.load(bundle_path, memory_budget=budget, io_mode=args.io_mode)
    _, report["warmup_s"] = _timed(decode, model, list(range(1, args.prompt_tokens + 1)), 4)
    print(f"warm-up (kernel compilation): {report['warmup_s']:.1f}s", flush=True)
    del model
    model, _ = moestream.load(bundle_path, memory_budget=budget, io_mode=args.io_mode)
    report["budget"] = {"budget_bytes": budget, "expert_cache_bytes": cache, "expert_bytes_in_memory": expert_mem,
                        "resident_bytes": plan.resident_bytes}
    rng = np.random.default_rng(0)
    vocab = bundle.config.get("text_config", bundle.config)["vocab_size"]
    prompt = rng.integers(0, min(vocab, 50_000), size=args.prompt_tokens).tolist()

    evict_page_cache(files)
    cold = decode(model, prompt, args.gen_tokens)
    warm = decode(model, prompt, args.gen_tokens)
    n_moe = len(bundle.layers)
    for run in (cold, warm):
        run["bytes_read_per_token"] = run["bytes_read"] / max(run["decode_tokens"], 1)
        run["read_gb_per_s_during_io"] = run["bytes_read"] / max(run["io_wait_s"], 1e-9) / 1e9
        run["io_efficiency"] = run["read_gb_per_s_during_io"] / ceiling["gb_per_s"]
        missed_per_decode_token = run["bytes_read_per_token"]
        run["roofline_tokens_per_s"] = ceiling["gb_per_s"] * 1e9 / max(missed_per_decode_token, 1)
        run["share_of_roofline"] = run["tokens_per_s"] / run["roofline_tokens_per_s"]
        calls = max(run["moe_calls"], 1)
        run["per_layer_ms"] = {
            "route_sync (attention + router, host sync)": run["route_sync_s"] / calls * 1e3,
            "expert fetch (cache + I/O + to arrays)": run["expert_fetch_s"] / calls * 1e3,
            "expert compute": run["expert_compute_s"] / calls * 1e3,
        }
        per_token_s = 1 / run["tokens_per_s"]
        run["scaled"] = {
            "layers_measured": n_moe, "layers_scaled_to": args.full_layers,
            "tokens_per_s_scaled": 1 / (per_token_s * args.full_layers / n_moe),
            "note": "SCALED, not measured: per-token time x full_layers / layers_measured",
        }
    report["cold"], report["warm"] = cold, warm

    if args.compare_naive:
        report["naive"] = naive_run(bundle_path, prompt, args.gen_tokens, budget)
        n = report["naive"]
        n["bytes_read_per_token"] = n["bytes_read"] / max(n["decode_tokens"], 1)
        print(f"naive loader: {n['tokens_per_s']:.2f} tok/s", flush=True)

    if not args.no_reference and src.exists():
        ref = _reference_model(src, args.bits)
        report["mlx_lm_in_memory"] = decode(ref, prompt, args.gen_tokens)
        del ref
    if args.delete_source and src.exists():
        shutil.rmtree(src)

    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def _reference_model(src: Path, bits: int):
    """mlx-lm, the same checkpoint fully in memory, experts quantized like the bundle (source dtype)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.utils import load_model

    model, _ = load_model(src)
    nn.quantize(model, group_size=64, bits=bits, class_predicate=lambda p, m: isinstance(m, SwitchLinear))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _print(r: dict) -> None:
    print("\n== setup ==")
    b = r["bundle"]
    print(f"{b['family']} {r['args']['preset']}: {b['moe_layers']} MoE layers x {b['experts']} experts, top-{b['experts_per_token']}, "
          f"{b['expert_bits']}-bit experts ({b['expert_bytes'] / 1e9:.2f} GB), resident {b['resident_bytes'] / 1e9:.2f} GB")
    bud = r["budget"]
    print(f"budget {bud['budget_bytes'] / 1e9:.2f} GB (expert cache {bud['expert_cache_bytes'] / 1e9:.2f} GB = "
          f"{bud['expert_cache_bytes'] / bud['expert_bytes_in_memory']:.0%} of experts); prompt {r['args']['prompt_tokens']} tok, "
          f"greedy {r['args']['gen_tokens']} tok; {r['platform']}")
    print(f"ceiling: {r['ceiling']['gb_per_s']:.2f} GB/s (O_DIRECT, {r['ceiling']['chunk_bytes'] / 1e6:.2f} MB reads, {r['ceiling']['threads']} threads)")
    print("\n== decode ==")
    print(f"{'run':<8}{'TTFT s':>8}{'tok/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'MB/tok':>8}{'hit':>7}{'GB/s io':>9}{'eff':>6}{'roof':>8}{'share':>7}")
    for name in ("cold", "warm"):
        x = r[name]
        print(f"{name:<8}{x['ttft_s']:>8.2f}{x['tokens_per_s']:>8.2f}{x['p50_token_ms']:>8.0f}{x['p99_token_ms']:>8.0f}"
              f"{x['bytes_read_per_token'] / 1e6:>8.1f}{x['hit_rate']:>7.1%}{x['read_gb_per_s_during_io']:>9.2f}"
              f"{x['io_efficiency']:>6.2f}{x['roofline_tokens_per_s']:>8.2f}{x['share_of_roofline']:>7.2f}")
    if "naive" in r:
        print(f"naive loader (per-tensor buffered reads, no cache): {r['naive']['tokens_per_s']:.2f} tok/s; "
              f"moestream warm is {r['warm']['tokens_per_s'] / r['naive']['tokens_per_s']:.1f}x")
    if "mlx_lm_in_memory" in r:
        print(f"mlx-lm in memory: {r['mlx_lm_in_memory']['tokens_per_s']:.2f} tok/s")
    print("\n== per MoE layer, per call (warm) ==")
    for k, v in r["warm"]["per_layer_ms"].items():
        print(f"  {k:<45}{v:8.2f} ms")
    s = r["warm"]["scaled"]
    print(f"\nSCALED to {s['layers_scaled_to']} layers (not measured): {s['tokens_per_s_scaled']:.2f} tok/s warm, "
          f"{r['cold']['scaled']['tokens_per_s_scaled']:.2f} tok/s cold")


if __name__ == "__main__":
    sys.exit(main())
