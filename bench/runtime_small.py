"""Runtime cost of streaming on a `small` synth bundle (4-bit experts), in one run:

1. decode speed with every expert cached (memory_budget=None, warmed up) against mlx-lm running
   the same weights fully in memory (mlx_lm.utils.load_model of the source checkpoint, experts
   `nn.quantize`d to 4 bits / group 64, cast to float32 as moestream does on the CPU): the
   streaming layer's own overhead (target: >= 0.9x);
2. with a memory budget whose expert cache holds 25% of the expert bytes (computed as
   moestream/demo.py does), for io_mode direct and buffered, each cold (the bundle's expert files
   evicted from the page cache first): bytes read per token, hit rate, mean read size, reads per
   token, read throughput during decode (bytes / io_wait_s and bytes / decode wall time), against
   the O_DIRECT ceiling that /work/shared/tools/iobench.py measures on the same filesystem.

Decode figures come from runtime/generate.py's generate_text (mlx-lm's stream_generate, greedy);
the same timing (first token to last token) is applied to mlx-lm's model. EOS is ignored so that
every run generates exactly --max-tokens tokens. The split between prefill and decode is taken
at the first token (mlx-lm computes one step ahead, so the window from the first to the last token
holds max_tokens - 1 forward passes: per-token figures divide by that). The two models run
alternately (--rounds) in one process; besides tok/s, the process CPU time per decode token is
printed, which time spent descheduled by other work on a shared machine does not inflate.

usage: python bench/runtime_small.py [--preset small] [--family qwen3_moe] [--layers N]
           [--max-tokens 64] [--rounds 3] [--workdir /tmp/moestream-bench-runtime]
           [--iobench-gib 1] [--breakdown] [--json FILE]

--breakdown adds an instrumented run (not part of the figures above) that times the streaming
layer's parts: host sync on the routed indices, expert lookup/read, mx.stack of the experts, and
the expert matmuls, next to the same split for mlx-lm's SwitchGLU.

Figures are printed, never asserted: the machine is shared and noisy; ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moestream.runtime.iobench import evict_page_cache, page_cache_bytes

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IOBENCH = Path("/work/shared/tools/iobench.py")
PROMPT = "Write a haiku about streaming experts from disk."
CACHE_SHARE = 0.25
TARGET_DECODE = 0.9


# ---------------------------------------------------------------- inputs


def make_inputs(work: Path, family: str, preset: str, layers: int | None) -> tuple[Path, Path]:
    """The synth checkpoint and its 4-bit bundle (made with the stage functions, no Prefect)."""
    from moestream.manifests.checkpoint import SourceCheckpoint
    from moestream.stages.pack import LayerJob, pack_layer
    from moestream.stages.quantize import ExpertRecipe
    from moestream.stages.synth import synth_checkpoint
    from moestream.stages.write import SourceInfo, finalize, staging_dir, write_bundle

    name = f"{family}-{preset}" + (f"-{layers}l" if layers else "")
    src, bundle = work / name, work / f"{name}-bundle-4bit"
    if not (src / "config.json").is_file():
        print(f"synth {family} {preset} -> {src}", flush=True)
        synth_checkpoint(family, src, preset=preset, seed=0, layers=layers)
    if not (bundle / "bundle.json").is_file():
        print(f"bundle (4-bit experts, group 64) -> {bundle}", flush=True)
        ckpt = SourceCheckpoint.open(src)
        recipe = ExpertRecipe(bits=4, group_size=64)
        staging = staging_dir(bundle)
        staging.mkdir(parents=True, exist_ok=True)
        n = ckpt.dims.num_experts
        extents = []
        for layer in ckpt.expert_layers:
            extents += pack_layer(ckpt, LayerJob(layer, recipe, tuple(range(n)), (4,) * n), staging)
        write_bundle(ckpt, staging, extents, recipe, SourceInfo(), None)
        finalize(staging, bundle)
    return src, bundle


def load_reference(src: Path):
    """mlx-lm's own model, fully in memory: experts quantized like the bundle's, float32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(src, lazy=True)
    nn.quantize(model, bits=4, group_size=64, class_predicate=lambda p, m: isinstance(m, SwitchLinear))
    model.set_dtype(mx.float32)
    model.eval()
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(src, eos_token_ids=config.get("eos_token_id"))
    tokenizer.eos_token_ids = set()  # generate exactly max_tokens
    return model, tokenizer


