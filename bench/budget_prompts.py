"""Does the memory budget hold for every prompt? Peak memory against the budget for prompts of
several lengths, on the `small` synth preset and the trained fixture, at the minimum budget and at
the budget whose expert cache holds 25% of the experts.

    python bench/budget_prompts.py --workdir /tmp/budget-bench
    python bench/budget_prompts.py --workdir /tmp/budget-bench --prefill-step-size 100000   # one chunk: as before
    python bench/budget_prompts.py --workdir /tmp/budget-bench --check-formula   # formula vs measured, per chunk

Each run is moestream's generate_text (mlx-lm's stream_generate, prefill chunks from the memory plan,
the KV cache bounded to the budget's reserve) of 8 tokens after a prompt of random token ids. "peak"
is mx.get_peak_memory() over the run (MLX's allocator counts every array on the CPU backend too),
less what MLX held before the model loaded, plus the reader's idle host buffers, the only memory
the runtime keeps outside MLX on the default read path (experts are read straight into MLX arrays). "rss+" is the growth of the process's peak RSS over
its RSS before the run (VmHWM), beside "mlx+", the growth of MLX's peak over what MLX held before
the run: RSS also counts MLX's buffer cache (freed arrays kept for reuse, which mlx-lm clears after
every prefill chunk) and Python's own allocations (tokenizer, numpy, lazily imported modules), so it
is printed, not compared with the budget. Pages stay resident once touched, so a run after a larger
one shows little RSS growth.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "qwen3-moe-tiny-tools"


def bundles(work: Path, models: list[str]) -> dict[str, Path]:
    out = {}
    for name in models:
        if name == "small":
            out[name] = common.make_inputs(work, "qwen3_moe", "small").bundle
        elif name == "fixture":
            out[name] = common.prepare_bundle(FIXTURE, work / "fixture-bundle")[0]
        else:
            raise SystemExit(f"unknown model {name!r}: small or fixture")
    return out


def budget_of(bundle: Path, label: str) -> int:
    import moestream

    if label == "min":
        return moestream.plan_memory(bundle).minimum_bytes
    return moestream.plan_memory(bundle, expert_cache_share=float(label.rstrip("%")) / 100).budget_bytes


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [(i * 7919 + seed * 104729) % (vocab - 10) + 5 for i in range(n)]


def run_prompts(name: str, bundle: Path, label: str, lengths: list[int], max_tokens: int, step: int | None) -> list[dict]:
    import mlx.core as mx

    import moestream
    from moestream.runtime.frontends.generate import generate_text

    budget = budget_of(bundle, label)
    rows = []
    gc.collect()
    held = mx.get_active_memory()  # arrays of earlier runs not yet freed: not this model's
    with moestream.load(bundle, memory_budget=budget) as (model, tokenizer):
        plan = moestream.runtime_of(model).plan
        print(f"  {name} {label}: expert cache {plan.cache_bytes / 1e6:.1f} MB during the plan's prefill chunk, "
              f"{plan.decode_cache_bytes / 1e6:.1f} MB while decoding (it borrows the prefill's room)", flush=True)
        for n in lengths:
            mx.clear_cache()
            rss0, active0 = common.rss_bytes(), mx.get_active_memory()
            common.reset_peak_rss()
            _, r = generate_text(model, tokenizer, prompt(n, model.args.vocab_size), max_tokens=max_tokens, out=None,
                                 prefill_step_size=step)
            peak = r.peak_memory_bytes - held
            rows.append({"model": name, "budget": label, "prompt": n, "chunk": r.prefill_step_size,
                         "budget_mb": budget / 1e6, "peak_mb": peak / 1e6,
                         "host_mb": r.host_buffer_bytes / 1e6,
                         "ratio": peak / budget, "rss_growth_mb": (common.peak_rss_bytes() - rss0) / 1e6,
                         "mlx_growth_mb": (r.peak_memory_bytes - r.host_buffer_bytes - active0) / 1e6,
                         "ttft_s": r.ttft_s, "rotated": "yes" if r.kv_rotated else "",
                         "plan_chunk": plan.prefill_tokens, "cache_mb": plan.cache_bytes / 1e6,
                         "decode_cache_mb": plan.decode_cache_bytes / 1e6,
                         "cache_after_mb": moestream.runtime_of(model).cache.stats()["expert_cache_bytes"] / 1e6})
            print(f"  {name} {label} prompt {n}: peak {rows[-1]['peak_mb']:.1f} MB of {budget / 1e6:.1f} "
                  f"({rows[-1]['ratio']:.2f}), chunk {r.prefill_step_size}, TTFT {r.ttft_s:.1f} s", flush=True)
    return rows


CHUNKS = [(0, 16), (0, 64), (0, 256), (0, 1024), (1024, 256)]


def check_formula(name: str, bundle: Path, label: str, cases) -> list[dict]:
    """One forward pass of c tokens over a KV cache of p tokens, the expert cache warm and full:
    mx.get_peak_memory() minus the memory before, against MemoryNeeds.chunk_bytes(c, p + c)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    import moestream

    rows = []
    with moestream.load(bundle, memory_budget=budget_of(bundle, label)) as (model, _):
        rt = moestream.runtime_of(model)
        # the cache kept at the plan's size for every pass, as the formula takes it: with the
        # prefill's room lent, a pass after a longer one lets the cache grow, and that growth is
        # the cache's, not the pass's (the peaks of whole prompts above include it)
        rt.streamer.lend_prefill_room = False
        vocab = model.args.vocab_size

        def forward(cache, n, seed):
            model(mx.array(prompt(n, vocab, seed))[None], cache=cache)
            mx.eval([c.state for c in cache])

        forward(make_prompt_cache(model), 256, 1)  # fill the expert cache
        for p, c in cases:
            cache = make_prompt_cache(model)
            for start in range(0, p, 512):
                forward(cache, min(512, p - start), 2 + start)
            mx.clear_cache()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            forward(cache, c, 3)
            measured = mx.get_peak_memory() - before
            formula = rt.plan.needs.chunk_bytes(c, p + c, rt.plan.cache_bytes)
            rows.append({"model": name, "budget": label, "context": p, "chunk": c, "measured_mb": measured / 1e6,
                         "formula_mb": formula / 1e6, "ratio": measured / formula})
            print(f"  {name} {label} p={p} c={c}: measured {measured / 1e6:.2f} MB, formula {formula / 1e6:.2f} MB "
                  f"({measured / formula:.2f})", flush=True)
            del cache
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moestream-budget-prompts", help="where the bundles are made (once)")
    ap.add_argument("--models", default="small,fixture", help="small (synth preset) and/or fixture (the trained one)")
    ap.add_argument("--budgets", default="min,25%", help="'min' (the least that runs) and/or expert cache shares like 25%%")
    ap.add_argument("--prompts", default="16,256,1024,4096", help="prompt lengths in tokens")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated after each prompt")
    ap.add_argument("--prefill-step-size", type=int, default=None,
                    help="force this chunk instead of the plan's (e.g. 100000: the whole prompt at once, as before)")
    ap.add_argument("--check-formula", action="store_true",
                    help="measure single forward passes against the activation formula instead")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    print(common.setup_line(), flush=True)
    work = Path(args.workdir)
    models = bundles(work, args.models.split(","))
    labels = args.budgets.split(",")
    rows = []
    t0 = time.perf_counter()
    for name, bundle in models.items():
        for label in labels:
            if args.check_formula:
                cases = CHUNKS + ([(2048, 512)] if name == "fixture" else [])
                rows += check_formula(name, bundle, label, cases)
            else:
                rows += run_prompts(name, bundle, label, [int(x) for x in args.prompts.split(",")], args.max_tokens,
                                    args.prefill_step_size)
    print()
    if args.check_formula:
        print(common.table(rows, [("model", "model", ""), ("budget", "budget", ""), ("context", "context", "d"),
                                  ("chunk", "chunk", "d"), ("measured MB", "measured_mb", ".2f"),
                                  ("formula MB", "formula_mb", ".2f"), ("measured/formula", "ratio", ".2f")]))
    else:
        print(common.table(rows, [("model", "model", ""), ("budget", "budget", ""), ("prompt", "prompt", "d"),
                                  ("chunk", "chunk", "d"), ("budget MB", "budget_mb", ".1f"), ("peak MB", "peak_mb", ".1f"),
                                  ("host MB", "host_mb", ".2f"),
                                  ("peak/budget", "ratio", ".3f"), ("cache after MB", "cache_after_mb", ".1f"),
                                  ("mlx+ MB", "mlx_growth_mb", ".1f"),
                                  ("rss+ MB", "rss_growth_mb", ".1f"),
                                  ("TTFT s", "ttft_s", ".2f"), ("KV rotated", "rotated", "")]))
        worst = max(rows, key=lambda r: r["ratio"])
        print(f"\nworst peak/budget {worst['ratio']:.3f} ({worst['model']}, {worst['budget']}, prompt {worst['prompt']})")
    print(f"({time.perf_counter() - t0:.0f} s)")
    common.write_json(args.json, {"setup": common.setup_line(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
