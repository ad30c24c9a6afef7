"""The cold prefills of several `moestream bench --json` reports, each file alone and pooled by prompt
length: TTFT over the floor (each distinct expert read once at the disk's rate), over the floor at the
ceiling windows just before the run, and over the same experts read alone just after it; the median,
the least, the most and how many runs were within 1.1x, per --compare entry.

The floor's rate is, with --at sustained (the default), the disk's sustained rate, random or in
sequence, as `moestream bench` takes its prefill ceiling today (a report from before holds the mean
of its trials at the runtime's thread count); with --at burst, the best single trial the report
holds at any thread count, random or in sequence, as the bench took it before.

    python bench/prefill_runs.py REPORT.json [REPORT.json ...] [--at sustained|burst]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moestream.runtime.measure.report import best_trial, prefill_summary, prefill_summary_lines, sustained_rate

RATES = {"sustained": sustained_rate, "burst": best_trial}


def cold_runs(report: dict, at: str = "sustained") -> dict[str, dict]:
    """The report's cold runs (those with a --compare entry's name), their TTFT over the floor
    taken again at the rate `at` names (RATES)."""
    rate = RATES[at](report, sequential=True)
    runs = {}
    for name, x in report.items():
        if isinstance(x, dict) and "variant" in x and "prefill_expert_bytes" in x:
            floor_s = x["prefill_expert_bytes"] / (rate * 1e9)
            runs[name] = {**x, "ttft_over_floor": x["ttft_s"] / floor_s}
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="moestream bench --json files")
    ap.add_argument("--at", choices=tuple(RATES), default="sustained", help="the disk's rate the floor is read at")
    args = ap.parse_args(argv)
    pooled: dict[int, dict] = {}
    what = {"sustained": "the sustained rate", "burst": "the best trial (any thread count)"}[args.at]
    print(f"cold runs, TTFT over: the floor at {what}, random or in sequence / at the windows just "
          "before the run / the same experts read alone just after (median, least-most, runs within 1.1x)")
    for path in args.reports:
        report = json.loads(path.read_text())
        runs = cold_runs(report, args.at)
        if not runs:
            raise SystemExit(f"{path}: no cold run names its --compare entry (a report older than the repeat summary)")
        tokens = report["args"]["prompt_tokens"]
        print(f"{path.name} ({tokens} tokens, floor at {RATES[args.at](report, sequential=True):.2f} GB/s):")
        print("\n".join(prefill_summary_lines(prefill_summary(runs))))
        pooled.setdefault(tokens, {}).update({f"{path.name}:{name}": x for name, x in runs.items()})
    print("pooled by prompt length:")
    for tokens, runs in sorted(pooled.items()):
        reports = len({name.split(":")[0] for name in runs})
        print("\n".join(prefill_summary_lines(prefill_summary(runs), f"{tokens} tokens, {reports} reports: ")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
