"""Every supported family: synth tiny -> bundle -> verify, checked against mlx-lm.

- the bundle's expert tensors are exactly what `mx.quantize` gives for the source tensor;
- its resident tensors equal mlx-lm's sanitized ones;
- loaded by the streaming runtime (float32), its logits equal mlx-lm's (experts quantized with
  nn.quantize, cast to float32), with no budget and with a budget of 30% of the expert bytes,
  and greedy generation of 32 tokens gives the same tokens.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from oracle import greedy_tokens, reference_model

import moestream
from moestream.manifests.bundle import unpack_extent
from moestream.manifests.checkpoint import SourceCheckpoint
from moestream.manifests.open import open_bundle

FAMILIES = ["qwen3_moe", "qwen3_5_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]
PROMPT = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8] * 6  # 72 tokens: exercises the sorted path


def _same_bits(a: mx.array, b: mx.array) -> bool:
    if a.dtype == mx.bfloat16:
        a, b = a.view(mx.uint16), b.view(mx.uint16)
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.all(a == b))


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_experts_are_mx_quantize_of_source(family, synth_dir, bundle_dir):
    ckpt = SourceCheckpoint.open(synth_dir(family))
    bundle = open_bundle(bundle_dir(family), verify=True)
    layer = ckpt.expert_layers[-1]
    for expert in (0, ckpt.dims.num_experts - 1):
        source = ckpt.read_expert(layer, expert)
        extent = bundle.extent(layer, expert)
        with open(bundle.path(extent.file), "rb") as f:
            f.seek(extent.offset)
            packed = unpack_extent(f.read(extent.nbytes), extent.tensors)
        for name, w in source.items():
            if name.endswith(".weight"):
                wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
                proj = name[: -len(".weight")]
                assert _same_bits(packed[name], wq), f"{family} {name}"
                assert _same_bits(packed[f"{proj}.scales"], scales)
                assert _same_bits(packed[f"{proj}.biases"], biases)
            else:
                assert _same_bits(packed[name], w), f"{family} {name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_resident_equals_mlx_lm_sanitized(family, synth_dir, bundle_dir):
    ref = reference_model(synth_dir(family), bits=None)  # float32 cast: compare as float32
    resident = mx.load(str(bundle_dir(family) / "resident.safetensors"))
    switch_paths = tuple(p + "." for p in open_bundle(bundle_dir(family)).layers.values())
    expected = {k: v for k, v in tree_flatten(ref.parameters()) if not k.startswith(switch_paths)}
    assert set(resident) == set(expected)
    for k, v in resident.items():
        assert mx.array_equal(v.astype(mx.float32), expected[k]), k


def _budget_30pct(bundle_path, model_probe) -> int:
    stats = moestream.stats(model_probe)
    bundle = open_bundle(bundle_path)
    # 30% of the expert bytes for the cache, on top of what the budget reserves for the rest
    expert_bytes_f32 = sum(moestream.runtime_of(model_probe).store.nbytes(layer, e) for (layer, e) in bundle.extents)
    plan = moestream.runtime_of(model_probe).plan
    return int(stats["resident_bytes"] + stats["kv_reserve_bytes"] + plan.buffer_bytes + 0.3 * expert_bytes_f32)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_logits_and_tokens_equal_mlx_lm(family, synth_dir, bundle_dir):
    ref = reference_model(synth_dir(family), bits=4, group_size=64)
    prompt = mx.array([PROMPT])
    ref_logits = ref(prompt)
    ref_tokens = greedy_tokens(ref, PROMPT[:8], 32)
    scale = float(mx.abs(ref_logits).max())

    model, _ = moestream.load(bundle_dir(family), dtype="float32")
    budget = _budget_30pct(bundle_dir(family), model)
    for memory_budget in (None, budget):
        model, _ = moestream.load(bundle_dir(family), dtype="float32", memory_budget=memory_budget)
        logits = model(prompt)
        diff = float(mx.abs(logits - ref_logits).max())
        assert diff <= 1e-5 * scale, f"{family} budget={memory_budget}: max |diff| {diff} vs max |logit| {scale}"
        assert greedy_tokens(model, PROMPT[:8], 32) == ref_tokens
        stats = moestream.stats(model)
        assert stats["bytes_read"] > 0
        if memory_budget is not None:
            assert stats["evictions"] > 0, "a 30% budget must evict"
            assert stats["expert_cache_peak_bytes"] <= stats["cache_capacity_bytes"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers5_config_gives_the_same_model(family, tmp_path, synth_dir):
    """A checkpoint whose config.json transformers 5 wrote (num_local_experts, rope_parameters)
    prepares into a bundle that computes exactly what mlx-lm computes from the Hub-style config."""
    from conftest import build_bundle

    from moestream.stages.synth import synth_checkpoint

    src = synth_checkpoint(family, tmp_path / "t5", preset="tiny", seed=0, config_generation="transformers5").path
    bundle = build_bundle(src, tmp_path / "bundle")
    ref = reference_model(synth_dir(family), bits=4)
    model, _ = moestream.load(bundle, dtype="float32")
    prompt = mx.array([PROMPT[:16]])
    a, b = ref(prompt), model(prompt)
    assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(a).max())


def test_resident_bits_8_quantizes_resident_linears_but_not_routers(tmp_path, synth_dir):
    from conftest import build_bundle

    bundle = build_bundle(synth_dir("qwen3_moe"), tmp_path / "r8", resident_bits=8)
    resident = mx.load(str(bundle / "resident.safetensors"))
    assert "model.layers.0.self_attn.q_proj.scales" in resident
    assert resident["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.mlp.gate.scales" not in resident  # the router stays at source precision
    model, _ = moestream.load(bundle)
    ref = reference_model(synth_dir("qwen3_moe"), bits=4)
    prompt = mx.array([PROMPT[:16]])
    a, b = ref(prompt), model(prompt)
    # 8-bit resident weights: close to, not equal to, the source-precision model
    assert float(mx.abs(a - b).max()) < 0.1 * float(mx.abs(a).max())
    assert moestream.inspect(bundle)["resident_bits"] == 8


def _dense_checkpoint(folder, model_type="llama"):
    """A tiny dense model as mlx-lm saves one (config.json + model.safetensors)."""
    import json

    from mlx_lm.utils import _get_classes

    config = {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 64,
              "rope_theta": 10000.0, "tie_word_embeddings": True}
    model_class, args_class = _get_classes(config=config)
    model = model_class(args_class.from_dict(config))
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_dense_model_or_an_unknown_type_is_refused_in_one_line(tmp_path, capsys):
    import json

    from moestream.cli import main

    dense = _dense_checkpoint(tmp_path / "dense")
    assert main(["prepare", str(dense), "--out", str(tmp_path / "b"), "--engine", "plain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no routed experts" in err and "dense model" in err
    (dense / "config.json").write_text(json.dumps({**json.loads((dense / "config.json").read_text()),
                                                   "model_type": "not_a_model"}))
    assert main(["prepare", str(dense), "--out", str(tmp_path / "b"), "--engine", "plain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'not_a_model'" in err and "mlx-lm" in err and "no model for it" in err
    assert not (tmp_path / "b").exists()


def test_the_expert_map_is_learned_from_each_familys_own_sanitize(synth_dir):
    """Stand-ins through mlx-lm's sanitize give the same slices whatever the layout: per-expert
    tensors (qwen3_moe, mixtral w1/w3/w2), fused halves under a prefix (qwen3_5_moe); gpt-oss's
    transformers layout, which its sanitize does not take, is recognised by name and shape."""
    methods = {}
    for family in FAMILIES:
        ckpt = SourceCheckpoint.open(synth_dir(family))
        methods[family] = ckpt.experts.method
        layer = ckpt.expert_layers[0]
        assert set(ckpt.expert_slices(layer, 0)) == set(ckpt.arch.targets[layer].tensor_names())
    assert methods == {**{f: "sanitize" for f in FAMILIES}, "gpt_oss": "names"}
    q35 = SourceCheckpoint.open(synth_dir("qwen3_5_moe")).expert_slices(0, 5)
    assert q35["up_proj.weight"].tensor.endswith("experts.gate_up_proj") and q35["up_proj.weight"].expert == 5
    assert q35["up_proj.weight"].start == q35["gate_proj.weight"].stop
    mixtral = SourceCheckpoint.open(synth_dir("mixtral")).expert_slices(1, 7)
    assert mixtral["up_proj.weight"].tensor == "model.layers.1.block_sparse_moe.experts.7.w3.weight"
