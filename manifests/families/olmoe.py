"""OLMoE (e.g. allenai/OLMoE-1B-7B-0924): one tensor per expert and projection."""

import re

from .base import Family, per_expert_or_fused, standard_dims

_PROJ = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    switch_module="model.layers.{layer}.mlp.switch_mlp",
    expert_pattern=re.compile(
        r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\."
        r"(\d+\.(gate|up|down)_proj\.weight|gate_up_proj|down_proj)"
    ),
    expert_slices=per_expert_or_fused("model.layers.{layer}.mlp", _PROJ),
    dims=standard_dims,
    config_aliases={
        "num_experts": ("num_local_experts",),
        "rope_theta": ("rope_parameters.rope_theta",),
    },
)
