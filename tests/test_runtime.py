"""Runtime behaviour beyond the per-family oracle checks: CheckpointStore, experts_per_token,
the budget, io modes, stats, and the generate command."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from oracle import greedy_tokens, reference_model

import moestream
from moestream.common.units import parse_bytes
from moestream.runtime.model.budget import BudgetError

PROMPT = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "qwen3_5_moe"])
def test_checkpoint_store_runs_source_checkpoint_like_mlx_lm(family, synth_dir):
    """An unprepared checkpoint streams its experts from the source safetensors at source precision."""
    ref = reference_model(synth_dir(family), bits=None)
    model, _ = moestream.load(synth_dir(family), memory_budget=None)
    assert moestream.runtime_of(model).kind == "checkpoint"
    a, b = ref(mx.array([PROMPT])), model(mx.array([PROMPT]))
    assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(a).max())
    assert moestream.stats(model)["bytes_read"] > 0


def test_experts_per_token_matches_mlx_lm_built_with_that_top_k(tmp_path, synth_dir, bundle_dir):
    src = tmp_path / "k2"
    shutil.copytree(synth_dir("qwen3_moe"), src)
    config = json.loads((src / "config.json").read_text())
    config["num_experts_per_tok"] = 2
    (src / "config.json").write_text(json.dumps(config))
    ref = reference_model(src, bits=4)  # mlx-lm's own model, built with top-2

    model, _ = moestream.load(bundle_dir("qwen3_moe"), experts_per_token=2)
    a, b = ref(mx.array([PROMPT])), model(mx.array([PROMPT]))
    assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(a).max())
    assert greedy_tokens(model, PROMPT, 8) == greedy_tokens(ref, PROMPT, 8)
    with pytest.raises(ValueError, match="between 1 and 16"):
        moestream.load(bundle_dir("qwen3_moe"), experts_per_token=17)


def test_budget_too_small_is_refused_with_the_minimum(bundle_dir):
    model, _ = moestream.load(bundle_dir("qwen3_moe"))
    plan = moestream.runtime_of(model).plan
    minimum = plan.resident_bytes + plan.kv_reserve_bytes + plan.buffer_bytes + plan.min_layer_bytes
    with pytest.raises(BudgetError, match=f"need at least .*\\({minimum} bytes\\)"):
        moestream.load(bundle_dir("qwen3_moe"), memory_budget=minimum - 1)
    model, _ = moestream.load(bundle_dir("qwen3_moe"), memory_budget=minimum)  # exactly enough works
    model(mx.array([PROMPT * 6]))  # a prefill routed to every expert, one layer's k experts at a time
    s = moestream.stats(model)
    assert s["expert_cache_peak_bytes"] <= s["cache_capacity_bytes"] == plan.min_layer_bytes


def test_parse_bytes():
    assert parse_bytes("6GB") == 6 * 10**9
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes(1234) == 1234
    assert parse_bytes(None) is None
    for bad in ("six", "-1GB", "5 parsecs", 0):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
def test_stats_fields_and_io_modes(io_mode, bundle_dir):
    model, _ = moestream.load(bundle_dir("qwen3_moe"), io=moestream.IOOptions(mode=io_mode), memory_budget="50MB")
    model(mx.array([PROMPT]))
    s = moestream.stats(model)
    for key in ("bytes_read", "reads", "mean_read_bytes", "cache_hits", "cache_misses", "hit_rate", "io_wait_s",
                "expert_cache_bytes", "expert_cache_peak_bytes", "budget_bytes", "io_mode"):
        assert key in s
    assert s["io_mode"] == io_mode and s["budget_bytes"] == 50 * 10**6
    assert s["reads"] > 0 and s["cache_misses"] > 0


def test_each_distinct_expert_read_once_per_call(bundle_dir):
    model, _ = moestream.load(bundle_dir("qwen3_moe"))
    model(mx.array([PROMPT * 6]))  # 72 tokens x top-4: many repeats of each expert
    s = moestream.stats(model)
    n_layers = len(moestream.runtime_of(model).store.layers)
    assert s["cache_misses"] <= n_layers * 16 and s["cache_hits"] == 0


def test_generate_cli_streams_text_and_prints_stats(tmp_path, bundle_dir, capsys):
    from moestream.cli import main

    stats_file = tmp_path / "stats.json"
    code = main(["generate", str(bundle_dir("qwen3_moe")), "--prompt", "hello", "--max-tokens", "8",
                 "--memory-budget", "20MB", "--stats-json", str(stats_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert "[moestream]" in out and "tok/s" in out and "hit rate" in out and "TTFT" in out
    report = json.loads(stats_file.read_text())
    assert report["generated_tokens"] == 8 and report["bytes_read"] > 0


def test_generate_cli_bad_bundle_is_one_line_error(tmp_path, capsys):
    from moestream.cli import main

    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_unbounded_budget_holds_fully_loaded_layers_whole_and_stays_exact(synth_dir, bundle_dir):
    model, _ = moestream.load(bundle_dir("qwen3_moe"))
    model(mx.array([list(range(3, 300))]))  # enough different tokens to route to every expert
    rt = moestream.runtime_of(model)
    assert set(rt.streamer.whole) == set(rt.store.layers)
    misses = moestream.stats(model)["cache_misses"]
    ref = reference_model(synth_dir("qwen3_moe"), bits=4)
    for prompt in (PROMPT, PROMPT * 6):  # decode-sized and sorted (prefill) paths
        a, b = ref(mx.array([prompt])), model(mx.array([prompt]))
        assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(a).max())
    s = moestream.stats(model)
    assert s["cache_misses"] == misses and s["cache_hits"] > 0
    assert s["expert_cache_bytes"] == sum(rt.store.nbytes(layer, e) for layer in rt.store.layers for e in range(16))


@pytest.mark.parametrize("family", ["qwen3_5_moe", "gpt_oss", "qwen3_moe"])
def test_checkpoint_store_reads_each_range_once_and_counts_memory_held(family, synth_dir):
    """A fused gate_up row is read once for both halves; nbytes is what the arrays hold."""
    model, _ = moestream.load(synth_dir(family))
    store = moestream.runtime_of(model).store
    layer = next(iter(store.layers))
    before = store.reader.stats()["requests"]
    arrays = store.read(layer, [0, 1])
    requests = store.reader.stats()["requests"] - before
    ranges = {store.ckpt.slice_range(s)[1:] for e in (0, 1) for s in store.ckpt.expert_slices(layer, e).values()}
    assert requests == len(ranges)
    for e in (0, 1):
        assert store.nbytes(layer, e) == sum(a.nbytes for a in arrays[e].values())


def test_experts_are_read_straight_into_mlx_memory_and_every_path_is_exact(synth_dir, bundle_dir, monkeypatch):
    """read_into="arrays" (default): no copy of expert bytes (the host path's unpack_extent is never
    called); "host" and the device staging copy give the same logits as mlx-lm, under a budget
    small enough to evict."""
    import moestream.runtime.io.stores as stores

    ref = reference_model(synth_dir("qwen3_moe"), bits=4)
    want = ref(mx.array([PROMPT * 3]))
    plan = moestream.runtime_of(moestream.load(bundle_dir("qwen3_moe"))[0]).plan
    budget = plan.resident_bytes + plan.kv_reserve_bytes + plan.buffer_bytes + 2 * plan.min_layer_bytes
    for kw in ({}, {"read_into": "host"}, {"stage_on_device": True}, {"read_into": "host", "stage_on_device": True},
               {"read_order": "shuffled"}, {"read_order": "pieces", "read_into": "host", "queue_depth": 1, "threads": 3}):
        with monkeypatch.context() as m:
            if kw.get("read_into", "arrays") == "arrays":
                m.setattr(stores, "unpack_extent", lambda *a: pytest.fail("expert bytes were copied"))
            model, _ = moestream.load(bundle_dir("qwen3_moe"), memory_budget=budget, io=moestream.IOOptions(**kw))
            moestream.runtime_of(model).streamer.prefill_admission = "all"  # the prompt's reads evict
            reader = moestream.runtime_of(model).reader
            assert (reader.read_order, reader.queue_depth) == (kw.get("read_order", "shares"), kw.get("queue_depth"))
            got = model(mx.array([PROMPT * 3]))
            assert moestream.stats(model)["evictions"] > 0, kw
        assert float(mx.abs(want - got).max()) <= 1e-5 * float(mx.abs(want).max()), kw
    with pytest.raises(moestream.MoestreamError, match="read_into"):
        moestream.load(bundle_dir("qwen3_moe"), io=moestream.IOOptions(read_into="disk"))
    with pytest.raises(moestream.MoestreamError, match="read_order must be one of shares, pieces, shuffled"):
        moestream.IOOptions(read_order="random")
    with pytest.raises(moestream.MoestreamError, match="queue_depth must be a positive integer"):
        moestream.IOOptions(queue_depth=0)


def test_tensors_read_into_arrays_are_views_of_one_aligned_buffer(bundle_dir):
    model, _ = moestream.load(bundle_dir("qwen3_moe"))
    store = moestream.runtime_of(model).store
    experts = store.read(0, [1, 5])
    import numpy as np

    for e, tensors in experts.items():
        extent = store.bundle.extent(0, e)
        addresses = {t.name: np.array(tensors[t.name], copy=False).ctypes.data for t in extent.tensors
                     if tensors[t.name].dtype == mx.uint32}  # quantized codes (scales are cast to fp32 on CPU)
        base = min(addresses.values()) - min(t.offset for t in extent.tensors if t.name in addresses)
        for t in extent.tensors:
            if t.name in addresses:
                assert addresses[t.name] == base + t.offset, "tensors sit where the extent puts them: one buffer"
                assert addresses[t.name] % 64 == 0


def test_staging_slots_are_reused_and_given_back_after_a_failed_read(tmp_path, bundle_dir):
    from moestream.runtime.io.reader import ReadError
    from moestream.runtime.io.staging import cuda_advice

    model, _ = moestream.load(bundle_dir("qwen3_moe"), memory_budget=None, io=moestream.IOOptions(stage_on_device=True))
    store = moestream.runtime_of(model).store
    k = moestream.runtime_of(model).experts_per_token
    for layer in store.layers:  # decode-sized batches: one layer's k experts
        store.read(layer, list(range(k)))
    assert store.staging.allocations <= k, "slots are reused from one batch to the next"
    plan = moestream.runtime_of(model).plan
    idle = sum(s[1].nbytes for s in store.staging._free)
    assert 0 < idle <= plan.buffer_bytes + k * 4096, "idle slots are the budget's read buffers (+ alignment)"
    if not mx.cuda.is_available():
        assert not cuda_advice().available and cuda_advice().why

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir("qwen3_moe"), bad)
    model, _ = moestream.load(bad, io=moestream.IOOptions(stage_on_device=True))
    store = moestream.runtime_of(model).store
    last = max(store.bundle.extents.values(), key=lambda x: (x.file, x.offset))
    path = store.bundle.path(last.file)
    with open(path, "r+b") as f:
        f.truncate(last.offset + 100)
    idle = sum(s[1].nbytes for s in store.staging._free)
    with pytest.raises(ReadError, match=f"layer {last.layer} expert {last.expert}"):
        store.read(last.layer, [0, last.expert])
    assert sum(s[1].nbytes for s in store.staging._free) >= idle
