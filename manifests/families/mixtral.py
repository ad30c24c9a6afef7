"""Mixtral (e.g. mistralai/Mixtral-8x7B-v0.1): experts w1 (gate), w3 (up), w2 (down)."""

import re

from .base import Family, per_expert_or_fused, standard_dims

_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    switch_module="model.layers.{layer}.block_sparse_moe.switch_mlp",
    expert_pattern=re.compile(
        r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\."
        r"(\d+\.w[123]\.weight|gate_up_proj|down_proj)"
    ),
    expert_slices=per_expert_or_fused("model.layers.{layer}.block_sparse_moe", _PROJ),
    dims=standard_dims,
    config_aliases={
        "num_local_experts": ("num_experts",),
        "rope_theta": ("rope_parameters.rope_theta",),
    },
)
