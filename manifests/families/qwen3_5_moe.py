"""Qwen3.5-MoE (e.g. Qwen/Qwen3.5-397B-A17B) as published on the Hub: a vision-language
checkpoint whose text model sits under `model.language_model`, experts fused per layer as
`experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I]."""

import re

from .base import Family, fused_gate_up, standard_dims


def _dims(config: dict):
    return standard_dims(config.get("text_config", config))


def _slices(dims, tensors, layer, expert):
    base = f"model.language_model.layers.{layer}.mlp.experts"
    return fused_gate_up(f"{base}.gate_up_proj", f"{base}.down_proj", dims, expert)


FAMILY = Family(
    name="qwen3_5_moe",
    model_types=("qwen3_5_moe",),
    switch_module="language_model.model.layers.{layer}.mlp.switch_mlp",
    expert_pattern=re.compile(
        r"model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"
    ),
    expert_slices=_slices,
    dims=_dims,
    config_aliases={
        "num_experts": ("num_local_experts",),
        "rope_theta": ("rope_parameters.rope_theta",),
    },
)
