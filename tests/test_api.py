"""The public API: load's options and its LoadedModel, plan_memory, runtime_of/close, prepare's
options object, the one error base."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

import moestream
from moestream.common.errors import MoestreamError, OptionsError

PROMPT = [3, 17, 42, 7, 99, 5, 23, 64]


def _process() -> tuple[int, int]:
    """(native threads, open file descriptors) of this process."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("share", [None, 0.3])
def test_plan_memory_equals_what_load_plans(bundle_dir, family, share):
    """The budget sized without loading is the one load then splits the same way."""
    planned = moestream.plan_memory(bundle_dir(family), expert_cache_share=share)
    with moestream.load(bundle_dir(family), memory_budget=planned.budget_bytes) as (model, _):
        assert moestream.runtime_of(model).plan == planned
    if share is not None:
        assert planned.cache_bytes == max(planned.min_layer_bytes, int(share * planned.expert_bytes))
    else:
        assert planned.budget_bytes is None and planned.minimum_bytes > planned.resident_bytes


def test_plan_memory_minimum_is_exactly_enough(bundle_dir):
    minimum = moestream.plan_memory(bundle_dir("qwen3_moe")).minimum_bytes
    with moestream.load(bundle_dir("qwen3_moe"), memory_budget=minimum):
        pass
    with pytest.raises(moestream.MoestreamError, match="too small"):
        moestream.plan_memory(bundle_dir("qwen3_moe"), memory_budget=minimum - 1)
    with pytest.raises(OptionsError, match="not both"):
        moestream.plan_memory(bundle_dir("qwen3_moe"), memory_budget=minimum, expert_cache_share=0.5)


def test_max_kv_size_sets_the_reserve(bundle_dir):
    small = moestream.plan_memory(bundle_dir("qwen3_moe"), max_kv_size=128)
    large = moestream.plan_memory(bundle_dir("qwen3_moe"), max_kv_size=4096)
    assert small.kv_tokens == 128 and large.kv_reserve_bytes == 32 * small.kv_reserve_bytes
    assert large.kv_reserve_bytes == moestream.plan_memory(bundle_dir("qwen3_moe")).kv_reserve_bytes
    with pytest.raises(OptionsError, match="max_kv_size"):
        moestream.plan_memory(bundle_dir("qwen3_moe"), max_kv_size=0)


def test_loaded_model_closes_its_reader_and_refuses_to_compute_after(bundle_dir):
    with moestream.load(bundle_dir("qwen3_moe"), memory_budget="50MB") as (model, tokenizer):
        mx.eval(model(mx.array([PROMPT])))
        rt = moestream.runtime_of(model)
        assert rt.stats()["bytes_read"] > 0 and len(rt.cache)
    assert rt.closed and not len(rt.cache) and not rt.reader._files, "files closed, experts dropped"
    with pytest.raises(MoestreamError, match="closed"):
        mx.eval(model(mx.array([PROMPT])))
    rt.close()  # closing twice is harmless


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_load_close_cycles_leave_the_process_as_it_was(bundle_dir):
    """No descriptor, reader pool or native thread outlives a closed model (MLX keeps native
    resources per thread that runs MLX work, so the reader threads are shared, made once)."""

    def cycle():
        with moestream.load(bundle_dir("qwen3_moe"), memory_budget="50MB", prefetch=True) as (model, _):
            mx.eval(model(mx.array([PROMPT])))

    cycle()
    before = _process()
    for _ in range(30):
        cycle()
    assert _process() == before


def test_load_options_are_keyword_only_and_checked(bundle_dir):
    with pytest.raises(TypeError):
        moestream.load(bundle_dir("qwen3_moe"), "8GB")
    for bad, match in (({"experts_per_token": 99}, "between 1 and 16"), ({"dtype": "int4"}, "dtype"),
                       ({"cache_policy": "fifo"}, "unknown cache policy")):
        with pytest.raises(OptionsError, match=match):
            moestream.load(bundle_dir("qwen3_moe"), **bad)
    with pytest.raises(OptionsError, match="io threads"):
        moestream.IOOptions(threads=0)
    with pytest.raises(OptionsError, match="io mode"):
        moestream.IOOptions(mode="mmap")
    with pytest.raises(OptionsError, match="revision"):
        moestream.load(bundle_dir("qwen3_moe"), revision="main")


