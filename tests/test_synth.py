"""synth: tiny Hub-layout checkpoints that mlx-lm loads strictly, with decisive routing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import gpt_oss
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load_model
from safetensors import safe_open

from moestream.stages import synth
from moestream.stages.synth import (
    PRESETS,
    SUPPORTED_FAMILIES,
    plan_checkpoint,
    synth_checkpoint,
)

PROMPT_TOKENS = 256  # enough routed tokens for the frequency statistics below


# ----------------------------------------------------------------------------- helpers


def _gpt_oss_bf16_to_mlx(weights: dict) -> dict:
    """transformers' bf16 gpt_oss experts -> mlx-lm's SwitchGLU layout.

    mlx-lm 0.32.2's gpt_oss sanitize assumes the *mxfp4* checkpoint orientation ([E, 2I, H]
    blocks), so mlx_lm.load cannot read the bf16 layout ([E, H, 2I], gate/up interleaved on the
    last axis, down [E, I, H]); we convert here: de-interleave and transpose to out x in.
    """
    out = {}
    for k, v in weights.items():
        base, _, leaf = k.rpartition(".")
        if leaf == "gate_up_proj":
            out[f"{base}.gate_proj.weight"] = v[..., ::2].swapaxes(-1, -2)
            out[f"{base}.up_proj.weight"] = v[..., 1::2].swapaxes(-1, -2)
        elif leaf == "gate_up_proj_bias":
            out[f"{base}.gate_proj.bias"] = v[..., ::2]
            out[f"{base}.up_proj.bias"] = v[..., 1::2]
        elif leaf == "down_proj" and base.endswith("experts"):
            out[f"{base}.down_proj.weight"] = v.swapaxes(-1, -2)
        elif leaf == "down_proj_bias":
            out[f"{base}.down_proj.bias"] = v
        else:
            out[k] = v
    return out


class _Bf16GptOss(gpt_oss.Model):
    def sanitize(self, weights):
        return super().sanitize(_gpt_oss_bf16_to_mlx(weights))


def _load(family: str, path: Path):
    """Strict mlx-lm load (gpt_oss through the conversion above), in fp32 for CPU speed."""
    if family == "gpt_oss":
        model, _ = load_model(path, get_model_classes=lambda config: (_Bf16GptOss, gpt_oss.ModelArgs))
    else:
        model, _ = load_model(path)
    model.set_dtype(mx.float32)
    return model


def _prompt(seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 300, size=(1, PROMPT_TOKENS)))


def _router_logits(block, x: mx.array) -> mx.array:
    if hasattr(block, "router"):  # gpt_oss: Linear with bias
        return block.router(x)
    if isinstance(block.gate, nn.Linear):
        return block.gate(x)
    return x @ block.gate.weight.T  # deepseek_v3's MoEGate (sigmoid scoring happens later)


def _moe_blocks(model) -> dict[int, object]:
    """id(SwitchGLU) -> the MoE block that owns it (its router is a sibling)."""
    blocks = {}
    for layer in model.layers:
        for attr in ("mlp", "block_sparse_moe"):
            block = getattr(layer, attr, None)
            for sw in ("switch_mlp", "experts"):
                if isinstance(getattr(block, sw, None), SwitchGLU):
                    blocks[id(getattr(block, sw))] = block
    return blocks


def _routing_stats(model, tokens, monkeypatch) -> list[dict]:
    """Per MoE layer: mean top-k softmax mass of the router and expert pick counts.

    Records what each SwitchGLU receives (the router's input and the chosen experts), which is
    exactly the interface moestream's streaming layer replaces.
    """
    seen = []
    original = SwitchGLU.__call__

    def recording(self, x, indices):
        seen.append((id(self), x, indices))
        return original(self, x, indices)

    monkeypatch.setattr(SwitchGLU, "__call__", recording)
    logits = model(tokens)
    mx.eval(logits)
    monkeypatch.setattr(SwitchGLU, "__call__", original)
    blocks = _moe_blocks(model)
    stats = []
    for switch_id, x, indices in seen:
        k = indices.shape[-1]
        probs = mx.softmax(_router_logits(blocks[switch_id], x).astype(mx.float32), axis=-1)
        n_experts = probs.shape[-1]
        mass = mx.sort(probs, axis=-1)[..., -k:].sum(axis=-1).mean().item()
        counts = np.bincount(np.array(indices).ravel(), minlength=n_experts)
        stats.append({"k": k, "experts": n_experts, "mass": mass, "counts": counts})
    return stats


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {f: synth_checkpoint(f, root / f).path for f in SUPPORTED_FAMILIES}


@pytest.fixture(scope="module")
def models(tiny) -> dict[str, nn.Module]:
    return {f: _load(f, p) for f, p in tiny.items()}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_loads_strictly_and_forward_is_finite(family, models):
    logits = models[family](_prompt()[:, :32])
    mx.eval(logits)
    assert logits.shape == (1, 32, PRESETS["tiny"].dims.vocab)
    assert mx.all(mx.isfinite(logits)).item()
    std = mx.std(logits).item()
    assert 0.1 < std < 20, std  # activations stayed O(1) through the layers


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_routing_is_decisive_and_uneven(family, models, monkeypatch):
    stats = _routing_stats(models[family], _prompt(), monkeypatch)
    assert stats, "no MoE layer ran"
    for s in stats:
        uniform_mass = s["k"] / s["experts"]  # 0.25 for tiny; a 0.02-std router gives ~0.26
        assert s["mass"] > max(0.6, 2 * uniform_mass), s["mass"]  # measured 0.93-0.99
        # Pearson chi-square of the pick counts against uniform popularity: with 15 degrees
        # of freedom uniform routing gives ~15 (P(>45) < 1e-4); measured 67-390.
        expected = s["counts"].sum() / s["experts"]
        chi2 = float(((s["counts"] - expected) ** 2 / expected).sum())
        assert chi2 > 3 * (s["experts"] - 1), (chi2, s["counts"])


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_same_seed_same_bytes_other_seed_differs(family, tiny, tmp_path):
    again = synth_checkpoint(family, tmp_path / "again").path
    assert _tree_bytes(again) == _tree_bytes(tiny[family])
    other = _tree_bytes(synth_checkpoint(family, tmp_path / "other", seed=1).path)
    for name, data in _tree_bytes(tiny[family]).items():
        if name.endswith(".safetensors"):
            assert other[name] != data, name


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_hub_layout_index_and_headers(family, tiny):
    path = tiny[family]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model*.safetensors"))
    assert len(shards) > 1  # tiny puts about one layer per shard
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s.name) for s in shards)
    seen, total = {}, 0
    for shard in shards:
        with safe_open(shard, framework="numpy") as f:  # the reader other stages use
            for name in f.keys():
                sl = f.get_slice(name)
                seen[name] = (shard.name, sl.get_dtype(), tuple(sl.get_shape()))
                total += int(np.prod(sl.get_shape())) * (4 if sl.get_dtype() == "F32" else 2)
    assert {k: v[0] for k, v in seen.items()} == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    d = PRESETS["tiny"].dims_for(family)
    e, h, i = d.experts, d.hidden, d.moe_intermediate
    expected = {
        "qwen3_moe": {
            "model.layers.0.mlp.experts.15.down_proj.weight": ("BF16", (h, i)),
            "model.layers.0.self_attn.q_norm.weight": ("BF16", (d.head_dim,)),
        },
        "mixtral": {
            "model.layers.0.block_sparse_moe.experts.0.w1.weight": ("BF16", (i, h)),
            "model.layers.0.block_sparse_moe.gate.weight": ("BF16", (e, h)),
        },
        "olmoe": {
            "model.layers.0.mlp.experts.0.up_proj.weight": ("BF16", (i, h)),
            "model.layers.0.self_attn.q_norm.weight": ("BF16", (d.heads * d.head_dim,)),
        },
        "deepseek_v3": {
            "model.layers.0.mlp.down_proj.weight": ("BF16", (h, d.dense_intermediate)),
            "model.layers.1.mlp.gate.e_score_correction_bias": ("F32", (e,)),
            "model.layers.1.mlp.shared_experts.up_proj.weight": ("BF16", (i, h)),
            "model.layers.1.mlp.experts.3.gate_proj.weight": ("BF16", (i, h)),
        },
        "qwen3_5_moe": {
            "model.language_model.layers.0.mlp.experts.gate_up_proj": ("BF16", (e, 2 * i, h)),
            "model.language_model.layers.0.mlp.experts.down_proj": ("BF16", (e, h, i)),
            "model.language_model.layers.0.mlp.shared_expert_gate.weight": ("BF16", (1, h)),
            "model.language_model.layers.0.linear_attn.conv1d.weight": ("BF16", (128, 1, 4)),
            "model.language_model.layers.2.self_attn.q_proj.weight": ("BF16", (2 * d.heads * d.head_dim, h)),
            "lm_head.weight": ("BF16", (d.vocab, h)),
        },
        "gpt_oss": {
            "model.layers.0.mlp.experts.gate_up_proj": ("BF16", (e, h, 2 * i)),
            "model.layers.0.mlp.experts.gate_up_proj_bias": ("BF16", (e, 2 * i)),
            "model.layers.0.mlp.experts.down_proj": ("BF16", (e, i, h)),
            "model.layers.1.mlp.router.bias": ("BF16", (e,)),
            "model.layers.1.self_attn.sinks": ("BF16", (d.heads,)),
        },
    }[family]
    for name, (dtype, shape) in expected.items():
        assert seen[name][1:] == (dtype, shape), name


def test_tokenizer_chat_template_with_tools(tiny):
    from mlx_lm import load
    from transformers import AutoTokenizer

    path = tiny["qwen3_5_moe"]
    tok = AutoTokenizer.from_pretrained(path)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    call = text.split("<tool_call>\n")[-1].split("\n</tool_call>")[0]
    assert json.loads(call) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert "<tool_response>\nsunny\n</tool_response>" in text
    ids = tok.apply_chat_template(messages, tools=tools, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert max(ids) < PRESETS["tiny"].dims.vocab
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"

    model, wrapper = load(str(path))  # mlx-lm's own front door, tokenizer included
    assert wrapper.has_tool_calling and wrapper.tool_call_start == "<tool_call>"
    assert wrapper.tool_parser('{"name": "f", "arguments": {}}') == {"name": "f", "arguments": {}}


@pytest.mark.parametrize("layers", [2, 5])
def test_qwen3_5_layer_counts_keep_a_full_attention_layer(layers, tmp_path):
    # mlx-lm derives the layer kinds from full_attention_interval and needs one of each kind.
    r = synth_checkpoint("qwen3_5_moe", tmp_path / "q", layers=layers)
    text = r.config["text_config"]
    assert len(text["layer_types"]) == layers and "full_attention" in text["layer_types"]
    logits = _load("qwen3_5_moe", r.path)(mx.array([[1, 2, 3]]))
    # finite and not collapsed: mlx-lm turned the zero-centred norm weights into ~1
    assert mx.all(mx.isfinite(logits)).item() and mx.std(logits).item() > 0.1


def test_unknown_family_or_preset_lists_supported(tmp_path):
    with pytest.raises(ValueError) as e:
        synth_checkpoint("llama", tmp_path / "x")
    assert all(f in str(e.value) for f in SUPPORTED_FAMILIES)
    with pytest.raises(ValueError) as e:
        synth_checkpoint("mixtral", tmp_path / "x", preset="huge")
    assert all(p in str(e.value) for p in PRESETS)
    for family in ("gpt_oss", "qwen3_5_moe"):  # mlx-lm needs a layer of each attention kind
        with pytest.raises(ValueError):
            plan_checkpoint(family, layers=1)
    assert not (tmp_path / "x").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    original = synth._write_shard
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the first shard is complete, the second half-written
            path.write_bytes(b"partial")
            raise OSError("disk full")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(synth, "_write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        synth_checkpoint("qwen3_moe", tmp_path / "out")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no `out`, no temporary folder


def test_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("x")
    with pytest.raises(FileExistsError):
        synth_checkpoint("olmoe", out)
    synth_checkpoint("olmoe", out, overwrite=True)
    assert not (out / "stale").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a397b_has_the_real_qwen3_5_shapes():
    plan = plan_checkpoint("qwen3_5_moe", "a397b")
    text = plan.config["text_config"]
    assert (text["hidden_size"], text["num_experts"], text["num_experts_per_tok"]) == (4096, 512, 10)
    assert (text["moe_intermediate_size"], text["shared_expert_intermediate_size"]) == (1024, 1024)
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (32, 2, 256)
    assert (text["linear_num_key_heads"], text["linear_num_value_heads"]) == (16, 64)
    assert text["num_hidden_layers"] == 2 and text["vocab_size"] == 248320
    layer_experts = 512 * 3 * 4096 * 1024 * 2  # 12.9 GB of bf16 per layer
    assert plan.expert_bytes == 2 * layer_experts
    assert plan_checkpoint("qwen3_5_moe", "a397b", layers=4).expert_bytes == 4 * layer_experts
    limit = PRESETS["a397b"].max_shard_bytes
    for shard in plan.shards:  # a shard over the limit holds one tensor that alone exceeds it
        assert sum(t.nbytes for t in shard) <= limit or len(shard) == 1


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_small_and_a397b_plans(family):
    small = plan_checkpoint(family, "small")
    assert 300e6 < small.total_bytes < 1e9 and small.expert_bytes / small.total_bytes > 0.85
    big = plan_checkpoint(family, "a397b")
    assert big.expert_bytes >= 2 * 512 * 3 * 4096 * 1024 * 2 * 0.99  # same experts everywhere


def test_transformers5_config_generation():
    from transformers import AutoConfig

    for family in SUPPORTED_FAMILIES:
        hub = plan_checkpoint(family).config
        new = plan_checkpoint(family, config_generation="transformers5").config
        assert new["model_type"] == hub["model_type"]
        a = AutoConfig.for_model(**hub)
        b = AutoConfig.for_model(**new)
        assert a.to_dict() == b.to_dict(), family
    qwen3 = plan_checkpoint("qwen3_moe", config_generation="transformers5").config
    assert "num_local_experts" in qwen3 and "rope_parameters" in qwen3 and "rope_theta" not in qwen3
