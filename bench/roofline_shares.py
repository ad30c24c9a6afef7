"""Decode runs of `moestream bench --json` reports held to two readings of the disk's random-read rate
each report holds: its sustained rate (the best cell's bytes over its seconds, as `moestream bench`
takes its ceiling today; in a report from before, the mean of its trials at the runtime's thread
count) and its best single trial, a burst (the bench's ceiling in the reports before). Every run's
share of its roofline (ceiling / bytes missed per token) and every streams run's share of its batch
roofline, as reported and at both. Then the streams runs of the reports that read the disk's
ceiling cells (its best setting, as the bench takes it today), pooled by --compare entry: their
share of the batch roofline at the sustained rate, and how many reached the target.

    python bench/roofline_shares.py REPORT.json [REPORT.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moestream.runtime.measure.report import (
    STREAMS_TARGET,
    best_trial,
    streams_runs,
    streams_summary,
    streams_summary_lines,
    sustained_rate,
    table_runs,
)


def shares(report: dict) -> list[dict]:
    """Per decode run and streams run: the share reported, at the sustained rate and at the burst."""
    used, sustained, burst = report["ceiling"]["gb_per_s"], sustained_rate(report), best_trial(report)
    runs = [(name, "share_of_roofline") for name in table_runs(report)]
    runs += [(name, "share_of_batch_roofline") for name in streams_runs(report)]
    return [{"run": name, "reported": report[name][key], "at_sustained": report[name][key] * used / sustained,
             "at_burst": report[name][key] * used / burst} for name, key in runs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="moestream bench --json files")
    args = ap.parse_args(argv)
    pooled: dict[str, dict] = {}  # the streams runs of the reports with cells, at the sustained rate
    for path in args.reports:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or "ceiling" not in report or "cold" not in report:
            print(f"{path.name}: not a moestream bench report (no ceiling or cold run), left out")
            continue
        rows = shares(report)
        print(f"{path.name}: ceiling used {report['ceiling']['gb_per_s']:.2f} GB/s, sustained "
              f"{sustained_rate(report):.2f}, best trial {best_trial(report):.2f}; share of roofline, "
              "reported / at the sustained rate / at the best trial: "
              + ", ".join(f"{r['run']} {r['reported']:.2f} / {r['at_sustained']:.2f} / {r['at_burst']:.2f}" for r in rows))
        if "ceiling_cells" in report:
            streams = set(streams_runs(report))
            pooled.update({f"{path.name}:{r['run']}": {**report[r["run"]], "share_of_batch_roofline": r["at_sustained"]}
                           for r in rows if r["run"] in streams})
    if pooled:
        reports = len({name.split(":")[0] for name in pooled})
        print(f"streams runs of the {reports} reports with ceiling cells, by --compare entry: share of the batch roofline "
              f"at the sustained rate, cold / warm (median, least-most, runs reaching {STREAMS_TARGET}; machines differ from "
              "report to report: compare settings within one report)")
        print("\n".join(streams_summary_lines(streams_summary(pooled))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
