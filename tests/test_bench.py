"""`moestream bench` runs end to end on a tiny bundle and reports every figure it promises
(the figures themselves are not asserted: this machine is shared and noisy)."""

from __future__ import annotations

import json

import pytest

from moestream.cli import main


def test_bench_cli_reports_ceiling_roofline_and_comparisons(tmp_path, bundle_dir, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", str(bundle_dir("qwen3_moe")), "--gen-tokens", "4", "--prompt-tokens", "8",
                 "--compare", "naive,buffered,host,policy:lfu", "--page-cache", "all", "--ceiling-seconds", "0.3",
                 "--json", str(out),
                 "--plot", str(plot)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["ceiling"]["gb_per_s"] > 0 and r["ceiling"]["direct"]
    for run in ("cold", "warm", "buffered_cold", "host_warm", "policy_lfu_warm"):
        for key in ("ttft_s", "tokens_per_s", "p50_token_ms", "p99_token_ms", "bytes_read_per_token", "hit_rate",
                    "read_gb_per_s_during_io", "io_efficiency", "roofline_tokens_per_s", "share_of_roofline",
                    "prefill_read_floor_s", "ttft_over_floor", "prefill_hit_rate", "prefill_expert_bytes"):
            assert key in r[run], (run, key)
        assert r[run]["prefill_distinct_experts"] > 0 and r[run]["prefill_read_floor_s"] > 0, run
    assert r["cold"]["bytes_read"] > 0, "a 25% budget must read experts while decoding"
    assert r["naive"]["reads"] > r["cold"]["reads"], "the naive loader reads tensor by tensor"
    assert r["budget"]["expert_cache_bytes"] < r["budget"]["expert_bytes_in_memory"]
    assert r["settings"]["read_into"] == "arrays" and r["host_settings"]["read_into"] == "host"
    # the ceiling is the best sustained rate of any random-read cell: the runtime's thread count, half
    # and twice it, each at the extent size and the size the runtime read, three windows each
    threads = r["settings"]["io_threads"]
    cells = r["ceiling_cells"]
    random_cells = [c for c in cells if not c["sequential"]]
    assert {c["threads"] for c in random_cells} == {max(1, threads // 2), threads, threads * 2}
    assert all(len(c["windows"]) == 4 and c["seconds"] > 0 for c in cells)
    assert len({(c["threads"], c["chunk_bytes"], c["sequential"]) for c in cells}) == len(cells), "no setting read twice"
    for c in cells:  # sustained: all its bytes over all its seconds, between its worst and best window
        assert c["gb_per_s"] == pytest.approx(c["bytes"] / c["seconds"] / 1e9)
        assert min(c["windows"]) * 0.999 <= c["gb_per_s"] <= max(c["windows"]) * 1.001
    c = r["ceiling"]  # one of the random cells (ceilings: chosen on half its windows, measured on the rest)
    assert not c["sequential"] and any(c["windows"] == x["windows"] for x in random_cells)
    assert r["ceiling_burst_gb_per_s"] == max(w for c in random_cells for w in c["windows"])
    # a prefill's floor also counts reads in sequence, at the runtime's count and half it
    assert {c["threads"] for c in cells if c["sequential"]} == {max(1, threads // 2), threads}
    assert any(r["prefill_ceiling"]["windows"] == x["windows"] for x in cells)
    cold = r["cold"]
    # reads kept in flight: the time inside the reads over the time waited, at most the threads
    assert 0 < cold["reads_in_flight"] <= threads and cold["reads_in_flight"] == cold["pread_s"] / cold["io_wait_s"]
    assert cold["prefill_pread_s"] > 0 and "prefill_reads_in_flight" in cold
    # the first token is known before mlx-lm's loop hands it out, after the next token's step
    assert 0 < cold["first_token_known_s"] < cold["ttft_s"]
    assert cold["first_token_known_over_floor"] == pytest.approx(cold["first_token_known_s"] / cold["prefill_read_floor_s"])
    assert cold["prefill_read_floor_s"] == pytest.approx(cold["prefill_expert_bytes"] / (r["prefill_ceiling"]["gb_per_s"] * 1e9))
    assert cold["roofline_tokens_per_s"] == pytest.approx(r["ceiling"]["gb_per_s"] * 1e9 / cold["bytes_read_per_token"])
    assert r["host_warm"]["bytes_read"] == r["warm"]["bytes_read"], "same reads, only where they land differs"
    phases = r["phases"]["per_layer_ms"]
    assert {"attention (all before the MoE input)", "routing (router, top-k, host sync)", "expert compute"} <= set(phases)
    assert all(v > 0 for v in phases.values()) and "route_sync (attention + router, host sync)" in r["warm"]["per_layer_ms"]
    assert plot.stat().st_size > 0
    text = capsys.readouterr().out
    assert "roof" in text and "ceiling" in text and "TTFT/floor" in text and "sustained" in text
    assert "SCALED" not in text, "scaling to the layers it has is no figure"
    assert "{'" not in text, "no raw dicts in the report"
    from moestream.runtime.measure.report import table_runs

    assert {"cold", "warm", "phases", "buffered_cold", "host_warm", "policy_lfu_warm"} <= set(table_runs(r))


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_bench_io_only_replays_a_trace(tmp_path, synth_dir, bundle_dir, capsys):
    prof = tmp_path / "prof"
    assert main(["profile", str(synth_dir("qwen3_moe")), "--out", str(prof), "--max-tokens", "256"]) == 0
    out = tmp_path / "io.json"
    assert main(["bench", str(bundle_dir("qwen3_moe")), "--io-only", "--trace", str(prof / "trace.parquet"),
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ceiling"]["gb_per_s"] > 0 and r["rows"][0]["bytes_read"] > 0


def test_page_cache_residency_and_eviction(tmp_path):
    from moestream.runtime.io.pagecache import evict_page_cache, page_cache_bytes

    f = tmp_path / "cached.bin"
    f.write_bytes(b"x" * (1 << 20))
    f.read_bytes()
    before = page_cache_bytes([f])
    if before is None:
        pytest.skip("mincore is not available here")
    assert before == 1 << 20, "a file just written and read is resident"
    evict_page_cache([f])
    after = page_cache_bytes([f])
    if after == before:
        pytest.skip(f"{tmp_path} cannot drop cached pages (tmpfs?)")
    assert after < before


@pytest.mark.parametrize("bits,group_size", [(8, 32), (3, 64)])
def test_reference_is_quantized_like_the_bundle(synth_dir, bundle_dir, bits, group_size):
    """bench --reference: mlx-lm in memory with the bundle's own bits and group size gives the
    bundle's logits (a reference at other bits would measure a different model)."""
    import mlx.core as mx

    import moestream
    from moestream.manifests.open import open_bundle
    from moestream.runtime.measure.bench import expert_quantization, reference_model

    bundle = bundle_dir("qwen3_moe", bits, group_size)
    quant = expert_quantization(open_bundle(bundle))
    assert quant == {"bits": bits, "group_size": group_size, "mode": "affine"}
    ref = reference_model(synth_dir("qwen3_moe"), quant)
    tokens = mx.array([[1, 5, 9, 2, 7]])
    with moestream.load(bundle) as (model, _):
        ours = model(tokens)
    want = ref(tokens)
    assert mx.abs(ours - want).max().item() <= 1e-5 * mx.abs(want).max().item()


def test_reference_refuses_a_bundle_of_mixed_bits(tmp_path, synth_dir):
    from conftest import build_bundle

    from moestream.common.errors import OptionsError
    from moestream.manifests.open import open_bundle
    from moestream.runtime.measure.bench import expert_quantization
    from moestream.stages.bits import BitPlan

    bundle = build_bundle(synth_dir("qwen3_moe"), tmp_path / "b16", bits=16)
    assert expert_quantization(open_bundle(bundle)) is None
    plan = {(layer, e): (2, 8)[(layer + e) % 2] for layer in range(3) for e in range(16)}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(BitPlan(plan, 0, 0.0).to_json()))
    mixed = build_bundle(synth_dir("qwen3_moe"), tmp_path / "mixed", bits=4, bits_plan=plan_file)
    with pytest.raises(OptionsError, match="quantized 2 ways"):
        expert_quantization(open_bundle(mixed))


def test_memory_holder_takes_what_it_is_asked_and_gives_it_back():
    from pathlib import Path

    from moestream.runtime.measure import memhold

    before = memhold.mem_available()
    if before is None:
        pytest.skip("no /proc/meminfo")
    target = before - memhold.SAFETY_BYTES - (256 << 20)  # hold 256 MB
    with memhold.leave_available(target) as held:
        assert held.bytes == before - target - memhold.SAFETY_BYTES and held.why_not is None
        status = dict(line.split(":", 1) for line in Path(f"/proc/{held.pid}/status").read_text().splitlines())
        resident = int(status["VmRSS"].split()[0]) * 1024
        assert resident >= held.bytes, "the held pages are really taken (populated)"
        assert not held.locked or int(status["VmLck"].split()[0]) * 1024 >= held.bytes
    assert not Path(f"/proc/{held.pid}").exists(), "and given back when the block ends"


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_buffered_comparison_races_the_page_cache_on_equal_memory(bundle_dir, monkeypatch):
    """The buffered run keeps only the expert cache's minimum and holds the rest of the machine's
    memory but what the budget gave the expert cache (a pretend machine with 300 MB more than
    that available, so the real hold stays small)."""
    from moestream.runtime.measure import bench, memhold

    targets = []
    real = memhold.leave_available

    def leave_available(target):
        targets.append(target)
        monkeypatch.setattr(memhold, "mem_available", lambda: target + memhold.SAFETY_BYTES + (64 << 20))
        return real(target)

    monkeypatch.setattr(bench, "leave_available", leave_available)
    r = bench.bench_bundle(bundle_dir("qwen3_moe"), prompt_tokens=8, gen_tokens=4, compare=("buffered", "buffered:cache"),
                          ceiling_seconds=0.3)
    pc = r["buffered_settings"]["page_cache"]
    # equal: the same total memory as the budget; cache: what the budget gave the expert cache
    assert targets == [r["budget"]["budget_bytes"] - moestream_minimum(bundle_dir("qwen3_moe")),
                       r["budget"]["expert_cache_bytes"]]
    assert targets[1] < targets[0]
    assert pc["memory"] == "equal" and pc["bytes"] == 64 << 20 and pc["target_bytes"] == targets[0]
    assert r["buffered_cache_settings"]["page_cache"]["memory"] == "cache"
    assert r["buffered_settings"]["io_mode"] == "buffered"
    assert r["buffered_warm"]["bytes_read"] >= r["warm"]["bytes_read"], "the expert cache holds one layer only"


def moestream_minimum(bundle) -> int:
    import moestream

    return moestream.plan_memory(bundle).minimum_bytes


def test_forget_makes_the_next_decode_as_cold_as_the_first(bundle_dir):
    """After forget() the same prompt reads every byte the first, cold decode read, where without
    it the cache would serve part of it (the bench's streams runs start cold this way)."""
    import moestream
    from moestream.runtime.measure import bench

    bundle = bundle_dir("qwen3_moe")
    with moestream.load(bundle, memory_budget=moestream.plan_memory(bundle).budget_bytes) as (model, _):
        rt = moestream.runtime_of(model)
        cold = bench.decode(model, [1, 2, 3, 4], 4)
        warm = bench.decode(model, [1, 2, 3, 4], 4)
        rt.streamer.forget()
        again = bench.decode(model, [1, 2, 3, 4], 4)
    assert warm["cache_hits"] > cold["cache_hits"], "the cache serves the same prompt again"
    assert (again["bytes_read"], again["cache_hits"]) == (cold["bytes_read"], cold["cache_hits"]) and cold["bytes_read"] > 0


def test_streams_decode_together_and_read_each_expert_once_per_layer_step(bundle_dir):
    """--streams: mlx-lm's BatchGenerator decodes the streams in one forward per step, so each MoE
    layer reads the union of the streams' missed experts once (a read never names an expert twice,
    and never more than streams x top-k), and the report says how much they shared; each --compare
    entry decodes the streams too, from cold again, and the shares are summed up by entry."""
    import moestream
    from moestream.runtime.measure import bench

    bundle = bundle_dir("qwen3_moe")
    reads = []
    real_load = bench.load

    def load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        store = moestream.runtime_of(loaded.model).store
        real_read = store.read

        def read(layer, experts):
            reads.append(list(experts))
            return real_read(layer, experts)

        store.read = read
        return loaded

    bench.load = load
    try:
        r = bench.bench_bundle(bundle, prompt_tokens=6, gen_tokens=5, streams=3, ceiling_seconds=0.3,
                               compare=("threads:2",))
    finally:
        bench.load = real_load
    k = moestream.inspect(bundle)["experts_per_token"]
    assert reads and all(len(set(e)) == len(e) for e in reads), "a read never names an expert twice"
    for run in ("streams_cold", "streams_warm"):
        x = r[run]
        assert x["streams"] == 3 and x["decode_tokens"] == 3 * 4 and x["decode_steps"] == 4
        assert 0 < x["sharing"] <= 1 and x["distinct_experts_per_layer_step"] <= 3 * k
        assert x["aggregate_tokens_per_s"] > 0 and x["batch_roofline_tokens_per_s"] > 0
        # a step's time split: the parts add up to it, the MoE layers' syncs and matmuls took some
        ms = x["step_ms"]
        assert sum(v for k, v in ms.items() if k != "step") == pytest.approx(ms["step"])
        assert ms["step"] == pytest.approx(x["decode_tokens"] / x["aggregate_tokens_per_s"] / x["decode_steps"] * 1e3)
        assert ms["route_sync"] > 0 and ms["expert_compute"] > 0 and min(ms.values()) >= 0, ms
    for prefix in ("", "threads_2_"):
        for run in ("cold", "warm"):
            x = r[f"{prefix}streams_{run}"]
            assert x["aggregate_over_one_stream"] == x["aggregate_tokens_per_s"] / r[prefix + run]["tokens_per_s"]
            assert x["batch_roofline_tokens_per_s"] == pytest.approx(r["ceiling"]["gb_per_s"] * 1e9 / x["bytes_read_per_step"] * 3)
    assert r["threads_2_streams_cold"]["bytes_read"] > 0, "an entry's streams start cold, not on the runs before"
    assert r["threads_2_streams_cold"]["cache_misses"] == r["streams_cold"]["cache_misses"], "same prompts, same cold cache"
    summary = r["streams_summary"]
    assert set(summary) == {"default", "threads:2"} and summary["threads:2"]["cold"]["runs"] == 1
    assert summary["default"]["warm"]["median"] == r["streams_warm"]["share_of_batch_roofline"]


@pytest.mark.slow
def test_a_long_prompts_prefill_is_reported_by_its_reads_waits_and_phases(bundle_dir):
    """A prompt long enough for the prefill pipeline: the bench says how long its reads kept the disk
    busy and how many bytes they read, how long the layers waited for them, and where the rest of
    the prefill went (the routing's sync, the matmuls); the plain path has no pipeline reads."""
    from moestream.runtime.measure import bench

    r = bench.bench_bundle(bundle_dir("qwen3_moe"), prompt_tokens=64, gen_tokens=2, compare=("plainprefill", "noreadfirst", "subread:4"),
                           ceiling_seconds=0.3)
    cold = r["cold"]
    assert cold["prefill_read_s"] > 0 and cold["prefill_read_bytes"] > 0 and cold["prefill_wait_s"] >= 0
    assert cold["prefill_route_sync_s"] > 0 and cold["prefill_expert_compute_s"] > 0 and cold["prefill_expert_fetch_s"] > 0
    assert cold["prefill_staging_allocations"] == 0, "no staging on the CPU"
    # the disk's idle time, split by where it falls, and its busy time make up the TTFT
    idle = sum(cold[f"prefill_idle_{k}_s"] for k in ("before", "within_layers", "between_layers", "after"))
    assert cold["prefill_idle_before_s"] > 0 and cold["prefill_idle_after_s"] > 0
    assert idle + cold["prefill_read_s"] == pytest.approx(cold["ttft_s"], rel=1e-3)
    assert cold["prefill_speculated"] > 0 and r["noreadfirst_cold"]["prefill_speculated"] == 0
    assert r["noreadfirst_settings"]["prefill_speculate"] is False
    # the same experts read again by themselves, just after each cold run
    assert cold["prefill_read_alone_s"] > 0 and "prefill_read_alone_s" not in r["warm"]
    assert cold["ttft_over_read_alone"] == pytest.approx(cold["ttft_s"] / cold["prefill_read_alone_s"])
    assert cold["prefill_read_alone_s"] == min(cold["prefill_read_alone_by_pattern"].values())  # the faster way
    n = r["settings"]["io_threads"]
    assert set(cold["prefill_read_alone_by_pattern"]) == {f"{p}@{t}" for p in ("pieces", "shares", "shuffled") for t in {n, max(1, n // 2)}}
    assert cold["prefill_read_alone_threads"] in {n, max(1, n // 2)}
    # and against a ceiling trial just before each cold run
    assert cold["ceiling_before_gb_per_s"] > 0 and "ceiling_before_gb_per_s" not in r["warm"]
    assert cold["ttft_over_floor_before"] == pytest.approx(
        cold["ttft_s"] * cold["ceiling_before_gb_per_s"] * 1e9 / cold["prefill_expert_bytes"])
    summary = r["prefill_summary"]
    assert set(summary) == {"default", "plainprefill", "noreadfirst", "subread:4"}
    assert summary["default"]["runs"] == 1 and summary["default"]["ttft_over_floor"]["median"] == cold["ttft_over_floor"]
    assert r["settings"]["checked_read_bytes"] == 1 << 20 and r["subread_4_settings"]["checked_read_bytes"] == 4 << 20
    plain = r["plainprefill_cold"]
    assert plain["prefill_read_s"] == plain["prefill_read_bytes"] == 0 and plain["prefill_expert_compute_s"] > 0


def test_the_disk_idle_time_of_a_prefill_is_split_by_where_it_falls():
    """Reads (layer, start, end), overlapping or not: the gaps before the first, between one layer's
    reads, between layers' and after the last, which with the reads' busy time make up the TTFT."""
    from moestream.runtime.measure.bench import prefill_disk_idle

    spans = [(3, 2.0, 4.0), (1, 0.5, 1.0), (1, 1.25, 1.5)]  # collected in any order
    idle = prefill_disk_idle(spans, start=0.0, first_token=5.0)
    assert idle == {"prefill_idle_before_s": 0.5, "prefill_idle_within_layers_s": 0.25,
                    "prefill_idle_between_layers_s": 0.5, "prefill_idle_after_s": 1.0}
    assert prefill_disk_idle([], 0.0, 2.0)["prefill_idle_before_s"] == 2.0
    overlapping = [(1, 0.5, 2.0), (1, 1.0, 1.5), (1, 1.75, 2.5), (2, 3.0, 3.5)]  # a short read inside a long one
    assert prefill_disk_idle(overlapping, 0.0, 4.0) == {
        "prefill_idle_before_s": 0.5, "prefill_idle_within_layers_s": 0.0,
        "prefill_idle_between_layers_s": 0.5, "prefill_idle_after_s": 0.5}


def test_cold_runs_are_summed_up_by_compare_entry_repeats_together():
    """Each --compare entry's cold runs, repeats of it together: their count, and for each ratio the
    median, the least, the most and how many were within the target; warm runs are left out."""
    from moestream.runtime.measure.report import prefill_summary

    def cold(variant, floor, alone):
        return {"variant": variant, "ttft_over_floor": floor, "ttft_over_read_alone": alone}

    report = {"cold": cold("default", 1.05, 0.9), "warm": {"ttft_over_floor": 0.5},
              "noreadfirst_cold": cold("noreadfirst", 1.3, 1.2), "default_cold": cold("default", 1.2, 1.0),
              "default2_cold": cold("default", 1.0, 1.15), "ceiling": {"gb_per_s": 2.0}}
    s = prefill_summary(report)
    assert set(s) == {"default", "noreadfirst"} and s["default"]["runs"] == 3 and s["noreadfirst"]["runs"] == 1
    assert s["default"]["ttft_over_floor"] == {"median": 1.05, "min": 1.0, "max": 1.2, "within_count": 2}
    assert s["default"]["ttft_over_read_alone"]["within_count"] == 2
    assert "ttft_over_floor_before" not in s["default"], "a ratio no run has is left out"


def test_compare_entries_joined_by_a_plus_are_applied_together():
    from moestream.runtime.measure.bench import _variant

    both = _variant("readfirst+subread:8+readsahead:1+threads:4")
    assert both == {"_streamer": {"prefill_speculate": True, "prefill_reads_ahead": 1},
                    "_reader": {"checked_read_bytes": 8 << 20}, "io": {"threads": 4}}
    assert _variant("order:shuffled+threads:4") == {"io": {"read_order": "shuffled", "threads": 4}}
    assert _variant("order:sideways") is None
    # a number that is none makes the entry unknown, for the bench to name (not a ValueError)
    assert [_variant(e) for e in ("depth:x", "threads:four", "readsahead:", "subread:big", "threads:8+depth:x")] == [None] * 5
    assert _variant("subread:0.5") == {"_reader": {"checked_read_bytes": 1 << 19}}
    from moestream.common.errors import OptionsError
    from moestream.runtime.measure.bench import bench_bundle

    with pytest.raises(OptionsError, match=r"unknown --compare entries \['depth:x'\]; known: .*depth:N.*; \+ joins entries$"):
        bench_bundle("no-bundle-needed", compare=["depth:x"])
    assert _variant("threads:8+depth:4") == {"io": {"threads": 8, "queue_depth": 4}}
    assert _variant("readfirst+nosuch") is None
    assert _variant("readfirst") == {"_streamer": {"prefill_speculate": True}}


def test_a_repeated_compare_entry_is_named_by_its_count():
    from moestream.runtime.measure.bench import run_name

    assert [run_name("default", n) for n in (1, 2)] == ["default_", "default2_"]
    assert [run_name("threads:4", n) for n in (1, 2)] == ["threads_4_", "threads_4-2_"]


def test_read_extents_reads_each_range_once_joined_and_aligned(tmp_path):
    """Ranges that touch are read once as one run; each is widened to 4 KiB bounds (O_DIRECT)."""
    from moestream.runtime.measure.ceiling import read_extents

    f = tmp_path / "experts.bin"
    f.write_bytes(bytes(10 << 20))
    ranges = [(f, 0, 3 << 20), (f, 3 << 20, 100), (f, (5 << 20) + 7, 1 << 20), (f, 5 << 20, 10)]
    for pattern in ("pieces", "shares", "shuffled"):
        r = read_extents(ranges, threads=3, piece=1 << 20, pattern=pattern)
        assert r["bytes"] == ((3 << 20) + 4096) + ((1 << 20) + 4096)  # the last range lies inside the one before
        assert r["seconds"] > 0 and r["threads"] == 3 and r["piece_bytes"] == 1 << 20 and r["pattern"] == pattern
    with pytest.raises(ValueError, match="pattern"):
        read_extents(ranges, threads=3, pattern="random")


def test_read_ceiling_in_sequence_reads_on_through_the_files_and_wraps(tmp_path):
    """Reads in sequence go on from one file into the next and back to the first: in a run long
    enough, every thread reads more than all the files hold, in aligned reads that stop at each
    file's end (a file shorter than one read is read whole)."""
    from moestream.runtime.measure.ceiling import read_ceiling

    paths = [tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "tiny.bin"]
    for path, size in zip(paths, (64 << 10, 40 << 10, 4096), strict=True):
        path.write_bytes(bytes(size))
    r = read_ceiling(paths, chunk=16384, threads=2, seconds=0.2, sequential=True)
    assert r["sequential"] and r["bytes"] > 4 * (108 << 10) and r["bytes"] % 4096 == 0  # passes over the files
    assert r["reads"] > 4 * 8, "108 KiB in 16 KiB reads stopping at each file's end is 8 per pass"


def test_read_ceiling_reads_other_offsets_each_call(tmp_path, monkeypatch):
    """Two trials in a row read other offsets, random or in sequence: a disk or host that caches what
    was just read cannot serve the next trial from memory."""
    import os

    from moestream.runtime.measure.ceiling import read_ceiling

    path = tmp_path / "experts.bin"
    path.write_bytes(bytes(64 << 20))
    offsets: list[int] = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: offsets.append(off) or real(fd, bufs, off))
    for sequential in (False, True):
        firsts = []
        for _ in range(2):
            offsets.clear()
            read_ceiling([path], chunk=16384, threads=1, seconds=0.02, sequential=sequential)
            firsts.append(offsets[:4])
        assert firsts[0] != firsts[1], sequential


def test_read_ceiling_rounds_take_turns_and_sum_each_cell(tmp_path, monkeypatch):
    """The cells take turns within each round; a cell's rate is all its bytes over all its seconds
    (not its best window), and its best window is kept beside it."""
    from moestream.runtime.measure import ceiling

    calls = []

    def fake(paths, chunk, threads, seconds, sequential=False):
        calls.append((chunk, threads, sequential))
        gb = {1: 1.0, 2: 3.0}[len([c for c in calls if c == (chunk, threads, sequential)])] if threads == 8 else 2.0
        return {"chunk_bytes": chunk, "gb_per_s": gb, "bytes": int(gb * 1e9 * seconds), "seconds": seconds}

    monkeypatch.setattr(ceiling, "read_ceiling", fake)
    cells = [(4096, 8, False), (4096, 4, True)]
    out = ceiling.read_ceiling_rounds([tmp_path], cells, rounds=2, seconds=0.5)
    assert calls == cells * 2
    assert out[0]["windows"] == [1.0, 3.0] and out[0]["gb_per_s"] == pytest.approx(2.0) and out[0]["best_window_gb_per_s"] == 3.0
    assert out[1]["sequential"] and out[1]["gb_per_s"] == pytest.approx(2.0)


def test_the_best_cell_is_chosen_on_half_its_windows_and_measured_on_the_others():
    """A cell whose windows ran high by chance wins a choice made on all of them, and its mean over
    them leans high (the winner's curse): the ceiling takes the best cell on its even windows and
    its rate from its odd ones; the best cell over all windows and the best window stay beside it."""
    from moestream.runtime.measure.report import ceilings

    def cell(threads, windows, sequential=False):
        return {"threads": threads, "chunk_bytes": 1 << 20, "sequential": sequential, "windows": windows,
                "gb_per_s": sum(windows) / len(windows), "best_window_gb_per_s": max(windows)}

    lucky, steady, seq = cell(8, [2.6, 1.4, 2.6, 1.4]), cell(4, [1.9] * 4), cell(8, [1.5, 2.2, 1.5, 2.2], True)
    out = ceilings([lucky, steady, seq])
    assert out["ceiling"]["threads"] == 8 and out["ceiling"]["gb_per_s"] == pytest.approx(1.4)
    assert out["ceiling"]["all_windows_gb_per_s"] == pytest.approx(2.0) and out["ceiling_best_cell_all_windows_gb_per_s"] == pytest.approx(2.0)
    assert out["ceiling_burst_gb_per_s"] == 2.6 and not out["ceiling"]["sequential"]
    assert out["prefill_ceiling"]["gb_per_s"] == pytest.approx(1.4), "the in-sequence cell loses on its even windows"
    out = ceilings([steady, cell(8, [1.8, 2.2, 1.8, 2.2], True)])
    assert out["prefill_ceiling"]["sequential"] is False and out["prefill_ceiling"]["gb_per_s"] == pytest.approx(1.9)


def test_shares_give_each_thread_one_contiguous_run_of_the_bytes_in_order():
    """"shares": the ranges laid end to end and cut into one aligned share per thread, each read in
    order in reads of at most a piece; together they read every byte once."""
    from moestream.runtime.measure.ceiling import _shares

    ranges = [(3, 0, 40960), (3, 81920, 90112), (4, 4096, 20480)]  # 40 KiB, 8 KiB, 16 KiB
    shares = _shares(ranges, threads=3, piece=16384)
    assert [sum(n for _, _, n in s) for s in shares] == [24576, 24576, 16384]
    assert shares[0] == [(3, 0, 16384), (3, 16384, 8192)]
    assert shares[1] == [(3, 24576, 16384), (3, 81920, 8192)] and shares[2] == [(4, 4096, 16384)]
    read = sorted((fd, off, n) for s in shares for fd, off, n in s)
    assert all(off % 4096 == 0 and n % 4096 == 0 for _, off, n in read)
    assert len(_shares(ranges, threads=8, piece=1 << 20)) == 8, "more threads than bytes: some shares are empty"


def test_the_report_gives_no_roofline_to_a_run_that_read_nothing_and_fits_long_compare_names(capsys):
    """A warm run whose every expert was a hit read no bytes: the disk bounds nothing, so its roofline
    and share are '-', not a ceiling over one byte; and a --compare entry's long name (several
    settings joined by '+') keeps its own column instead of running into the figures."""
    from pathlib import Path

    from moestream.runtime.measure.report import print_report

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    print_report(json.loads((results / "h200_a397b_l2_streams8_depth.json").read_text()))
    lines = capsys.readouterr().out.splitlines()
    warm = next(line for line in lines if line.startswith("warm "))
    assert warm.split()[-3:] == ["-", "-", "0.0"], warm
    named = next(line for line in lines if line.startswith("threads_8+depth_4+order_shuffled_cold "))
    assert len(named.split()) == len(warm.split()), named
    summary = next(line for line in lines if line.startswith("  threads:8+depth:4+order:shuffled "))
    assert summary.split()[1:3] == ["1", "runs"], summary


def test_the_first_token_is_known_one_step_before_mlx_lms_loop_hands_it_out():
    """mlx-lm's generate_step gives the model the next token's step before it yields the first
    token: a model that reads on each call (as ours does) has run that step by the hand-out. The
    clock notes the call after the prompt's last token, whatever the chunks the prompt came in."""
    import time

    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from moestream.runtime.measure.first_token import FirstTokenClock

    class Model:  # logits that always pick token 0; no KV cache
        def __init__(self):
            self.calls: list[tuple[int, float]] = []

        def make_cache(self):
            return []

        def __call__(self, inputs, cache=None):
            self.calls.append((inputs.shape[-1], time.perf_counter()))
            return mx.zeros((1, inputs.shape[-1], 5))

    for prompt, step in ((9, 4), (10, 4), (3, 512)):
        model = Model()
        clock = FirstTokenClock(model, prompt)
        tokens = generate_step(mx.array(list(range(prompt))), clock, max_tokens=3, prefill_step_size=step)
        next(tokens)
        sizes = [n for n, _ in model.calls]
        assert sum(sizes[:-1]) == prompt and sizes[-1] == 1, "the next token's step ran before the first hand-out"
        assert model.calls[-2][1] < clock.known_at <= model.calls[-1][1], (prompt, step)
        list(tokens)
        assert clock.make_cache() == [], "everything else is the model's"