def test_runtime_of_a_model_moestream_did_not_load(synth_dir):
    from mlx_lm.utils import load_model

    model, _ = load_model(synth_dir("qwen3_moe"))
    with pytest.raises(MoestreamError, match="not loaded by moestream"):
        moestream.runtime_of(model)
    assert moestream.runtime_of(model, required=False) is None


def test_every_error_moestream_raises_on_purpose_is_a_moestream_error():
    from moestream.manifests.architecture import UnsupportedModel
    from moestream.manifests.bundle import BundleError
    from moestream.manifests.safetensors_index import CheckpointError
    from moestream.runtime.cache.expert_cache import CacheFullError
    from moestream.runtime.io.hub import HubError
    from moestream.runtime.io.reader import ReadError
    from moestream.runtime.model.budget import BudgetError
    from moestream.stages.card import CardError
    from moestream.stages.fetch import FetchError
    from moestream.stages.profile import CalibrationError
    from moestream.stages.publish import PublishError

    for cls in (BundleError, UnsupportedModel, CheckpointError, CacheFullError, HubError, ReadError, BudgetError,
                CardError, FetchError, CalibrationError, PublishError, OptionsError):
        assert issubclass(cls, MoestreamError), cls
    assert moestream.MoestreamError is MoestreamError


def test_prepare_options_are_checked_before_any_work(tmp_path, synth_dir):
    src = synth_dir("qwen3_moe")
    cases = [({"expert_bits": 5}, "expert bits"), ({"group_size": 48}, "group size"),
             ({"resident_bits": 4}, "resident bits"), ({"expert_bits": "auto"}, "size budget"),
             ({"size_budget": "1MB"}, "auto only"), ({"expert_bits": "auto", "size_budget": "1MB",
                                                       "bits_plan": tmp_path / "p.json"}, "not both"),
             ({"profile": tmp_path / "missing"}, "no such folder"), ({"workers": 0}, "workers"),
             ({"workers": 2, "dask_address": "tcp://x:1"}, "not both"), ({"colour": "red"}, "unknown preparation option")]
    for options, match in cases:
        with pytest.raises(OptionsError, match=match):
            moestream.prepare(src, tmp_path / "out", engine="plain", **options)
    with pytest.raises(OptionsError, match="engine"):
        moestream.prepare(src, tmp_path / "out", engine="dask")
    with pytest.raises(OptionsError, match="Prefect engine"):
        moestream.prepare(src, tmp_path / "out", engine="plain", workers=2)
    assert not (tmp_path / "out").exists()


def test_a_bundle_is_not_a_source(tmp_path, bundle_dir):
    with pytest.raises(OptionsError, match="is a moestream bundle, not a model checkpoint"):
        moestream.prepare(bundle_dir("qwen3_moe"), tmp_path / "again", engine="plain")


def test_one_sequence_of_steps_whatever_runs_them(tmp_path, synth_dir):
    """run_steps decides the steps; a runner only runs them. Recorded with the in-process runner:
    a profiled, per-expert-planned preparation runs exactly these steps, in this order."""
    import json

    from moestream.stages.bits import BitPlan
    from moestream.stages.prepare import InProcess, PrepareOptions, make_plan, run_steps

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(BitPlan({(0, 1): 8}, 0, 0.0).to_json()))
    plan = make_plan(PrepareOptions(synth_dir("qwen3_moe"), tmp_path / "b", bits_plan=plan_file, profile=True,
                                    profile_tokens=256))
    runner = InProcess()
    bundle, meta = run_steps(plan, runner)
    layers = len(plan.layers)
    assert runner.steps == ["plan-bits", "profile", "order-experts", *["pack-layer"] * layers, "write", "verify"]
    assert meta["layout"]["order"] == "profile" and meta["experts"]["bits"] == "mixed"
    assert moestream.inspect(bundle)["layout_order"] == "profile"
