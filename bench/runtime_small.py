"""Runtime cost of streaming on a `small` synth bundle (qwen3_moe, 6 layers x 64 experts, top-8, 4-bit
experts, group 64), in one run:

1. every expert cached (no memory budget; the experts a warm-up did not touch are read in first)
   against mlx-lm running the same weights fully in memory (experts `nn.quantize`d alike, float32 on
   the CPU as moestream computes): the streaming layer's own overhead. The two alternate (--rounds),
   each a greedy decode of a chat prompt timed by `moestream bench`'s decode (mlx-lm's generate_step,
   first token to last); besides tok/s, the process CPU time per generated token (the whole decode
   call, prompt included), which time spent descheduled on a shared machine does not inflate; and
   whether both generate the same tokens;
2. `moestream bench`'s run (runtime.measure.bench.bench_bundle, `--compare buffered`) at a budget
   whose expert cache holds --cache-share of the experts: direct and buffered reads, each cold then
   warm, on random prompt tokens: bytes and reads per token, hit rate, read rate while reading
   against the disk's O_DIRECT ceiling over the bundle's own files, the share of decode time spent
   waiting for reads.

    python bench/runtime_small.py [--preset small] [--family qwen3_moe] [--layers N] [--max-tokens 64]
        [--rounds 3] [--workdir /tmp/moestream-bench-runtime] [--json FILE]

Figures are printed, never asserted: the machine is shared and noisy; ratios come from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common

PROMPT = "Write a haiku about streaming experts from disk."


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def decode_with_cpu(model, prompt: list[int], n: int) -> dict:
    from moestream.runtime.measure.bench import decode

    cpu = time.process_time()
    r = decode(model, prompt, n)
    r["cpu_ms_per_token"] = (time.process_time() - cpu) / n * 1e3
    return r


def all_cached_vs_mlx_lm(inputs: common.Inputs, max_tokens: int, rounds: int) -> dict:
    """Part 1: moestream with every expert cached against mlx-lm fully in memory, alternating."""
    import moestream
    from moestream.manifests.open import open_bundle
    from moestream.runtime.frontends.generate import format_prompt
    from moestream.runtime.measure.bench import expert_quantization, reference_model

    with moestream.load(inputs.bundle) as (model, tokenizer):
        prompt = format_prompt(tokenizer, PROMPT)
        prompt = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        decode_with_cpu(model, prompt, 4)  # warm-up: kernels compiled
        rt = moestream.runtime_of(model)
        for layer in rt.store.layers:  # every expert the warm-up did not route to, read in now
            missing = [e for e in range(rt.num_experts) if (layer, e) not in rt.cache]
            rt.streamer.acquire(layer, missing)
            rt.streamer.release(layer, missing)
        ref = reference_model(inputs.source, expert_quantization(open_bundle(inputs.bundle)))
        decode_with_cpu(ref, prompt, 4)
        print(f"prompt {len(prompt)} tokens; all {len(rt.cache)} experts cached", flush=True)
        runs = []
        for rnd in range(1, rounds + 1):
            pair = [("moestream", model), ("mlx-lm", ref)]
            r = {name: decode_with_cpu(m, prompt, max_tokens) for name, m in (pair if rnd % 2 else pair[::-1])}
            runs.append(r)  # who goes first alternates, so drift in the machine's load hits both alike
            print(f"  round {rnd}: moestream {r['moestream']['tokens_per_s']:.2f} tok/s (hit rate "
                  f"{r['moestream']['hit_rate']:.1%}), mlx-lm {r['mlx-lm']['tokens_per_s']:.2f} tok/s", flush=True)
        same = greedy_tokens(model, prompt, max_tokens) == greedy_tokens(ref, prompt, max_tokens)
    ratios = [r["moestream"]["tokens_per_s"] / r["mlx-lm"]["tokens_per_s"] for r in runs]
    cpu = [r["mlx-lm"]["cpu_ms_per_token"] / r["moestream"]["cpu_ms_per_token"] for r in runs]
    return {"prompt_tokens": len(prompt), "rounds": runs, "same_tokens": same, "tok_s_ratio": ratios,
            "tok_s_ratio_median": statistics.median(ratios), "cpu_time_ratio_median": statistics.median(cpu)}


def print_all_cached(part: dict, max_tokens: int) -> None:
    rows = [{"run": f"{name} r{i}", **r[name]} for i, r in enumerate(part["rounds"], 1) for name in ("moestream", "mlx-lm")]
    print(f"\ndecode, every expert cached vs mlx-lm in memory (prompt {part['prompt_tokens']} tokens, {max_tokens} "
          f"generated, greedy; same tokens: {'yes' if part['same_tokens'] else 'NO'})")
    print(common.table(rows, [("run", "run", ""), ("tok/s", "tokens_per_s", ".2f"), ("p50 ms", "p50_token_ms", ".1f"),
                              ("p99 ms", "p99_token_ms", ".1f"), ("TTFT s", "ttft_s", ".2f"),
                              ("CPU ms/tok", "cpu_ms_per_token", ".1f")]))
    print(f"tok/s ratio moestream / mlx-lm: per round {', '.join(f'{x:.2f}x' for x in part['tok_s_ratio'])}, median "
          f"{part['tok_s_ratio_median']:.2f}x; CPU time per token mlx-lm / moestream (median) "
          f"{part['cpu_time_ratio_median']:.2f}x")


def print_budget_runs(report: dict) -> None:
    b = report["budget"]
    print(f"\nbudget {b['budget_bytes'] / 1e6:.1f} MB (expert cache {b['expert_cache_bytes'] / 1e6:.1f} MB of "
          f"{b['expert_bytes_in_memory'] / 1e6:.1f} MB of experts); ceiling {report['ceiling']['gb_per_s']:.2f} GB/s; "
          "decode phase only")
    rows = [{"run": name, **report[name]} for name in ("cold", "warm", "buffered_cold", "buffered_warm")]
    print(common.table(rows, [
        ("run", "run", ""), ("tok/s", "tokens_per_s", ".2f"), ("hit", "hit_rate", ".1%"),
        ("MB/tok", lambda r: r["bytes_read_per_token"] / 1e6, ".2f"),
        ("reads/tok", lambda r: r["reads"] / max(r["decode_tokens"], 1), ".1f"),
        ("read KB", lambda r: r["mean_read_bytes"] / 1e3, ".0f"),
        ("io wait", lambda r: r["io_wait_s"] / r["decode_s"], ".0%"),
        ("GB/s io", "read_gb_per_s_during_io", ".2f"), ("io/ceiling", "io_efficiency", ".0%")]))
    print("(io wait: share of decode time inside the reader; GB/s io: decode bytes / time waiting for reads)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (faster on a slow CPU)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating moestream / mlx-lm decode runs")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="random prompt tokens of the budget runs")
    ap.add_argument("--cache-share", type=float, default=0.25)
    ap.add_argument("--workdir", default="/tmp/moestream-bench-runtime")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from moestream.runtime.measure.bench import bench_bundle
    from moestream.runtime.measure.report import print_report

    load0 = os.getloadavg()
    print(common.setup_line(), flush=True)
    inputs = common.make_inputs(args.workdir, args.family, args.preset, args.layers)
    out = {"args": vars(args), "setup": common.setup_line(), **inputs.made_s}
    out["all_cached"] = all_cached_vs_mlx_lm(inputs, args.max_tokens, args.rounds)
    out["budget"] = bench_bundle(inputs.bundle, args.cache_share, args.prompt_tokens, args.max_tokens,
                                 compare=("buffered",))
    print_report(out["budget"])
    print_all_cached(out["all_cached"], args.max_tokens)
    print_budget_runs(out["budget"])
    load1 = os.getloadavg()
    print(f"load average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f} on {os.cpu_count()} CPUs")
    common.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
