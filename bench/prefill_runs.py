"""The cold prefills of several `moestream bench --json` reports, each file alone and pooled by prompt
length: TTFT over the floor (each distinct expert read once at the ceiling), over the floor at the
ceiling trials just before the run, and over the same experts read alone just after it; the median,
the least, the most and how many runs were within 1.1x, per --compare entry.

The floor's ceiling is the best trial at any thread count, random or in sequence, as `moestream
bench` takes it today (`prefill_ceiling`); a report made when the ceiling was the best random trial
at the runtime's thread count is read against every trial it holds, so that reports of any age are
held to the strictest floor they measured.

    python bench/prefill_runs.py REPORT.json [REPORT.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moestream.runtime.measure.bench import best_trial, prefill_summary, prefill_summary_lines


def cold_runs(report: dict) -> dict[str, dict]:
    """The report's cold runs (those with a --compare entry's name), their TTFT over the floor
    taken again at the best ceiling trial it holds."""
    best = best_trial(report, sequential=True)
    runs = {}
    for name, x in report.items():
        if isinstance(x, dict) and "variant" in x and "prefill_expert_bytes" in x:
            floor_s = x["prefill_expert_bytes"] / (best * 1e9)
            runs[name] = {**x, "ttft_over_floor": x["ttft_s"] / floor_s}
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="moestream bench --json files")
    args = ap.parse_args(argv)
    pooled: dict[int, dict] = {}
    print("cold runs, TTFT over: the floor at the best ceiling trial (any thread count, random or in sequence) / at the trials just "
          "before the run / the same experts read alone just after (median, least-most, runs within 1.1x)")
    for path in args.reports:
        report = json.loads(path.read_text())
        runs = cold_runs(report)
        if not runs:
            raise SystemExit(f"{path}: no cold run names its --compare entry (a report older than the repeat summary)")
        tokens = report["args"]["prompt_tokens"]
        best = best_trial(report, sequential=True)
        print(f"{path.name} ({tokens} tokens, ceiling {best:.2f} GB/s):")
        print("\n".join(prefill_summary_lines(prefill_summary(runs))))
        pooled.setdefault(tokens, {}).update({f"{path.name}:{name}": x for name, x in runs.items()})
    print("pooled by prompt length:")
    for tokens, runs in sorted(pooled.items()):
        reports = len({name.split(":")[0] for name in runs})
        print("\n".join(prefill_summary_lines(prefill_summary(runs), f"{tokens} tokens, {reports} reports: ")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