def load_streaming(bundle: Path, **kw):
    import moestream

    model, tokenizer = moestream.load(bundle, **kw)
    tokenizer.eos_token_ids = set()
    return model, tokenizer


def expert_bytes_in_memory(model) -> int:
    rt = model._moestream
    n = rt.store.bundle.num_experts if hasattr(rt.store, "bundle") else None
    return sum(rt.store.nbytes(layer, e) for layer in rt.store.layers for e in range(n))


def fill_cache(model) -> int:
    """Acquire every expert not yet cached (unbounded budget): afterwards all are cached."""
    rt = model._moestream
    added = 0
    for layer in rt.store.layers:
        missing = [e for e in range(rt.store.bundle.num_experts) if (layer, e) not in rt.cache]
        if missing:
            rt.streamer.acquire(layer, missing)
            rt.streamer.release(layer, missing)
            added += len(missing)
    return added


# ---------------------------------------------------------------- timed generation


class _FirstToken:
    """generate_text's `out`: snapshots moestream.stats at the first token (prefill/decode split)."""

    def __init__(self, model):
        self.model, self.at_first, self.t_first, self.cpu_first, self.chunks = model, None, None, None, []

    def write(self, s: str) -> None:
        if self.at_first is None:
            import moestream

            self.t_first, self.cpu_first = time.perf_counter(), time.process_time()
            self.at_first = moestream.stats(self.model)
        self.chunks.append(s)

    def flush(self) -> None:
        pass


def run_streaming(model, tokenizer, prompt, max_tokens: int) -> dict:
    import moestream
    from moestream.runtime.generate import generate_text

    before = moestream.stats(model)
    probe = _FirstToken(model)
    text, rep = generate_text(model, tokenizer, prompt, max_tokens=max_tokens, out=probe)
    cpu_end = time.process_time()
    after = rep.stats
    first = probe.at_first or before
    steps = max(1, rep.generated_tokens - 1)
    d = {k: after[k] - first[k] for k in ("bytes_read", "reads", "io_wait_s", "cache_hits", "cache_misses")}
    decode_s = steps / rep.tokens_per_s if rep.tokens_per_s else 0.0
    lookups = d["cache_hits"] + d["cache_misses"]
    return {
        "text": text,
        "generated_tokens": rep.generated_tokens,
        "prompt_tokens": rep.prompt_tokens,
        "ttft_s": rep.ttft_s,
        "tokens_per_s": rep.tokens_per_s,
        "p50_token_ms": rep.p50_token_ms,
        "p99_token_ms": rep.p99_token_ms,
        "decode_s": decode_s,
        # CPU time of the whole process (all threads) per decode step: steadier than wall time on a
        # shared machine, since time spent descheduled is not counted
        "cpu_ms_per_token": (cpu_end - probe.cpu_first) / steps * 1e3 if probe.cpu_first is not None else 0.0,
        "hit_rate_all": rep.hit_rate,
        "bytes_read_all": rep.bytes_read,
        "prefill_bytes_read": first["bytes_read"] - before["bytes_read"],
        "decode": {
            **d,
            "steps": steps,
            "bytes_per_token": d["bytes_read"] / steps,
            "reads_per_token": d["reads"] / steps,
            "mean_read_bytes": d["bytes_read"] / d["reads"] if d["reads"] else 0.0,
            "hit_rate": d["cache_hits"] / lookups if lookups else 0.0,
            "gbps_per_io_wait": d["bytes_read"] / d["io_wait_s"] / 1e9 if d["io_wait_s"] else 0.0,
            "gbps_per_decode_wall": d["bytes_read"] / decode_s / 1e9 if decode_s else 0.0,
            "io_wait_share": d["io_wait_s"] / decode_s if decode_s else 0.0,
        },
        "stats": after,
    }


