"""Which experts a long prompt's prefill may cache without costing the decode its hit rate.

For each admission rule of the streaming layer's prefill (runtime.model.streaming.PREFILL_ADMISSION:
free, all, tail, none), the decode hit rate of the same decode tokens after a short and after a long
prompt, from an empty cache ("cold") and with the same request run once before ("warm", as `moestream
bench` runs cold then warm: the decode's experts are the hot set a long prompt must not flush). Routing is a real trace (the synth model's profile on the
shipped calibration text), replayed through the real ExpertStreamer, ExpertCache and reader with no
compute (runtime.measure.replay.prefill_admission_replay). --model also runs the model itself on
the bundle (mlx-lm's generate_step, as `moestream bench` does): the warm run's decode hit rate after
a short and after a long prompt, per rule.

    python bench/prefill_admission.py [--preset small] [--budgets 0.10,0.25] [--policies lru,lfu]
        [--prompts 16,512] [--decode-tokens 32] [--model] [--work /var/tmp/moestream_prefill] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def model_runs(bundle: Path, rules, budget: float, prompts, gen_tokens: int) -> list[dict]:
    """The model on the bundle, per rule and prompt length: cold, then warm (the same prompt again,
    as `moestream bench` runs them); decode hit rates."""
    import numpy as np

    import moestream
    from moestream.runtime.measure.bench import decode

    plan = moestream.plan_memory(bundle, expert_cache_share=budget)
    rows = []
    for rule in rules:
        for n in prompts:
            prompt = np.random.default_rng(0).integers(0, 300, size=n).tolist()
            with moestream.load(bundle, memory_budget=plan.budget_bytes) as (model, _):
                moestream.runtime_of(model).streamer.prefill_admission = rule
                cold, warm = decode(model, prompt, gen_tokens), decode(model, prompt, gen_tokens)
            rows.append({"rule": rule, "prompt_tokens": n, "budget": budget, "cold_hit_rate": cold["hit_rate"],
                         "warm_hit_rate": warm["hit_rate"], "cold_ttft_s": cold["ttft_s"], "warm_ttft_s": warm["ttft_s"]})
            print(f"model: rule {rule:>5} prompt {n:>5}: decode hit rate cold {cold['hit_rate']:.3f} warm "
                  f"{warm['hit_rate']:.3f}; TTFT cold {cold['ttft_s']:.2f} s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens profiled (the trace)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--work", default="/var/tmp/moestream_prefill")
    ap.add_argument("--budgets", default="0.10,0.25")
    ap.add_argument("--policies", default="lru,lfu")
    ap.add_argument("--rules", default="free,all,tail,none")
    ap.add_argument("--prompts", default="16,512")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8, help="decode windows averaged")
    ap.add_argument("--model", action="store_true", help="also run the model itself (slow on a CPU)")
    ap.add_argument("--model-budget", type=float, default=0.25)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)

    from moestream.runtime.measure.replay import format_admission_table, prefill_admission_replay
    from moestream.stages.profile import profile_model

    inputs = common.make_inputs(args.work, args.family, args.preset)
    print(common.setup_line())
    prof = Path(args.work) / f"profile-{args.tokens}"
    if not (prof / "trace.parquet").exists():
        r = profile_model(inputs.source, None, prof, max_tokens=args.tokens, seq_len=args.seq_len, plots=False)
        print(f"profile: {r.run['tokens']} tokens in {r.run['seconds']:.1f} s", flush=True)
    rules = args.rules.split(",")
    prompts = [int(n) for n in args.prompts.split(",")]
    rows, seconds = common.timed(prefill_admission_replay, inputs.bundle, prof / "trace.parquet", rules=rules,
                                 budgets=[float(b) for b in args.budgets.split(",")], policies=args.policies.split(","),
                                 prompt_tokens=prompts, decode_tokens=args.decode_tokens, requests=args.requests)
    report = {"args": vars(args), "setup": common.setup_line(), "replay": rows}
    print(f"\ndecode hit rate after a prompt ({args.decode_tokens} decode tokens, {args.requests} windows of the trace, "
          f"replayed in {seconds:.0f} s); diff = long prompt minus short, in points:")
    print(format_admission_table(rows))
    if args.model:
        report["model"] = model_runs(inputs.bundle, rules, args.model_budget, prompts, args.decode_tokens)
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
