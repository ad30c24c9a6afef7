"""synth: write Hub-layout MoE checkpoints with random weights, deterministic from a seed.

The folder looks like a Hugging Face repo of the family (config.json as the Hub repo has it,
`model-0000X-of-0000N.safetensors` shards + `model.safetensors.index.json`, tokenizer files,
generation_config.json), so every stage downstream (fetch, profile, quantize, the runtime's
CheckpointStore, mlx-lm itself) is exercised on exactly the layout real checkpoints have,
without downloading anything.

Memory stays bounded for the big presets: every tensor's shape is known up front, so each
shard's safetensors header is written first and the tensor bytes are then generated and written
in small chunks (a few MB), in parallel threads, in a fixed order. Output is a pure function of
(family, preset, layers, seed): every chunk has its own random stream keyed by
(seed, tensor name, chunk index), so thread scheduling cannot change a byte.

Random weights are scaled so that a forward pass stays O(1) in bf16 and, unlike a naive init,
routing is decisive and uneven the way trained routers are (see `_router_row_scales`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from ..common.files import replace_dir, write_json_atomic
from .synth_tokenizer import TokenizerInfo, build_tokenizer, write_tokenizer

SUPPORTED_FAMILIES = ("qwen3_moe", "qwen3_5_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss")
CONFIG_GENERATIONS = ("hub", "transformers5")

CHUNK_ELEMS = 1 << 21  # elements per generated chunk: 4 MB of bf16, small next to any budget
_DTYPE_BYTES = {"BF16": 2, "F32": 4}
# safetensors writes tensors sorted by dtype (larger enum value first) then name; we do too,
# so that expert order inside a shard is the lexicographic order real checkpoints have.
_DTYPE_RANK = {"F32": 0, "BF16": 1}


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Dims:
    """Every shape knob of a synthetic model; each family reads the ones it has."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    moe_intermediate: int
    dense_intermediate: int  # dense MLP layers (deepseek_v3 first_k_dense) / intermediate_size
    shared_intermediate: int  # qwen3_5_moe shared expert (deepseek: moe_intermediate * n_shared)
    vocab: int
    max_position: int = 4096
    # qwen3_5_moe gated delta net (linear attention)
    linear_key_heads: int = 2
    linear_value_heads: int = 4
    linear_key_dim: int = 16
    linear_value_dim: int = 16
    conv_kernel: int = 4
    # deepseek_v3 multi-head latent attention and grouped routing
    q_lora_rank: int = 64
    kv_lora_rank: int = 64
    qk_rope_dim: int = 16
    qk_nope_dim: int = 32
    v_head_dim: int = 32
    n_group: int = 4
    topk_group: int = 2
    first_k_dense: int = 1
    n_shared_experts: int = 1
    # gpt_oss
    sliding_window: int = 128
    # routing init (see _router_row_scales)
    router_logit_std: float = 3.0
    popularity_spread: float = 0.3
    hot_experts: int = 2
    hot_boost: float = 1.8


@dataclass(frozen=True)
class Preset:
    """A named size: base dims, per-family adjustments, and the shard size limit."""

    name: str
    dims: Dims
    family_dims: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_shard_bytes: int = 2 * 10**9

    def dims_for(self, family: str, layers: int | None = None) -> Dims:
        d = replace(self.dims, **self.family_dims.get(family, {}))
        return replace(d, layers=layers) if layers is not None else d