def run_reference(model, tokenizer, prompt, max_tokens: int) -> dict:
    """generate_text's timing, applied to a plain mlx-lm model."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    times, text, cpu_first = [], [], None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        times.append(time.perf_counter())
        if cpu_first is None:
            cpu_first = time.process_time()
        text.append(r.text)
    cpu_end = time.process_time()
    n = len(times)
    gaps = np.diff(np.array(times)) * 1000
    decode_s = times[-1] - times[0]
    return {"text": "".join(text), "generated_tokens": n, "ttft_s": times[0] - start,
            "tokens_per_s": (n - 1) / decode_s, "p50_token_ms": float(np.percentile(gaps, 50)),
            "p99_token_ms": float(np.percentile(gaps, 99)), "decode_s": decode_s,
            "cpu_ms_per_token": (cpu_end - cpu_first) / (n - 1) * 1e3,
            "peak_memory_bytes": mx.get_peak_memory()}


# ---------------------------------------------------------------- iobench


def run_iobench(path: Path, gib: float) -> dict:
    """/work/shared/tools/iobench.py on a scratch file beside the bundle: GB/s per chunk size and
    thread count (O_DIRECT, random offsets, 3 s per cell)."""
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(IOBENCH), str(path), str(gib)], capture_output=True, text=True,
                           timeout=600)
    finally:
        path.unlink(missing_ok=True)
    table: dict[int, dict[int, float]] = {}
    threads: list[int] = []
    for line in p.stdout.splitlines():
        if line.startswith("chunk"):
            threads = [int(x) for x in re.findall(r"(\d+)t", line)]
        m = re.match(r"\s*(\d+)KiB\s+(.*)", line)
        if m and threads:
            table[int(m.group(1)) * 1024] = dict(zip(threads, (float(x) for x in m.group(2).split()), strict=False))
    return {"rc": p.returncode, "wall_s": time.perf_counter() - t, "gbps": table, "stdout": p.stdout,
            "stderr": p.stderr[-2000:]}


def ceiling_near(io: dict, read_bytes: float, threads: int) -> dict:
    """iobench's row at the chunk size nearest (in ratio) to moestream's mean read size: GB/s at the
    reader's thread count (or the nearest iobench measured) and the best over thread counts."""
    if not io["gbps"] or read_bytes <= 0:
        return {}
    chunk = min(io["gbps"], key=lambda c: abs(math.log(c / read_bytes)))
    row = io["gbps"][chunk]
    t = min(row, key=lambda k: abs(k - threads))
    return {"chunk": chunk, "threads": t, "gbps": row[t], "best_gbps": max(row.values()),
            "best_threads": max(row, key=row.get)}


# ---------------------------------------------------------------- breakdown (instrumented)


