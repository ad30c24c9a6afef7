"""`moestream demo`: the whole job on a model small enough for any machine.

synth a random-weight MoE in the Hub layout -> the preparation flow (Prefect) makes a verified
bundle -> generate with a memory budget that holds only a quarter of the experts, so every
token streams experts from disk -> print the figures."""

from __future__ import annotations

import time
from pathlib import Path

CACHE_SHARE = 0.25


def run_demo(workdir: str | Path = "moestream-demo", family: str = "qwen3_moe", preset: str = "tiny") -> dict:
    import moestream
    from moestream.runtime.budget import fmt_bytes
    from moestream.runtime.generate import format_prompt, generate_text
    from moestream.stages.synth import synth_checkpoint

    workdir = Path(workdir)
    checkpoint, bundle = workdir / f"{family}-{preset}", workdir / f"{family}-{preset}-bundle"
    t0 = time.perf_counter()
    if not (checkpoint / "config.json").exists():
        print(f"[1/3] synth: a random {family} MoE ({preset}) in the Hugging Face layout -> {checkpoint}")
        synth_checkpoint(family, checkpoint, preset=preset, seed=0)
    else:
        print(f"[1/3] synth: reusing {checkpoint}")
    print(f"[2/3] prepare: 4-bit experts, source-precision resident weights -> {bundle}")
    moestream.prepare(str(checkpoint), bundle, expert_bits=4, overwrite=True)
    info = moestream.inspect(bundle)

    model, tokenizer = moestream.load(bundle)  # unbounded, to learn what the budget must cover
    plan = model._moestream.plan
    expert_bytes = sum(model._moestream.store.nbytes(layer, e) for layer in model._moestream.store.layers
                       for e in range(info["experts"]))
    cache = max(plan.min_layer_bytes, int(CACHE_SHARE * expert_bytes))
    budget = plan.resident_bytes + plan.kv_reserve_bytes + plan.buffer_bytes + cache
    print(f"[3/3] generate: memory budget {fmt_bytes(budget)} = resident {fmt_bytes(plan.resident_bytes)} + "
          f"KV reserve {fmt_bytes(plan.kv_reserve_bytes)} + buffers {fmt_bytes(plan.buffer_bytes)} + expert "
          f"cache {fmt_bytes(cache)} ({cache / expert_bytes:.0%} of the {fmt_bytes(expert_bytes)} of experts)")
    model, tokenizer = moestream.load(bundle, memory_budget=budget)
    prompt = format_prompt(tokenizer, "Write a haiku about streaming experts from disk.")
    print("--- output (random weights: expect gibberish) ---")
    _, report = generate_text(model, tokenizer, prompt, max_tokens=48)
    print("\n---")
    print(report.line())
    s = report.stats
    print(f"[moestream] {s['cache_misses']} expert reads missed the cache, {s['evictions']} evictions, "
          f"{s['reads']} disk reads of {fmt_bytes(s['mean_read_bytes'])} on average; "
          f"expert cache peak {fmt_bytes(s['expert_cache_peak_bytes'])} of {fmt_bytes(s['cache_capacity_bytes'])}")
    print(f"[moestream] demo done in {time.perf_counter() - t0:.1f}s; try: moestream generate {bundle} "
          f"--prompt 'hello' --memory-budget {budget}")
    return report.as_dict()
