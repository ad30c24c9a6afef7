"""The cold prefills of several `moestream bench --json` reports, each file alone and pooled by prompt
length: TTFT over the floor (each distinct expert read once at the disk's rate), over the floor at the
ceiling windows just before the run, and over the same experts read alone just after it; and the
time the first token was known (before mlx-lm's loop ran the next token's step) over the floor, in
reports that hold it; the median, the least, the most and how many runs were within 1.1x, per
--compare entry; pooled again over only the reports that read the ceiling cells.

The floor's rate is, with --at sustained (the default), the disk's sustained rate, random or in
sequence, as `moestream bench` takes its prefill ceiling today (a report from before holds the mean
of its trials at the runtime's thread count); with --at burst, the best single trial the report
holds at any thread count, random or in sequence, as the bench took it before.

Then the rates at which the cold prefills' bytes were read: by the prefill itself, and by each bare
reader that read the same experts alone just after it (READ_PATTERNS at a thread count, e.g.
"shuffled@4"), against the report's best ceiling cell over all its windows: whether any reader of
these very bytes reaches the rate of the disk's best setting.

    python bench/prefill_runs.py REPORT.json [REPORT.json ...] [--at sustained|burst]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moestream.runtime.measure.report import best_trial, prefill_summary, prefill_summary_lines, spread, sustained_rate

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
            if "first_token_known_s" in x:
                runs[name]["first_token_known_over_floor"] = x["first_token_known_s"] / floor_s
    return runs


def read_rates(report: dict) -> dict[str, list[float]]:
    """GB/s at which each cold prefill's experts were read: "prefill" by the run itself (its bytes over
    the time the disk was busy with them), and by each bare reader that read them alone after it."""
    rates: dict[str, list[float]] = {}
    for x in report.values():
        if not (isinstance(x, dict) and "variant" in x and "prefill_read_alone_by_pattern" in x):
            continue
        if x.get("prefill_read_s"):
            rates.setdefault("prefill", []).append(x["prefill_read_bytes"] / x["prefill_read_s"] / 1e9)
        for pattern, seconds in x["prefill_read_alone_by_pattern"].items():
            rates.setdefault(pattern, []).append(x["prefill_expert_bytes"] / seconds / 1e9)
    return rates


def _spread_text(values: list[float]) -> str:
    s = spread(values)
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def print_read_rates(reports: dict[str, dict]) -> None:
    """read_rates per report (file name -> report), and pooled as shares of each report's best cell
    over all its windows."""
    print("read rates of the cold prefills' bytes, GB/s (median, least-most over the cold runs): by the prefill, "
          "and by a bare reader of the same experts just after it (pattern@threads); the best ceiling cell over all its windows")
    shares: dict[str, list[float]] = {}
    for name, report in reports.items():
        rates = read_rates(report)
        if not rates:
            continue
        line = f"{name}: " + ", ".join(f"{k} {_spread_text(v)}" for k, v in rates.items())
        if "ceiling_cells" in report:
            cell = max(report["ceiling_cells"], key=lambda c: c["gb_per_s"])
            kind = "in sequence" if cell["sequential"] else "random"
            line += f"; best cell {cell['gb_per_s']:.2f} ({cell['threads']} threads, {cell['chunk_bytes'] / 1e6:.2f} MB, {kind})"
            for k, v in rates.items():
                shares.setdefault(k, []).extend(r / cell["gb_per_s"] for r in v)
        print(line)
    if shares:
        print("pooled over the reports with cells, each rate over its report's best cell: "
              + ", ".join(f"{k} {_spread_text(v)} ({len(v)} runs)" for k, v in shares.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="moestream bench --json files")
    ap.add_argument("--at", choices=tuple(RATES), default="sustained", help="the disk's rate the floor is read at")
    args = ap.parse_args(argv)
    pooled: dict[int, dict] = {}
    with_cells: dict[int, dict] = {}  # the reports that read the ceiling cells: the disk's best setting
    what = {"sustained": "the sustained rate", "burst": "the best trial (any thread count)"}[args.at]
    print(f"cold runs, TTFT over: the floor at {what}, random or in sequence / at the windows just "
          "before the run / the same experts read alone just after; the first token known over the floor, where the "
          "report has it (median, least-most, runs within 1.1x)")
    loaded = {path.name: json.loads(path.read_text()) for path in args.reports}
    for path in args.reports:
        report = loaded[path.name]
        runs = cold_runs(report, args.at)
        if not runs:
            raise SystemExit(f"{path}: no cold run names its --compare entry (a report older than the repeat summary)")
        tokens = report["args"]["prompt_tokens"]
        print(f"{path.name} ({tokens} tokens, floor at {RATES[args.at](report, sequential=True):.2f} GB/s):")
        print("\n".join(prefill_summary_lines(prefill_summary(runs))))
        named = {f"{path.name}:{name}": x for name, x in runs.items()}
        pooled.setdefault(tokens, {}).update(named)
        if "ceiling_cells" in report:
            with_cells.setdefault(tokens, {}).update(named)
    for title, groups in (("pooled by prompt length:", pooled),
                          ("pooled by prompt length, only the reports with ceiling cells:", with_cells)):
        if groups:
            print(title)
        for tokens, runs in sorted(groups.items()):
            reports = len({name.split(":")[0] for name in runs})
            print("\n".join(prefill_summary_lines(prefill_summary(runs), f"{tokens} tokens, {reports} reports: ")))
    print_read_rates(loaded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
