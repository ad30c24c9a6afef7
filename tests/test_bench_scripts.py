"""The bench/ scripts stay runnable: each imports (by file path, as `python bench/NAME.py` runs it)
without side effects and parses its command line; the shared helpers work; two scripts run end to
end at their smallest settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "qwen3-moe-tiny-tools"


@pytest.fixture
def bench_path(monkeypatch):
    """bench/ first on sys.path, as when a script runs; its modules forgotten afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "common" or name.startswith("bench_") or (BENCH / f"{name}.py").is_file():
            del sys.modules[name]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_imports_without_side_effects_and_parses(path, bench_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = load_script(path)
    assert capsys.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []  # importing wrote nothing
    assert callable(module.main)
    assert module.__doc__ and "python bench/" in module.__doc__  # says how it is run
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_common_table_and_offsets(bench_path):
    import common

    text = common.table([{"name": "a", "x": 1.5, "y": None}, {"name": "longer", "x": 22.25, "y": 3}],
                        [("name", "name", ""), ("x", "x", ".2f"), ("y", lambda r: r["y"], "d")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "x", "y"] and set(lines[1]) == {"-"}
    assert lines[2].split() == ["a", "1.50", "-"] and lines[3].split() == ["longer", "22.25", "3"]
    assert common.extent_offsets(100 << 20, 7_000_000) == list(range(0, (100 << 20) - 7_000_000 + 1, 7_012_352))


def test_reader_bench_runs(bench_path, tmp_path, capsys):
    module = load_script(BENCH / "reader_bench.py")
    out = tmp_path / "reader.json"
    assert module.main(["--path", str(tmp_path / "extents.bin"), "--size-gib", "0.02", "--extent-mb", "1",
                        "--threads", "1,2", "--ceiling-seconds", "0.2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["ceiling", "direct", "buffered-cold", "buffered-warm"]
    assert all(r[t]["gb_per_s"] > 0 for r in rows for t in ("1", "2"))
    assert not (tmp_path / "extents.bin").exists()  # removed unless --keep


def test_lookahead_runs_on_the_fixture(bench_path, tmp_path, capsys):
    module = load_script(BENCH / "lookahead.py")
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 8)
    out = tmp_path / "lookahead.json"
    assert module.main([str(FIXTURE), str(text), "--tokens", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 64 and 0 <= result["recall"] <= 1 and result["routed"] > 0


def test_checksum_speed_runs(bench_path, capsys):
    import importlib

    module = importlib.import_module("checksum_speed")
    assert module.main(["--size", "64KB", "--threads", "1,2", "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "xxh3_64" in out and "2 threads GB/s" in out


def test_every_result_file_is_indexed_and_every_cited_one_exists():
    """bench/results keeps what the README cites, each file listed in its index with the command
    that made it; a citation of a removed file is caught here, not by a reader."""
    import re

    root = Path(__file__).resolve().parents[1]
    results = root / "bench" / "results"
    index = (results / "README.md").read_text()
    files = [p.name for p in results.iterdir() if p.name != "README.md"]
    unindexed = [f for f in files if f not in index and f"`{f.rsplit('.', 1)[0]}." not in index]
    assert unindexed == [], f"bench/results files missing from bench/results/README.md: {unindexed}"
    cited = set(re.findall(r"bench/results/([\w.\-]+\.\w+)", (root / "README.md").read_text()))
    cited |= {m for m in re.findall(r"`(h200_[\w.\-]+\.(?:txt|json)|cpu_[\w.\-]+\.(?:txt|json))`",
                                     (root / "README.md").read_text())}
    missing = sorted(c for c in cited if not (results / c).exists())
    assert missing == [], f"README.md cites result files that do not exist: {missing}"


def test_reads_under_compute_runs_on_the_fixture(bench_path, tmp_path, capsys):
    module = load_script(BENCH / "reads_under_compute.py")
    out = tmp_path / "reads.json"
    assert module.main([str(FIXTURE), "--tokens", "32", "--group-mb", "1", "--calls", "1", "--repeats", "1",
                        "--switch", "0.005,0.001", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["switch_s"] for r in rows] == [0.005, 0.001]
    assert all(r["alone_gb_per_s"] > 0 and r["together_gb_per_s"] > 0 and r["attention_ms"] > 0 for r in rows)
    assert sys.getswitchinterval() == 0.005  # put back
    assert "layers.0.self_attn over 32 tokens" in capsys.readouterr().out


def cell(windows: list[float], sequential: bool = False) -> dict:
    """A ceiling cell as `moestream bench` reports it (read_ceiling_rounds)."""
    return {"threads": 8, "chunk_bytes": 1 << 20, "sequential": sequential, "windows": windows,
            "gb_per_s": sum(windows) / len(windows), "best_window_gb_per_s": max(windows)}


def test_prefill_runs_holds_every_report_to_the_sustained_rate_or_the_best_trial_it_holds(bench_path, tmp_path, capsys):
    """Each report's cold runs' TTFT is taken again over the floor at the disk's sustained rate (a
    report from before the ceiling cells: the mean of its trials at the runtime's threads), or with
    --at burst at the best single trial it holds (at any thread count; in a newer report reads in
    sequence count too); repeats of one entry, and reports of one prompt length, are pooled."""
    module = load_script(BENCH / "prefill_runs.py")

    def cold(variant, ttft):
        return {"variant": variant, "ttft_s": ttft, "prefill_expert_bytes": 2e9, "ttft_over_floor": 0.0,
                "ttft_over_read_alone": 1.0}

    old = {"args": {"prompt_tokens": 2048}, "ceiling": {"gb_per_s": 1.2}, "ceiling_by_threads": {"4": 2.0, "16": 0.5},
           "ceiling_trials": [{"gb_per_s": g} for g in (0.8, 1.2, 1.0, 1.0)],
           "cold": cold("default", 1.1), "warm": {"ttft_s": 0.5, "prefill_expert_bytes": 2e9},
           "default_cold": cold("default", 1.3), "noreadfirst_cold": cold("noreadfirst", 1.5)}
    new = {"args": {"prompt_tokens": 2048}, "ceiling_cells": [cell([1.8, 1.5, 1.2, 1.5]), cell([4.0, 2.0, 1.0, 2.0], True)],
           "ceiling": {"gb_per_s": 1.5},
           "prefill_ceiling": {"gb_per_s": 2.0}, "ceiling_burst_gb_per_s": 1.8, "prefill_ceiling_burst_gb_per_s": 4.0,
           "cold": {**cold("default", 1.0), "first_token_known_s": 0.9}}
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for path, report in zip(paths, (old, new), strict=True):
        path.write_text(json.dumps(report))
    runs = module.cold_runs(old)
    assert set(runs) == {"cold", "default_cold", "noreadfirst_cold"}, "warm runs are not cold prefills"
    assert runs["cold"]["ttft_over_floor"] == pytest.approx(0.55), "the floor at the trials' mean, 1.0 GB/s, is 2 s"
    assert module.cold_runs(old, "burst")["cold"]["ttft_over_floor"] == pytest.approx(1.1), "at 2.0 GB/s (4 threads): 1 s"
    assert module.cold_runs(new)["cold"]["ttft_over_floor"] == pytest.approx(1.0), "the prefill ceiling, sustained"
    assert module.cold_runs(new, "burst")["cold"]["ttft_over_floor"] == pytest.approx(2.0), "its best window"
    assert module.cold_runs(new, "burst")["cold"]["first_token_known_over_floor"] == pytest.approx(1.8), "the same floor"
    assert "first_token_known_over_floor" not in module.cold_runs(old)["cold"], "a report without the clock"
    assert module.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "2048 tokens, 2 reports: default         3 runs  0.65 (0.55-1.00, 3 in)" in out
    assert "noreadfirst     1 runs  0.75" in out
    cells_part = out.split("only the reports with ceiling cells:")[1]
    assert "2048 tokens, 1 reports: default         1 runs  1.00 (1.00-1.00, 1 in)" in cells_part
    assert module.main([str(p) for p in paths] + ["--at", "burst"]) == 0
    assert "2048 tokens, 2 reports: default         3 runs  1.30 (1.10-2.00, 1 in)" in capsys.readouterr().out


def test_prefill_runs_gives_the_rate_each_reader_read_the_prefills_bytes_at_against_the_best_cell(bench_path, tmp_path, capsys):
    """The prefill's own read rate (its bytes over the disk's busy time) and each bare reader's (the
    experts' bytes over its seconds), per report, and pooled as shares of each report's best cell
    over all its windows; reports without the bare readers' times are left out."""
    module = load_script(BENCH / "prefill_runs.py")
    run = {"variant": "default", "ttft_s": 2.0, "prefill_expert_bytes": 2e9, "prefill_read_bytes": 2e9,
           "prefill_read_s": 1.0, "prefill_read_alone_by_pattern": {"pieces@8": 2.0, "shuffled@4": 1.0}}
    report = {"args": {"prompt_tokens": 512}, "ceiling_cells": [cell([1.0, 1.0]), cell([4.0, 4.0], True)],
              "cold": run, "default_cold": {**run, "prefill_read_s": 4.0}, "warm": {**run, "variant": None}}
    del report["warm"]["variant"]
    assert module.read_rates(report) == {"prefill": [2.0, 0.5], "pieces@8": [1.0, 1.0], "shuffled@4": [2.0, 2.0]}
    module.print_read_rates({"r.json": report, "older.json": {"cold": {"variant": "default"}}})
    out = capsys.readouterr().out
    assert "r.json: prefill 1.25 (0.50-2.00), pieces@8 1.00 (1.00-1.00), shuffled@4 2.00 (2.00-2.00); best cell 4.00 (8 threads, 1.05 MB, in sequence)" in out
    assert "older.json" not in out
    assert "prefill 0.31 (0.12-0.50) (2 runs), pieces@8 0.25 (0.25-0.25) (2 runs), shuffled@4 0.50 (0.50-0.50) (2 runs)" in out


def test_roofline_shares_are_taken_again_at_the_sustained_rate_and_the_best_random_trial(bench_path, tmp_path, capsys):
    """Each decode run's share of its roofline, and each streams run's of its batch roofline,
    scaled by used / sustained and used / best trial; reads in sequence (a prefill's) do not count
    for a decode; a file that is no bench report is left out."""
    module = load_script(BENCH / "roofline_shares.py")
    report = {"ceiling": {"gb_per_s": 1.5}, "ceiling_by_threads": {"4": 2.0, "16": 1.0},
              "ceiling_trials": [{"gb_per_s": g} for g in (1.5, 1.0, 1.25, 1.25)],
              "ceiling_sequential_by_threads": {"8": 3.0},
              "cold": {"share_of_roofline": 0.9}, "warm": {"share_of_roofline": 0.8},
              "streams_cold": {"share_of_batch_roofline": 0.96}}
    rows = {r["run"]: r for r in module.shares(report)}
    assert rows["cold"]["at_burst"] == pytest.approx(0.675) and rows["warm"]["reported"] == 0.8
    assert rows["cold"]["at_sustained"] == pytest.approx(1.08), "the mean trial is 1.25 GB/s"
    assert rows["streams_cold"]["at_burst"] == pytest.approx(0.72)
    new = {"ceiling_cells": [cell([2.0, 1.5, 1.0, 1.5])], "ceiling": {"gb_per_s": 1.5}, "ceiling_burst_gb_per_s": 2.0,
           "prefill_ceiling": {"gb_per_s": 3.0}, "prefill_ceiling_burst_gb_per_s": 4.0, "cold": {"share_of_roofline": 0.9}}
    assert module.shares(new)[0] == {"run": "cold", "reported": 0.9, "at_sustained": 0.9, "at_burst": pytest.approx(0.675)}
    good, other = tmp_path / "r.json", tmp_path / "serve.json"
    good.write_text(json.dumps(report))
    other.write_text(json.dumps({"rows": []}))
    assert module.main([str(good), str(other)]) == 0
    out = capsys.readouterr().out
    assert "ceiling used 1.50 GB/s, sustained 1.25, best trial 2.00" in out and "cold 0.90 / 1.08 / 0.68" in out
    assert "serve.json: not a moestream bench report" in out
    assert "reports with ceiling cells" not in out, "a report from before the cells is not pooled"
    # the streams runs of reports with cells, pooled by --compare entry at the sustained rate (1.5 GB/s
    # here, as used: their shares as reported), two reports of the same runs
    new.update({"streams_cold": {"share_of_batch_roofline": 0.9, "variant": "default"},
                "default_streams_warm": {"share_of_batch_roofline": 0.6, "variant": "default"},
                "threads_4_streams_cold": {"share_of_batch_roofline": 0.8, "variant": "threads:4"}})
    again = tmp_path / "again.json"
    good.write_text(json.dumps(new))
    again.write_text(json.dumps(new))
    assert module.main([str(good), str(again)]) == 0
    out = capsys.readouterr().out
    assert "streams runs of the 2 reports with ceiling cells" in out
    assert "  default       2 runs 0.90 (0.90-0.90, 2 reached)  /  2 runs 0.60 (0.60-0.60, 0 reached)" in out
    assert "  threads:4     2 runs 0.80 (0.80-0.80, 0 reached)  /  -" in out
