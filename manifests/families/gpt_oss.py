"""gpt-oss (openai/gpt-oss-20b/120b) in the transformers bf16 layout: `experts.gate_up_proj`
[E, H, 2I] used as x @ W with gate and up interleaved on the last axis (gate = ::2, up = 1::2),
`gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H], `down_proj_bias` [E, H].

mlx-lm's own sanitize expects the out x in orientation of the mxfp4 checkpoint ([E, 2I, H]);
we accept both, telling them apart by shape. The mxfp4 layout (`*_blocks`/`*_scales`) is
refused with a clear error for now.
"""

import re

from ..safetensors_index import CheckpointError
from .base import ExpertSlice, Family, ModelDims, first_key, require


def _dims(config: dict) -> ModelDims:
    return ModelDims(
        num_layers=int(config["num_hidden_layers"]),
        num_experts=int(first_key(config, "num_local_experts", "num_experts")),
        experts_per_token=int(first_key(config, "num_experts_per_tok", "experts_per_token")),
        hidden_size=int(config["hidden_size"]),
        expert_intermediate_size=int(first_key(config, "intermediate_size")),
    )


def _slices(dims, tensors, layer, expert):
    base = f"model.layers.{layer}.mlp.experts"
    if f"{base}.gate_up_proj_blocks" in tensors:
        raise CheckpointError(
            f"{base}.gate_up_proj_blocks: the mxfp4 gpt-oss layout is not supported yet; "
            "use a bf16 checkpoint of the model"
        )
    gate_up = require(tensors, f"{base}.gate_up_proj")
    # transformers layout [E, H, 2I] (x @ W); mlx-lm/mxfp4 orientation [E, 2I, H] (W @ x)
    x_at_w = gate_up.shape[1] == dims.hidden_size
    axis = 1 if x_at_w else 0
    return {
        "gate_proj.weight": ExpertSlice(gate_up.name, expert, axis=axis, start=0, step=2, transpose=x_at_w),
        "up_proj.weight": ExpertSlice(gate_up.name, expert, axis=axis, start=1, step=2, transpose=x_at_w),
        "down_proj.weight": ExpertSlice(f"{base}.down_proj", expert, transpose=x_at_w),
        "gate_proj.bias": ExpertSlice(f"{base}.gate_up_proj_bias", expert, start=0, step=2),
        "up_proj.bias": ExpertSlice(f"{base}.gate_up_proj_bias", expert, start=1, step=2),
        "down_proj.bias": ExpertSlice(f"{base}.down_proj_bias", expert),
    }


FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    switch_module="model.layers.{layer}.mlp.experts",
    expert_pattern=re.compile(
        r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\."
        r"(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias|gate_up_proj_blocks|"
        r"gate_up_proj_scales|down_proj_blocks|down_proj_scales)"
    ),
    expert_slices=_slices,
    dims=_dims,
    config_aliases={
        "num_local_experts": ("num_experts",),
        "rope_theta": ("rope_parameters.rope_theta",),
    },
)
