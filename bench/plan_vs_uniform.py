"""Mixed precision vs uniform bits at equal expert bytes read per token.

Measures each expert's output error at 2/3/4/8 bits on routed calibration inputs (stages/plan.py),
then, for a uniform width U, finds the plan whose expected bytes read per token (expert sizes weighted
by how often the calibration routes to each expert) matches uniform-U's, prepares both bundles and
scores them against the source (KL, top-1, perplexity on held-out text; tool-call validity).

    python bench/plan_vs_uniform.py fixtures/qwen3-moe-tiny-tools --uniform 3 --text fixtures/train/heldout_text.txt \
        --tools tools.jsonl --workdir /tmp/plan
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def expected_bytes_per_token(sizes: dict, bits: dict, counts: dict, tokens: int) -> float:
    return sum(counts.get(key, 0) * sizes[key][b] for key, b in bits.items()) / max(tokens, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--uniform", type=int, default=3)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tools", default=None)
    ap.add_argument("--calibration", default=None, help="default: the shipped calibration set")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--workdir", default="/tmp/moestream-plan")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from moestream.stages.eval import evaluate, load_tool_examples
    from moestream.stages.plan import allocate, calibration_token_ids, collect_routed_inputs, expert_errors
    from moestream.stages.sequential import prepare_sequential

    src, work = Path(a.source), Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ids = calibration_token_ids(src, a.calibration, a.calibration_tokens)
    errors, sizes = expert_errors(src, ids)
    _, counts, _ = collect_routed_inputs(src, ids)
    tokens = len(ids)
    uniform = {key: a.uniform for key in errors}
    target = expected_bytes_per_token(sizes, uniform, counts, tokens)

    # the plan's budget is total expert bytes; search it so that bytes read per token match uniform's
    lo, hi = sum(s[min(s)] for s in sizes.values()), sum(s[max(s)] for s in sizes.values())
    best = None
    for _ in range(30):
        mid = (lo + hi) // 2
        plan = allocate(errors, sizes, mid)
        bpt = expected_bytes_per_token(sizes, plan.bits, counts, tokens)
        if bpt <= target:
            best, lo = plan, mid + 1
        else:
            hi = mid - 1
    assert best is not None
    text = Path(a.text).read_text()
    tools = load_tool_examples(a.tools) if a.tools else None
    suites = ("kl", "perplexity") + (("tools",) if tools else ())
    rows = {}
    for name, plan in (("uniform", None), ("plan", best.bits)):
        out = work / name
        if not (out / "bundle.json").exists():
            prepare_sequential(src, out, bits=a.uniform, plan=plan)
        result = evaluate(out, src, suites=suites, text=text, tool_examples=tools)
        bits = plan or uniform
        rows[name] = {
            "expected_bytes_per_token": expected_bytes_per_token(sizes, bits, counts, tokens),
            "expert_bytes": sum(sizes[k][b] for k, b in bits.items()),
            "bits_histogram": {str(b): sum(1 for x in bits.values() if x == b) for b in sorted(set(bits.values()))},
            **result.get("text", {}),
            "tools_valid": result.get("tools", {}).get("valid_arguments"),
            "tools_valid_reference": result.get("tools_reference", {}).get("valid_arguments"),
        }
    print(f"{'':<10}{'B/token':>10}{'exp. bytes':>12}{'KL mean':>10}{'KL p99':>9}{'top-1':>8}{'ppl':>8}{'tools':>8}  bits")
    for name, r in rows.items():
        tv = "-" if r["tools_valid"] is None else f"{r['tools_valid']:.0%}"
        print(f"{name:<10}{r['expected_bytes_per_token']:>10.0f}{r['expert_bytes']:>12}{r['kl_mean']:>10.4f}"
              f"{r['kl_p99']:>9.3f}{r['top1_agreement']:>8.3f}{r['ppl_bundle']:>8.2f}{tv:>8}  {r['bits_histogram']}")
    print(f"reference perplexity {rows['uniform']['ppl_reference']:.2f}; calibration {tokens} tokens "
          f"({a.calibration or 'shipped set'}); held-out text {a.text}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