PRESETS: dict[str, Preset] = {
    # Tests: ~1.5 MB, one layer per shard (so multi-shard reading is exercised), loads and
    # runs in mlx-lm on CPU in milliseconds. Every expert matmul input dim is 64 (group size 64).
    "tiny": Preset(
        name="tiny",
        dims=Dims(
            layers=3,
            hidden=64,
            heads=4,
            kv_heads=2,
            head_dim=16,
            experts=16,
            top_k=4,
            moe_intermediate=64,
            dense_intermediate=128,
            shared_intermediate=64,
            vocab=320,
            sliding_window=32,
            popularity_spread=0.5,
            hot_experts=2,
            hot_boost=2.0,
        ),
        family_dims={"olmoe": {"kv_heads": 4}, "deepseek_v3": {"kv_heads": 4}},
        max_shard_bytes=640 * 1024,
    ),
    # Benchmarks on small machines: ~650 MB, >90% of it routed experts (1.5 MB each in bf16).
    "small": Preset(
        name="small",
        dims=Dims(
            layers=6,
            hidden=1024,
            heads=16,
            kv_heads=4,
            head_dim=64,
            experts=64,
            top_k=8,
            moe_intermediate=256,
            dense_intermediate=2048,
            shared_intermediate=256,
            vocab=320,
            linear_key_heads=4,
            linear_value_heads=8,
            linear_key_dim=128,
            linear_value_dim=128,
            q_lora_rank=256,
            kv_lora_rank=128,
            qk_rope_dim=32,
            qk_nope_dim=64,
            v_head_dim=64,
            n_group=8,
            topk_group=4,
            popularity_spread=0.35,
            hot_experts=4,
            hot_boost=1.8,
        ),
        family_dims={"olmoe": {"kv_heads": 16}, "deepseek_v3": {"kv_heads": 16}},
        max_shard_bytes=256 * 10**6,  # ~2 layers per shard, so readers see several shards
    ),
    # The real per-layer shapes of Qwen3.5-397B-A17B (a layer's experts are 12.9 GB of bf16);
    # other families keep the same experts, hidden size, top-k and vocabulary, with attention of
    # their own kind at that hidden size (the nearest equivalent the family can express).
    "a397b": Preset(
        name="a397b",
        dims=Dims(
            layers=2,
            hidden=4096,
            heads=32,
            kv_heads=2,
            head_dim=256,
            experts=512,
            top_k=10,
            moe_intermediate=1024,
            dense_intermediate=12288,
            shared_intermediate=1024,
            vocab=248320,
            max_position=262144,
            linear_key_heads=16,
            linear_value_heads=64,
            linear_key_dim=128,
            linear_value_dim=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_rope_dim=64,
            qk_nope_dim=128,
            v_head_dim=128,
            n_group=8,
            topk_group=4,
            first_k_dense=0,
            popularity_spread=0.2,
            hot_experts=16,
            hot_boost=1.5,
        ),
        family_dims={
            "qwen3_moe": {"heads": 64, "kv_heads": 4, "head_dim": 128},  # Qwen3-235B attention
            "mixtral": {"kv_heads": 8, "head_dim": 128},
            "olmoe": {"kv_heads": 32, "head_dim": 128},
            "deepseek_v3": {"kv_heads": 32},
            "gpt_oss": {"heads": 64, "kv_heads": 8, "head_dim": 64},
        },
    ),
}


# ----------------------------------------------------------------------------- tensor plan


@dataclass(frozen=True)
class Init:
    """How a tensor's values are drawn. `row_scale` multiplies the std of each leading row."""

    kind: str  # "normal" | "const" | "log_uniform"
    std: float = 0.0
    value: float = 0.0
    low: float = 1.0
    high: float = 16.0
    row_scale: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    init: Init
    unit: int  # sharding unit: -1 embeddings, l for layer l, `layers` for the final norm/head
    expert: bool = False  # a routed expert's weight (what the runtime streams)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES[self.dtype]


class _Plan:
    """Collects TensorSpecs; knows the init scales so the family functions stay declarative."""

    def __init__(self, d: Dims, seed: int):
        self.d = d
        self.seed = seed
        self.unit = -1
        self.specs: list[TensorSpec] = []
        # Residual-branch outputs are scaled by 1/sqrt(2L) (GPT-2 style) so the residual stream
        # stays O(1) however many layers are stacked.
        self.resid = 1.0 / math.sqrt(2 * d.layers)

    def add(self, name, shape, init, *, dtype="BF16", expert=False) -> None:
        self.specs.append(TensorSpec(name, tuple(shape), dtype, init, self.unit, expert))

    def normal(self, name, shape, std, **kw) -> None:
        self.add(name, shape, Init("normal", std=std), **kw)

    def const(self, name, shape, value, **kw) -> None:
        self.add(name, shape, Init("const", value=value), **kw)

    def linear(self, name, out_f, in_f, *, resid=False, expert=False, bias=False) -> None:
        """A torch Linear weight [out, in]: std 1/sqrt(in) keeps activations O(1)."""
        std = (self.resid if resid else 1.0) / math.sqrt(in_f)
        self.normal(f"{name}.weight", (out_f, in_f), std, expert=expert)
        if bias:
            self.normal(f"{name}.bias", (out_f,), 0.02)

    def router(self, name, layer, *, bias=False) -> None:
        d = self.d
        scales = _router_row_scales(self.seed, layer, d)
        init = Init("normal", std=d.router_logit_std / math.sqrt(d.hidden), row_scale=scales)
        self.add(f"{name}.weight", (d.experts, d.hidden), init)
        if bias:
            self.normal(f"{name}.bias", (d.experts,), 0.1)


