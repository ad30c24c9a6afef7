"""DeepSeek-V3 / R1 / Kimi-K2 layout: dense first layers, then routed + shared experts."""

import re

from .base import Family, per_expert_or_fused, standard_dims

_PROJ = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    switch_module="model.layers.{layer}.mlp.switch_mlp",
    # shared_experts are a plain MLP (resident); only numbered experts are routed
    expert_pattern=re.compile(
        r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\."
        r"(\d+\.(gate|up|down)_proj\.weight|gate_up_proj|down_proj)"
    ),
    expert_slices=per_expert_or_fused("model.layers.{layer}.mlp", _PROJ),
    dims=standard_dims,
    config_aliases={
        "n_routed_experts": ("num_local_experts", "num_experts"),
        "rope_theta": ("rope_parameters.rope_theta",),
    },
)
