"""Mixed precision vs uniform bits at equal expert bytes read per token.

Measures each expert's output error at 2/3/4/8 bits on routed calibration inputs (stages/bits.py),
then, for a uniform width U, finds the plan whose expected bytes read per token (expert sizes weighted
by how often the calibration routes to each expert) matches uniform-U's, prepares both bundles and
scores them against the source (KL, top-1, perplexity on held-out text; tool-call validity).

    python bench/plan_vs_uniform.py fixtures/qwen3-moe-tiny-tools --uniform 3 --text fixtures/train/heldout_text.txt \
        --tools bench/results/fixture_tools32.jsonl --workdir /tmp/plan
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def expected_bytes_per_token(sizes: dict, bits: dict, counts: dict, tokens: int) -> float:
    return sum(counts.get(key, 0) * sizes[key][b] for key, b in bits.items()) / max(tokens, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--uniform", type=int, default=3)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tools", default=None)
    ap.add_argument("--calibration", default=None, help="default: the shipped calibration set")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--workdir", default="/tmp/moestream-plan")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from moestream.common.files import write_json_atomic
    from moestream.stages.bits import allocate, calibration_token_ids, collect_routed_inputs, expert_errors
    from moestream.stages.eval import evaluate, load_tool_examples

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
    plan_file = work / "bits_plan.json"
    write_json_atomic(plan_file, best.to_json())
    for name, plan in (("uniform", None), ("plan", best.bits)):
        options = {"bits_plan": plan_file} if plan else {}
        out = common.prepare_bundle(src, work / name, expert_bits=a.uniform, **options)[0]
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
    print(common.table([{"run": name, **r} for name, r in rows.items()], [
        ("", "run", ""), ("B/token", "expected_bytes_per_token", ".0f"), ("exp. bytes", "expert_bytes", "d"),
        ("KL mean", "kl_mean", ".4f"), ("KL p99", "kl_p99", ".3f"), ("top-1", "top1_agreement", ".3f"),
        ("ppl", "ppl_bundle", ".2f"), ("tools", "tools_valid", ".0%"), ("bits", "bits_histogram", "")]))
    print(f"reference perplexity {rows['uniform']['ppl_reference']:.2f}; calibration {tokens} tokens "
          f"({a.calibration or 'shipped set'}); held-out text {a.text}")
    common.write_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
