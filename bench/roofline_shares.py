"""Decode runs of `moestream bench --json` reports held to the best random-read trial each report
holds: every run's share of its roofline (ceiling / bytes missed per token) and every streams run's
share of its batch roofline, as reported and against that trial.

A report made before the bench took the best trial at any thread count as its ceiling used the best
at the runtime's 8 threads; its trials at 4 and 16 threads are in its JSON (`ceiling_by_threads`), and
where one of them read faster, the shares it printed were flattered by that much.

    python bench/roofline_shares.py REPORT.json [REPORT.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moestream.runtime.measure.bench import best_trial, table_runs


def shares(report: dict) -> list[dict]:
    """Per decode run and streams run: the share reported and the share against the best trial."""
    used, best = report["ceiling"]["gb_per_s"], best_trial(report)
    rows = [{"run": name, "reported": report[name]["share_of_roofline"],
             "against_best": report[name]["share_of_roofline"] * used / best} for name in table_runs(report)]
    rows += [{"run": name, "reported": report[name]["share_of_batch_roofline"],
              "against_best": report[name]["share_of_batch_roofline"] * used / best}
             for name in ("streams_cold", "streams_warm") if name in report]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="moestream bench --json files")
    args = ap.parse_args(argv)
    for path in args.reports:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or "ceiling" not in report or "cold" not in report:
            print(f"{path.name}: not a moestream bench report (no ceiling or cold run), left out")
            continue
        used, best = report["ceiling"]["gb_per_s"], best_trial(report)
        rows = shares(report)
        print(f"{path.name}: ceiling used {used:.2f} GB/s, best trial {best:.2f} GB/s; share of roofline, "
              "reported -> against the best: "
              + ", ".join(f"{r['run']} {r['reported']:.2f} -> {r['against_best']:.2f}" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