def _router_row_scales(seed: int, layer: int, d: Dims) -> tuple[float, ...]:
    """Per-expert multipliers of the router rows' std: what makes routing like a trained one.

    The router input is RMS-normalised, so a row with std s/sqrt(H) gives logits ~ N(0, s^2).
    With the base std (router_logit_std ~ 3) the top-k logits stand well clear of the rest and
    carry most of the softmax mass (decisive routing; a 0.02-std init would be near-uniform).
    Rows with a larger multiplier win the top-k more often, so spreading the multipliers
    (log-normal, plus a few boosted "hot" experts per layer, chosen per layer) gives the
    skewed expert popularity real models show, which caching and layout depend on.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x524F55, layer])))
    scales = np.exp(d.popularity_spread * rng.standard_normal(d.experts))
    hot = rng.choice(d.experts, size=min(d.hot_experts, d.experts), replace=False)
    scales[hot] *= d.hot_boost
    return tuple(float(s) for s in scales)


def _gqa_attention(
    p: _Plan, pre: str, *, qk_norm: str | None, norm_value: float = 1.0, out_gate: bool = False, bias: bool = False
) -> None:
    d = p.d
    q_out = d.heads * d.head_dim * (2 if out_gate else 1)  # qwen3_5: query and output gate
    p.linear(f"{pre}.q_proj", q_out, d.hidden, bias=bias)
    p.linear(f"{pre}.k_proj", d.kv_heads * d.head_dim, d.hidden, bias=bias)
    p.linear(f"{pre}.v_proj", d.kv_heads * d.head_dim, d.hidden, bias=bias)
    p.linear(f"{pre}.o_proj", d.hidden, d.heads * d.head_dim, resid=True, bias=bias)
    if qk_norm == "head":  # qwen3: per-head RMSNorm over head_dim
        p.const(f"{pre}.q_norm.weight", (d.head_dim,), norm_value)
        p.const(f"{pre}.k_norm.weight", (d.head_dim,), norm_value)
    elif qk_norm == "full":  # olmoe: RMSNorm over all heads together
        p.const(f"{pre}.q_norm.weight", (d.heads * d.head_dim,), norm_value)
        p.const(f"{pre}.k_norm.weight", (d.kv_heads * d.head_dim,), norm_value)


def _mla_attention(p: _Plan, pre: str) -> None:
    d = p.d
    p.linear(f"{pre}.q_a_proj", d.q_lora_rank, d.hidden)
    p.const(f"{pre}.q_a_layernorm.weight", (d.q_lora_rank,), 1.0)
    p.linear(f"{pre}.q_b_proj", d.heads * (d.qk_nope_dim + d.qk_rope_dim), d.q_lora_rank)
    p.linear(f"{pre}.kv_a_proj_with_mqa", d.kv_lora_rank + d.qk_rope_dim, d.hidden)
    p.const(f"{pre}.kv_a_layernorm.weight", (d.kv_lora_rank,), 1.0)
    p.linear(f"{pre}.kv_b_proj", d.heads * (d.qk_nope_dim + d.v_head_dim), d.kv_lora_rank)
    p.linear(f"{pre}.o_proj", d.hidden, d.heads * d.v_head_dim, resid=True)


def _gated_delta_net(p: _Plan, pre: str) -> None:
    d = p.d
    key_dim = d.linear_key_heads * d.linear_key_dim
    value_dim = d.linear_value_heads * d.linear_value_dim
    conv_dim = 2 * key_dim + value_dim
    p.linear(f"{pre}.in_proj_qkv", conv_dim, d.hidden)
    p.linear(f"{pre}.in_proj_z", value_dim, d.hidden)
    p.linear(f"{pre}.in_proj_b", d.linear_value_heads, d.hidden)
    p.linear(f"{pre}.in_proj_a", d.linear_value_heads, d.hidden)
    # HF conv layout [C, 1, K]; mlx-lm's sanitize recognises it (last dim != 1) and moves the axis.
    p.normal(f"{pre}.conv1d.weight", (conv_dim, 1, d.conv_kernel), 1.0 / math.sqrt(d.conv_kernel))
    p.const(f"{pre}.dt_bias", (d.linear_value_heads,), 1.0)
    # A = exp(A_log) in [1, 16] as transformers initialises it; kept in float32 like the
    # SSM state parameters of the Hub checkpoints (mlx-lm never casts A_log).
    p.add(f"{pre}.A_log", (d.linear_value_heads,), Init("log_uniform", low=1.0, high=16.0), dtype="F32")
    p.const(f"{pre}.norm.weight", (d.linear_value_dim,), 1.0)  # gated norm: plain weight
    p.linear(f"{pre}.out_proj", d.hidden, value_dim, resid=True)


def _glu_mlp(p: _Plan, pre: str, inter: int, names=("gate_proj", "up_proj", "down_proj"), expert: bool = False) -> None:
    gate, up, down = names
    p.linear(f"{pre}.{gate}", inter, p.d.hidden, expert=expert)
    p.linear(f"{pre}.{up}", inter, p.d.hidden, expert=expert)
    p.linear(f"{pre}.{down}", p.d.hidden, inter, resid=True, expert=expert)


def _per_expert(p: _Plan, pre: str, names=("gate_proj", "up_proj", "down_proj")) -> None:
    for e in range(p.d.experts):
        _glu_mlp(p, f"{pre}.experts.{e}", p.d.moe_intermediate, names, expert=True)


def _layers(p: _Plan, prefix: str, body, norm_value: float = 1.0) -> None:
    """embed, `body(layer)` for each layer, final norm and lm_head (never tied on the Hub)."""
    d = p.d
    p.unit = -1
    p.normal(f"{prefix}.embed_tokens.weight", (d.vocab, d.hidden), 1.0)
    for layer in range(d.layers):
        p.unit = layer
        body(layer)
    p.unit = d.layers
    p.const(f"{prefix}.norm.weight", (d.hidden,), norm_value)
    p.linear("lm_head", d.vocab, d.hidden)


def _norms(p: _Plan, pre: str, value: float = 1.0) -> None:
    p.const(f"{pre}.input_layernorm.weight", (p.d.hidden,), value)
    p.const(f"{pre}.post_attention_layernorm.weight", (p.d.hidden,), value)


def _plan_qwen3_moe(p: _Plan) -> None:
    def layer(n):
        pre = f"model.layers.{n}"
        _norms(p, pre)
        _gqa_attention(p, f"{pre}.self_attn", qk_norm="head")
        p.router(f"{pre}.mlp.gate", n)
        _per_expert(p, f"{pre}.mlp")

    _layers(p, "model", layer)


def _plan_mixtral(p: _Plan) -> None:
    def layer(n):
        pre = f"model.layers.{n}"
        _norms(p, pre)
        _gqa_attention(p, f"{pre}.self_attn", qk_norm=None)
        p.router(f"{pre}.block_sparse_moe.gate", n)
        _per_expert(p, f"{pre}.block_sparse_moe", names=("w1", "w3", "w2"))

    _layers(p, "model", layer)


def _plan_olmoe(p: _Plan) -> None:
    def layer(n):
        pre = f"model.layers.{n}"
        _norms(p, pre)
        _gqa_attention(p, f"{pre}.self_attn", qk_norm="full")
        p.router(f"{pre}.mlp.gate", n)
        _per_expert(p, f"{pre}.mlp")

    _layers(p, "model", layer)


def _plan_deepseek_v3(p: _Plan) -> None:
    d = p.d

    def layer(n):
        pre = f"model.layers.{n}"
        _norms(p, pre)
        _mla_attention(p, f"{pre}.self_attn")
        if n < d.first_k_dense:
            _glu_mlp(p, f"{pre}.mlp", d.dense_intermediate)
            return
        p.router(f"{pre}.mlp.gate", n)
        # The selection-only bias is float32 on the Hub (mlx-lm never casts it).
        p.add(f"{pre}.mlp.gate.e_score_correction_bias", (d.experts,), Init("normal", std=0.01), dtype="F32")
        _per_expert(p, f"{pre}.mlp")
        _glu_mlp(p, f"{pre}.mlp.shared_experts", d.moe_intermediate * d.n_shared_experts)

    _layers(p, "model", layer)


def _plan_qwen3_5_moe(p: _Plan) -> None:
    d = p.d
    interval = _full_attention_interval(d)

    def layer(n):
        pre = f"model.language_model.layers.{n}"
        _norms(p, pre, 0.0)  # Qwen3.5 RMSNorm computes x * (1 + w): zero means identity
        if (n + 1) % interval:
            _gated_delta_net(p, f"{pre}.linear_attn")
        else:
            _gqa_attention(p, f"{pre}.self_attn", qk_norm="head", norm_value=0.0, out_gate=True)
        p.router(f"{pre}.mlp.gate", n)
        # Experts fused per layer, as published: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
        i, h = d.moe_intermediate, d.hidden
        p.normal(f"{pre}.mlp.experts.gate_up_proj", (d.experts, 2 * i, h), 1 / math.sqrt(h), expert=True)
        p.normal(f"{pre}.mlp.experts.down_proj", (d.experts, h, i), p.resid / math.sqrt(i), expert=True)
        _glu_mlp(p, f"{pre}.mlp.shared_expert", d.shared_intermediate)
        p.linear(f"{pre}.mlp.shared_expert_gate", 1, h)

    _layers(p, "model.language_model", layer, norm_value=0.0)


def _plan_gpt_oss(p: _Plan) -> None:
    d = p.d

    def layer(n):
        pre = f"model.layers.{n}"
        _norms(p, pre)
        _gqa_attention(p, f"{pre}.self_attn", qk_norm=None, bias=True)
        p.normal(f"{pre}.self_attn.sinks", (d.heads,), 1.0)
        p.router(f"{pre}.mlp.router", n, bias=True)
        # transformers' bf16 layout (in x out): gate_up [E, H, 2I] with gate/up interleaved on
        # the last axis (gate = [..., ::2], up = [..., 1::2]); down [E, I, H].
        i, h, e = d.moe_intermediate, d.hidden, d.experts
        p.normal(f"{pre}.mlp.experts.gate_up_proj", (e, h, 2 * i), 1 / math.sqrt(h), expert=True)
        p.normal(f"{pre}.mlp.experts.gate_up_proj_bias", (e, 2 * i), 0.02, expert=True)
        p.normal(f"{pre}.mlp.experts.down_proj", (e, i, h), p.resid / math.sqrt(i), expert=True)
        p.normal(f"{pre}.mlp.experts.down_proj_bias", (e, h), 0.02, expert=True)

    _layers(p, "model", layer)


_PLANS = {
    "qwen3_moe": _plan_qwen3_moe,
    "qwen3_5_moe": _plan_qwen3_5_moe,
    "mixtral": _plan_mixtral,
    "olmoe": _plan_olmoe,
    "deepseek_v3": _plan_deepseek_v3,
    "gpt_oss": _plan_gpt_oss,
}


# ----------------------------------------------------------------------------- configs


def _full_attention_interval(d: Dims) -> int:
    # mlx-lm derives layer kinds from the interval alone and needs at least one full-attention
    # layer, so short models (a397b's default 2 layers) use a shorter interval than the real 4.
    return min(4, d.layers)


def _common(d: Dims, tok: TokenizerInfo) -> dict:
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "num_hidden_layers": d.layers,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": d.vocab,
    }


def _config_qwen3_moe(d: Dims, tok: TokenizerInfo) -> dict:
    return _common(d, tok) | {  # as Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "head_dim": d.head_dim,
        "intermediate_size": d.dense_intermediate,
        "max_position_embeddings": d.max_position,
        "max_window_layers": d.layers,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": d.moe_intermediate,
        "norm_topk_prob": True,
        "num_attention_heads": d.heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "num_key_value_heads": d.kv_heads,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "transformers_version": "4.51.0",
        "use_sliding_window": False,
    }


def _config_mixtral(d: Dims, tok: TokenizerInfo) -> dict:
    return _common(d, tok) | {  # as mistralai/Mixtral-8x7B-Instruct-v0.1 (head_dim = H / heads)
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "intermediate_size": d.moe_intermediate,
        "max_position_embeddings": d.max_position,
        "model_type": "mixtral",
        "num_attention_heads": d.heads,
        "num_experts_per_tok": d.top_k,
        "num_key_value_heads": d.kv_heads,
        "num_local_experts": d.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "transformers_version": "4.36.0",
    }


def _config_olmoe(d: Dims, tok: TokenizerInfo) -> dict:
    return _common(d, tok) | {  # as allenai/OLMoE-1B-7B-0924 (intermediate_size = expert size)
        "architectures": ["OlmoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "intermediate_size": d.moe_intermediate,
        "max_position_embeddings": d.max_position,
        "model_type": "olmoe",
        "norm_topk_prob": False,
        "num_attention_heads": d.heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "num_key_value_heads": d.kv_heads,
        "output_router_logits": False,
        "pad_token_id": tok.pad_token_id,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01,
        "transformers_version": "4.43.0",
    }


def _config_deepseek_v3(d: Dims, tok: TokenizerInfo) -> dict:
    # As deepseek-ai/DeepSeek-V3 minus its fp8 quantization_config (we write bf16), its
    # auto_map (transformers has the class) and the MTP layer (num_nextn_predict_layers: 0).
    return _common(d, tok) | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "ep_size": 1,
        "first_k_dense_replace": d.first_k_dense,
        "intermediate_size": d.dense_intermediate,
        "kv_lora_rank": d.kv_lora_rank,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": d.moe_intermediate,
        "moe_layer_freq": 1,
        "n_group": d.n_group,
        "n_routed_experts": d.experts,
        "n_shared_experts": d.n_shared_experts,
        "norm_topk_prob": True,
        "num_attention_heads": d.heads,
        "num_experts_per_tok": d.top_k,
        "num_key_value_heads": d.kv_heads,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": d.q_lora_rank,
        "qk_nope_head_dim": d.qk_nope_dim,
        "qk_rope_head_dim": d.qk_rope_dim,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "topk_group": d.topk_group,
        "topk_method": "noaux_tc",
        "transformers_version": "4.33.1",
        "v_head_dim": d.v_head_dim,
    }


def _config_gpt_oss(d: Dims, tok: TokenizerInfo) -> dict:
    # As openai/gpt-oss-20b minus its mxfp4 quantization_config (we write bf16).
    kinds = ["sliding_attention", "full_attention"]
    return _common(d, tok) | {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "experts_per_token": d.top_k,
        "head_dim": d.head_dim,
        "initial_context_length": 4096,
        "intermediate_size": d.moe_intermediate,
        "layer_types": [kinds[i % 2] for i in range(d.layers)],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": d.heads,
        "num_experts_per_tok": d.top_k,
        "num_key_value_heads": d.kv_heads,
        "num_local_experts": d.experts,
        "output_router_logits": False,
        "pad_token_id": tok.pad_token_id,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": d.sliding_window,
        "swiglu_limit": 7.0,
        "transformers_version": "4.55.0",
    }


def _config_qwen3_5_moe(d: Dims, tok: TokenizerInfo) -> dict:
    # As Qwen/Qwen3.5-397B-A17B: text model under text_config, plus the vision_config keys
    # (the vision tower's weights are not written: mlx-lm drops them) and no MTP weights.
    interval = _full_attention_interval(d)
    rotary_pairs = int(d.head_dim * 0.25) // 2
    t, h = round(rotary_pairs * 11 / 32), round(rotary_pairs * 11 / 32)
    text = _common(d, tok) | {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "full_attention_interval": interval,
        "head_dim": d.head_dim,
        "layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(d.layers)],
        "linear_conv_kernel_dim": d.conv_kernel,
        "linear_key_head_dim": d.linear_key_dim,
        "linear_num_key_heads": d.linear_key_heads,
        "linear_num_value_heads": d.linear_value_heads,
        "linear_value_head_dim": d.linear_value_dim,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": d.max_position,
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": d.moe_intermediate,
        "mtp_num_hidden_layers": 0,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": d.heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": [t, h, rotary_pairs - t - h],
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": d.shared_intermediate,
    }
    del text["torch_dtype"]
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "image_token_id": tok.image_token_id,
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": tok.video_token_id,
        "vision_config": {
            "deepstack_visual_indexes": [],
            "depth": 27,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 4304,
            "model_type": "qwen3_5_moe",
            "num_heads": 16,
            "num_position_embeddings": 2304,
            "out_hidden_size": d.hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": tok.vision_end_token_id,
        "vision_start_token_id": tok.vision_start_token_id,
    }


_CONFIGS = {
    "qwen3_moe": _config_qwen3_moe,
    "qwen3_5_moe": _config_qwen3_5_moe,
    "mixtral": _config_mixtral,
    "olmoe": _config_olmoe,
    "deepseek_v3": _config_deepseek_v3,
    "gpt_oss": _config_gpt_oss,
}


def _transformers5_config(hub: dict) -> dict:
    """What transformers 5 `save_pretrained` writes for the same model (num_local_experts,
    rope_parameters, dtype ...). Note: mlx-lm 0.32.2 reads only the Hub generation for some
    families (qwen3_moe needs `num_experts` and `rope_theta`)."""
    from transformers import AutoConfig  # heavy import, only for this option

    kwargs = dict(hub)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs).to_diff_dict()


def _generation_config(tok: TokenizerInfo) -> dict:
    return {
        "bos_token_id": tok.bos_token_id,
        "do_sample": True,
        "eos_token_id": [tok.eos_token_id, tok.pad_token_id],
        "pad_token_id": tok.pad_token_id,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class SynthPlan:
    """Everything about a checkpoint that is known before writing a byte."""

    family: str
    preset: str
    seed: int
    dims: Dims
    config: dict
    tensors: tuple[TensorSpec, ...]
    shards: tuple[tuple[TensorSpec, ...], ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.expert)


@dataclass(frozen=True)
class SynthResult:
    path: Path
    family: str
    config: dict
    total_bytes: int  # all tensor bytes (the index's metadata.total_size)
    expert_bytes: int  # routed-expert tensor bytes (what the runtime streams)


def _check_choice(kind: str, value: str, supported: Sequence[str]) -> None:
    if value not in supported:
        raise ValueError(f"unknown {kind} {value!r}; supported: {', '.join(supported)}")


def _check_layers(family: str, d: Dims) -> None:
    if d.layers < 1:
        raise ValueError(f"layers must be >= 1, got {d.layers}")
    if family == "gpt_oss" and d.layers < 2:
        raise ValueError("gpt_oss needs >= 2 layers (one sliding and one full attention layer)")
    if family == "qwen3_5_moe" and d.layers < 2:
        # mlx-lm needs a layer of each kind, and it recognises the HF checkpoint layout (and so
        # adds 1 to the zero-centred norm weights) only by a linear-attention conv1d weight.
        raise ValueError("qwen3_5_moe needs >= 2 layers (one linear and one full attention layer)")


def plan_checkpoint(
    family: str, preset: str = "tiny", seed: int = 0, layers: int | None = None, config_generation: str = "hub"
) -> SynthPlan:
    """The config, tensor list and shard split of a synthetic checkpoint, without writing."""
    _check_choice("family", family, SUPPORTED_FAMILIES)
    _check_choice("preset", preset, tuple(PRESETS))
    _check_choice("config_generation", config_generation, CONFIG_GENERATIONS)
    spec = PRESETS[preset]
    d = spec.dims_for(family, layers)
    _check_layers(family, d)
    if family == "deepseek_v3":
        d = replace(d, first_k_dense=min(d.first_k_dense, d.layers - 1))
    tok = TokenizerInfo.from_tokenizer(build_tokenizer())
    config = _CONFIGS[family](d, tok)
    if config_generation == "transformers5":
        config = _transformers5_config(config)
    p = _Plan(d, seed)
    _PLANS[family](p)
    tensors = tuple(p.specs)
    return SynthPlan(family, preset, seed, d, config, tensors, _assign_shards(tensors, spec.max_shard_bytes))


def _assign_shards(specs: Sequence[TensorSpec], limit: int) -> tuple[tuple[TensorSpec, ...], ...]:
    """Whole layers per shard while they fit under `limit`; a layer bigger than the limit is
    split at tensor boundaries (a single tensor bigger than the limit gets a shard of its own)."""
    units: dict[int, list[TensorSpec]] = {}
    for t in specs:
        units.setdefault(t.unit, []).append(t)
    shards: list[list[TensorSpec]] = []
    cur: list[TensorSpec] = []
    cur_bytes = 0
    for unit in units.values():
        unit_bytes = sum(t.nbytes for t in unit)
        pieces = [unit] if unit_bytes <= limit else [[t] for t in unit]
        for piece in pieces:
            piece_bytes = sum(t.nbytes for t in piece)
            if cur and cur_bytes + piece_bytes > limit:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.extend(piece)
            cur_bytes += piece_bytes
    if cur:
        shards.append(cur)
    return tuple(tuple(sorted(s, key=lambda t: (_DTYPE_RANK[t.dtype], t.name))) for s in shards)


# ----------------------------------------------------------------------------- values


@lru_cache(maxsize=1)
def _unit_normal_quantiles() -> np.ndarray:
    """65536 equiprobable quantiles of N(0, 1) (midpoints, so the table has mean 0, std ~1)."""
    inv = NormalDist().inv_cdf
    return np.array([inv((i + 0.5) / 65536) for i in range(65536)])


@lru_cache(maxsize=64)
def _bf16_normal_table(std: float) -> np.ndarray:
    return _to_bf16_bits(_unit_normal_quantiles().astype(np.float32) * np.float32(std))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even like torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((u + rounding) >> np.uint32(16)).astype(np.uint16)


def _chunk_rng(seed: int, name: str, index: int) -> np.random.Generator:
    key = zlib.crc32(name.encode())
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key, index])))


def _chunk_values(t: TensorSpec, seed: int, index: int) -> bytes:
    """Bytes of elements [index*CHUNK, (index+1)*CHUNK) of tensor `t` in row-major order."""
    start = index * CHUNK_ELEMS
    n = min(CHUNK_ELEMS, t.numel - start)
    init = t.init
    if init.kind == "const":
        values = np.full(n, init.value, dtype=np.float32)
    else:
        rng = _chunk_rng(seed, t.name, index)
        if init.kind == "normal" and init.row_scale is None and t.dtype == "BF16":
            # The bulk (experts): a bf16 value is drawn from a table of 65536 equiprobable
            # Gaussian quantiles. bf16 keeps 8 significant bits, so this matches sampling N(0,
            # std) and rounding, at ~4x the speed of numpy's Gaussian sampler.
            idx = rng.integers(0, 65536, size=n, dtype=np.uint16)
            return np.take(_bf16_normal_table(init.std), idx).tobytes()
        if init.kind == "normal":
            values = rng.standard_normal(n, dtype=np.float32) * np.float32(init.std)
            if init.row_scale is not None:
                row_elems = t.numel // t.shape[0]
                rows = np.arange(start, start + n) // row_elems
                values *= np.asarray(init.row_scale, dtype=np.float32)[rows]
        elif init.kind == "log_uniform":
            values = np.log(rng.uniform(init.low, init.high, size=n)).astype(np.float32)
        else:
            raise ValueError(f"unknown init kind {init.kind!r}")
    if t.dtype == "BF16":
        return _to_bf16_bits(values).tobytes()
    return values.astype("<f4").tobytes()


# ----------------------------------------------------------------------------- writing


def _header_bytes(tensors: Sequence[TensorSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _chunk_jobs(tensors: Sequence[TensorSpec]) -> Iterator[tuple[TensorSpec, int]]:
    for t in tensors:
        for index in range(math.ceil(t.numel / CHUNK_ELEMS)):
            yield t, index


def _write_shard(path: Path, tensors: Sequence[TensorSpec], seed: int, pool: ThreadPoolExecutor, window: int) -> None:
    """Header first, then every chunk in order; at most `window` chunks are in memory."""
    expected = sum(t.nbytes for t in tensors)
    written = 0
    pending: deque[Future] = deque()
    with open(path, "wb") as f:
        f.write(_header_bytes(tensors))
        for t, index in _chunk_jobs(tensors):
            pending.append(pool.submit(_chunk_values, t, seed, index))
            if len(pending) >= window:
                written += f.write(pending.popleft().result())
        while pending:
            written += f.write(pending.popleft().result())
        f.flush()
        os.fsync(f.fileno())
    if written != expected:
        raise RuntimeError(f"{path.name}: wrote {written} tensor bytes, header says {expected}")


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_checkpoint(plan: SynthPlan, folder: Path, workers: int) -> None:
    tok = write_tokenizer(folder)
    write_json_atomic(folder / "config.json", plan.config, ensure_ascii=False)
    write_json_atomic(folder / "generation_config.json", _generation_config(tok), ensure_ascii=False)
    n = len(plan.shards)
    weight_map = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, shard in enumerate(plan.shards):
            name = _shard_name(i, n)
            _write_shard(folder / name, shard, plan.seed, pool, window=2 * workers)
            weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(folder / "model.safetensors.index.json", index, ensure_ascii=False)


def synth_checkpoint(
    family: str,
    out: Path,
    preset: str = "tiny",
    seed: int = 0,
    layers: int | None = None,
    *,
    config_generation: str = "hub",
    overwrite: bool = False,
    workers: int | None = None,
) -> SynthResult:
    """Write a synthetic `family` checkpoint of size `preset` to `out`, atomically.

    Everything is written (and fsynced) into a hidden temporary folder next to `out`, renamed
    to `out` only once complete: an error removes the temporary folder and leaves no `out`; a
    killed process can leave a `.{name}.synth-*` folder behind, never a partial `out`.
    `out` must not exist unless `overwrite` is set. Returns sizes in tensor bytes.
    """
    plan = plan_checkpoint(family, preset, seed, layers, config_generation)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=out.parent))
    try:
        _write_checkpoint(plan, tmp, workers or min(8, os.cpu_count() or 1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint folder is normally shared
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthResult(out, family, plan.config, plan.total_bytes, plan.expert_bytes)