def breakdown(model, tokenizer, prompt, max_tokens: int, streaming: bool) -> dict:
    """Per decode token: where the MoE layers' time goes. Forces an extra eval after mx.stack
    (streaming) so the copy is timed on its own; timings are host wall clock."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import stream_generate
    from mlx_lm.models import switch_layers

    t = {"sync_s": 0.0, "lookup_read_s": 0.0, "stack_s": 0.0, "experts_matmul_s": 0.0, "other_moe_s": 0.0}
    undo = []
    if streaming:
        from moestream.runtime import streaming as sm

        cls = sm.StreamingSwitchGLU
        orig_call, orig_mlp, orig_acquire = cls.__call__, cls._mlp, sm.ExpertStreamer.acquire
        orig_np = sm.np

        class _NP:  # the streaming layer's one host sync is np.array(indices)
            def __getattr__(self, k):
                return getattr(orig_np, k)

            def array(self, *a, **k):
                s = time.perf_counter()
                r = orig_np.array(*a, **k)
                t["sync_s"] += time.perf_counter() - s
                return r

        def acquire(self, layer, experts):
            s = time.perf_counter()
            r = orig_acquire(self, layer, experts)
            t["lookup_read_s"] += time.perf_counter() - s
            return r

        orig_stack = mx.stack

        def stack(arrays, *a, **k):
            s = time.perf_counter()
            r = orig_stack(arrays, *a, **k)
            mx.eval(r)
            t["stack_s"] += time.perf_counter() - s
            return r

        class _MX:
            def __getattr__(self, k):
                return stack if k == "stack" else getattr(mx, k)

        def mlp(self, *a):
            s = time.perf_counter()
            r = orig_mlp(self, *a)
            t["experts_matmul_s"] += time.perf_counter() - s
            return r

        def call(self, x, indices):
            s = time.perf_counter()
            r = orig_call(self, x, indices)
            t["other_moe_s"] += time.perf_counter() - s
            return r

        sm.np, sm.mx = _NP(), _MX()
        cls.__call__, cls._mlp, sm.ExpertStreamer.acquire = call, mlp, acquire
        undo.append(lambda: (setattr(sm, "np", orig_np), setattr(sm, "mx", mx), setattr(cls, "__call__", orig_call),
                             setattr(cls, "_mlp", orig_mlp), setattr(sm.ExpertStreamer, "acquire", orig_acquire)))
    else:
        cls = switch_layers.SwitchGLU
        orig_call = cls.__call__

        def call(self, x, indices):
            s = time.perf_counter()
            np.array(indices)  # the same host sync, so both splits are comparable
            m = time.perf_counter()
            t["sync_s"] += m - s
            r = orig_call(self, x, indices)
            mx.eval(r)
            t["experts_matmul_s"] += time.perf_counter() - m
            t["other_moe_s"] += time.perf_counter() - s
            return r

        cls.__call__ = call
        undo.append(lambda: setattr(cls, "__call__", orig_call))
    try:
        times, marks = [], None
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            times.append(time.perf_counter())
            if marks is None:
                marks = dict(t)
        steps = len(times) - 1
        per = {k: (t[k] - marks[k]) / steps * 1e3 for k in t}
    finally:
        for u in undo:
            u()
    # _mlp's time includes acquire and stack; __call__'s includes everything: make them disjoint
    if streaming:
        per["experts_matmul_s"] -= per["lookup_read_s"] + per["stack_s"]
    per["other_moe_s"] -= per["sync_s"] + per["lookup_read_s"] + per["stack_s"] + per["experts_matmul_s"]
    total = (times[-1] - times[0]) / steps * 1e3
    per = {k.replace("_s", "_ms"): v for k, v in per.items()}
    per["outside_moe_ms"] = total - sum(per.values())
    per["token_ms"] = total
    return per


# ---------------------------------------------------------------- driver


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (faster on a slow CPU)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating streaming/mlx-lm decode runs")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--cache-share", type=float, default=CACHE_SHARE)
    ap.add_argument("--workdir", default="/tmp/moestream-bench-runtime")
    ap.add_argument("--iobench-gib", type=float, default=1.0, help="0 skips iobench")
    ap.add_argument("--breakdown", action="store_true", help="also time the streaming layer's parts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx.core as mx

    import moestream
    from moestream.runtime.generate import format_prompt

    load0 = os.getloadavg()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, bundle = make_inputs(work, args.family, args.preset, args.layers)
    expert_files = sorted((bundle / "experts").glob("*.bin"))
    info = moestream.inspect(bundle)
    print(f"bundle {bundle}: {info.get('family')}, {mx.default_device()}, max_tokens {args.max_tokens}", flush=True)
    out: dict = {"bundle": str(bundle), "source": str(src), "preset": args.preset, "family": args.family,
                 "layers": args.layers, "max_tokens": args.max_tokens, "device": str(mx.default_device())}

    # ---- 1. decode with every expert cached vs mlx-lm fully in memory
    ms_model, ms_tok = load_streaming(bundle, memory_budget=None)
    prompt = format_prompt(ms_tok, args.prompt)
    warm = run_streaming(ms_model, ms_tok, prompt, args.max_tokens)
    added = fill_cache(ms_model)
    ref_model, ref_tok = load_reference(src)
    run_reference(ref_model, ref_tok, prompt, 8)  # warm-up
    print(f"warm-up: prompt {warm['prompt_tokens']} tokens; {added} experts not touched by it were loaded, "
          f"so all {len(ms_model._moestream.cache)} are cached", flush=True)
    ms_runs, ref_runs = [], []
    for rnd in range(1, args.rounds + 1):
        if rnd % 2:  # alternate who goes first, so drift in the machine's load hits both alike
            ms_runs.append(run_streaming(ms_model, ms_tok, prompt, args.max_tokens))
            ref_runs.append(run_reference(ref_model, ref_tok, prompt, args.max_tokens))
        else:
            ref_runs.append(run_reference(ref_model, ref_tok, prompt, args.max_tokens))
            ms_runs.append(run_streaming(ms_model, ms_tok, prompt, args.max_tokens))
        print(f"  round {rnd}: moestream {ms_runs[-1]['tokens_per_s']:.2f} tok/s (hit rate "
              f"{ms_runs[-1]['decode']['hit_rate']:.1%}), mlx-lm {ref_runs[-1]['tokens_per_s']:.2f} tok/s", flush=True)
    same_text = all(m["text"] == r["text"] for m, r in zip(ms_runs, ref_runs, strict=True))
    out["decode_all_cached"] = {"moestream": ms_runs, "mlx_lm": ref_runs, "same_text": same_text}
    bd = None
    if args.breakdown:
        bd = {"moestream": breakdown(ms_model, ms_tok, prompt, args.max_tokens, True),
              "mlx_lm": breakdown(ref_model, ref_tok, prompt, args.max_tokens, False)}
        out["breakdown_ms_per_token"] = bd

    # the budget, as moestream/demo.py computes it
    plan = ms_model._moestream.plan
    expert_bytes = expert_bytes_in_memory(ms_model)
    cache = max(plan.min_layer_bytes, int(args.cache_share * expert_bytes))
    budget = plan.resident_bytes + plan.kv_reserve_bytes + plan.buffer_bytes + cache
    out["budget"] = {**plan.as_dict(), "budget_bytes": budget, "cache_bytes": cache,
                     "expert_bytes_in_memory": expert_bytes, "expert_bytes_on_disk": info.get("expert_bytes")}
    del ms_model, ref_model
    mx.clear_cache()

    # ---- 2. iobench: the O_DIRECT ceiling on the bundle's filesystem
    io = None
    if args.iobench_gib > 0 and IOBENCH.is_file():
        print(f"iobench.py {args.iobench_gib} GiB on {work} (about 80 s) ...", flush=True)
        io = run_iobench(work / "iobench.scratch", args.iobench_gib)
        out["iobench"] = {k: v for k, v in io.items() if k != "stdout"}
        print(io["stdout"].rstrip())

    # ---- 3. 25% budget, cold, direct and buffered
    budget_runs = {}
    for mode in ("direct", "buffered"):
        evict_page_cache(expert_files)
        before = page_cache_bytes(expert_files)
        mx.reset_peak_memory()  # get_peak_memory is process-wide: count this run only
        model, tok = load_streaming(bundle, memory_budget=budget, io_mode=mode)
        r = run_streaming(model, tok, format_prompt(tok, args.prompt), args.max_tokens)
        r["expert_files_cached_before"] = before
        r["expert_files_cached_after"] = page_cache_bytes(expert_files)
        r["threads"] = model._moestream.reader.threads
        budget_runs[mode] = r
        print(f"  budget {mode}: {r['tokens_per_s']:.2f} tok/s, decode hit rate {r['decode']['hit_rate']:.1%}", flush=True)
        if args.breakdown and mode == "direct":  # after the measured run: the cache is in its steady state
            bd = bd or {}
            bd[f"moestream {int(args.cache_share * 100)}% budget, direct"] = breakdown(model, tok, format_prompt(tok, args.prompt),
                                                                        args.max_tokens, True)
            out["breakdown_ms_per_token"] = bd
        del model
        mx.clear_cache()
    out["budget_runs"] = budget_runs
    if io:
        for r in budget_runs.values():
            r["iobench_near"] = ceiling_near(io, r["decode"]["mean_read_bytes"] or r["stats"]["mean_read_bytes"],
                                             r["threads"])

    # ---- tables
    print()
    print(f"decode, every expert cached (prompt {ms_runs[0]['prompt_tokens']} tokens, {args.max_tokens} generated, "
          f"greedy; same text as mlx-lm: {'yes' if same_text else 'NO'})")
    head = f"{'model':<34}{'tok/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'TTFT s':>8}{'CPU ms/tok':>12}"
    print(head)
    print("-" * len(head))
    for rnd, (m, r) in enumerate(zip(ms_runs, ref_runs, strict=True), 1):
        print(f"{'moestream (budget none)  r' + str(rnd):<34}{m['tokens_per_s']:8.2f}{m['p50_token_ms']:8.1f}"
              f"{m['p99_token_ms']:8.1f}{m['ttft_s']:8.2f}{m['cpu_ms_per_token']:12.1f}")
        print(f"{'mlx-lm in memory         r' + str(rnd):<34}{r['tokens_per_s']:8.2f}{r['p50_token_ms']:8.1f}"
              f"{r['p99_token_ms']:8.1f}{r['ttft_s']:8.2f}{r['cpu_ms_per_token']:12.1f}")
    ratios = [m["tokens_per_s"] / r["tokens_per_s"] for m, r in zip(ms_runs, ref_runs, strict=True)]
    best = max(m["tokens_per_s"] for m in ms_runs) / max(r["tokens_per_s"] for r in ref_runs)
    med = statistics.median(ratios)
    ttft = statistics.median(m["ttft_s"] for m in ms_runs) / statistics.median(r["ttft_s"] for r in ref_runs)
    cpu = statistics.median(r["cpu_ms_per_token"] for r in ref_runs) / statistics.median(m["cpu_ms_per_token"] for m in ms_runs)
    out["decode_ratio"] = {"per_round": ratios, "median": med, "best_vs_best": best, "ttft_ratio_median": ttft,
                           "cpu_time_ratio_median": cpu}
    print(f"decode tok/s ratio moestream / mlx-lm: per round {', '.join(f'{x:.2f}x' for x in ratios)}; median "
          f"{med:.2f}x, best vs best {best:.2f}x (target >= {TARGET_DECODE}x: "
          f"{'met' if med >= TARGET_DECODE else 'missed'} by the median); TTFT ratio (median) {ttft:.2f}x")
    print(f"CPU time per decode token (whole process, medians): mlx-lm / moestream = {cpu:.2f}x (the tok/s ratio an "
          f"idle machine would show if decode is CPU-bound)")
    if bd:
        print()
        print("where a decode token's time goes (instrumented run, ms per token; an extra eval isolates mx.stack)")
        keys = ["sync_ms", "lookup_read_ms", "stack_ms", "experts_matmul_ms", "other_moe_ms", "outside_moe_ms", "token_ms"]
        print(f"{'':<30}" + "".join(f"{k[:-3]:>15}" for k in keys))
        for name, per in bd.items():
            print(f"{name:<30}" + "".join(f"{per.get(k, 0.0):15.1f}" for k in keys))
        print("(sync: np.array(indices), which waits for attention + router of the layer; lookup_read: cache lookups, "
              "reads and unpacking; stack: mx.stack of the routed experts (and the lazy float32 casts of freshly read "
              "ones); experts_matmul: gather_qmm up/gate/down + eval)")

    b = out["budget"]
    print()
    print(f"budget {b['budget_bytes'] / 1e6:.1f} MB = resident {b['resident_bytes'] / 1e6:.1f} + KV reserve "
          f"{b['kv_reserve_bytes'] / 1e6:.1f} + buffers {b['buffer_bytes'] / 1e6:.1f} + expert cache "
          f"{b['cache_bytes'] / 1e6:.1f} MB ({b['cache_bytes'] / b['expert_bytes_in_memory']:.0%} of "
          f"{b['expert_bytes_in_memory'] / 1e6:.1f} MB of experts in memory; {(b['expert_bytes_on_disk'] or 0) / 1e6:.1f} MB on disk)")
    head = (f"{'io':<9}{'tok/s':>7}{'TTFT s':>8}{'hit':>7}{'MB/tok':>8}{'reads/tok':>10}{'read KB':>9}"
            f"{'io wait':>9}{'GB/s io':>9}{'GB/s wall':>10}{'ceiling':>9}{'io/ceil':>9}{'cache MB':>10}")
    print(f"cold start, decode phase only ({args.max_tokens - 1} steps after the first token)")
    print(head)
    print("-" * len(head))
    for mode, r in budget_runs.items():
        d = r["decode"]
        ceil = r.get("iobench_near") or {}
        after = r["expert_files_cached_after"]
        c = f"{ceil['gbps']:9.2f}{d['gbps_per_io_wait'] / ceil['gbps']:9.0%}" if ceil else f"{'-':>9}{'-':>9}"
        print(f"{mode:<9}{r['tokens_per_s']:7.2f}{r['ttft_s']:8.2f}{d['hit_rate']:7.1%}{d['bytes_per_token'] / 1e6:8.2f}"
              f"{d['reads_per_token']:10.1f}{d['mean_read_bytes'] / 1e3:9.0f}{d['io_wait_share']:9.0%}"
              f"{d['gbps_per_io_wait']:9.2f}{d['gbps_per_decode_wall']:10.3f}{c}{(after or 0) / 1e6:10.0f}")
    print("(io wait: share of decode wall time inside reader.read; GB/s io: decode bytes / io_wait_s; GB/s wall: decode "
          "bytes / decode wall time; ceiling: iobench O_DIRECT GB/s at the chunk size nearest the mean read, at the "
          "reader's thread count; cache MB: the bundle's expert files in the OS page cache afterwards)")
    for mode, r in budget_runs.items():
        ceil = r.get("iobench_near")
        if ceil:
            print(f"{mode}: ceiling row {ceil['chunk'] >> 10} KiB: {ceil['gbps']:.2f} GB/s at {ceil['threads']} threads "
                  f"(the reader's {r['threads']}), best {ceil['best_gbps']:.2f} GB/s at {ceil['best_threads']} threads")
    for mode, r in budget_runs.items():
        s = r["stats"]
        print(f"{mode}: whole run incl. prefill: {r['bytes_read_all'] / 1e6:.1f} MB read ({r['prefill_bytes_read'] / 1e6:.1f} "
              f"MB before the first token), {s['reads']} reads of {s['mean_read_bytes'] / 1e3:.0f} KB mean, hit rate "
              f"{r['hit_rate_all']:.1%}, {s['evictions']} evictions, peak MLX memory {s['peak_memory_bytes'] / 1e6:.0f} MB, "
              f"io_mode in use {s['io_mode']}")

    load1 = os.getloadavg()
    out["loadavg_start"], out["loadavg_end"] = load0, load1
    print(f"load average (1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, at end "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} CPUs (other work shares the machine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
