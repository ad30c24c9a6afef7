"""What a family table is: how a source checkpoint's expert tensors map to MLX expert tensors.

A table knows, for one model family, which checkpoint tensors hold routed experts and how to
cut one expert's MLX tensors (`gate_proj.weight` [I, H], `up_proj.weight` [I, H],
`down_proj.weight` [H, I], and `*.bias` where the family has expert biases) out of them, in
exactly the orientation mlx-lm's `sanitize` gives `switch_mlp.<proj>.weight[e]`. Everything
that is not an expert tensor is resident and goes through mlx-lm's own `sanitize`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..safetensors_index import CheckpointError, TensorInfo


@dataclass(frozen=True)
class ExpertSlice:
    """One MLX expert tensor, cut from one checkpoint tensor.

    `expert` selects a row of a stacked [E, ...] tensor (None: the tensor is this expert's own).
    Then a strided range along `axis` of what remains (`start:stop:step`), then an optional
    swap of the last two axes (checkpoints that store x @ W instead of W @ x).
    """

    tensor: str
    expert: int | None = None
    axis: int = 0
    start: int = 0
    stop: int | None = None
    step: int = 1
    transpose: bool = False


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a model that the bundle and the runtime need, from either config generation."""

    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    expert_intermediate_size: int


ExpertSlicer = Callable[[ModelDims, dict[str, TensorInfo], int, int], dict[str, ExpertSlice]]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    switch_module: str  # MLX module path of a layer's SwitchGLU, with "{layer}"
    expert_pattern: re.Pattern  # matches checkpoint names of expert tensors; group "layer"
    expert_slices: ExpertSlicer
    dims: Callable[[dict], ModelDims]
    # config keys mlx-lm requires, each with the other names the same value goes by
    config_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def is_expert_tensor(self, name: str) -> bool:
        return self.expert_pattern.fullmatch(name) is not None

    def expert_layers(self, tensors: dict[str, TensorInfo]) -> list[int]:
        layers = set()
        for name in tensors:
            m = self.expert_pattern.fullmatch(name)
            if m:
                layers.add(int(m.group("layer")))
        return sorted(layers)

    def module_path(self, layer: int) -> str:
        return self.switch_module.format(layer=layer)


def first_key(config: dict, *keys: str, default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    if default is not None:
        return default
    raise CheckpointError(f"config.json has none of the keys {', '.join(keys)}")


def standard_dims(config: dict) -> ModelDims:
    return ModelDims(
        num_layers=int(config["num_hidden_layers"]),
        num_experts=int(first_key(config, "num_experts", "num_local_experts", "n_routed_experts")),
        experts_per_token=int(first_key(config, "num_experts_per_tok", "moe_topk", "top_k")),
        hidden_size=int(config["hidden_size"]),
        expert_intermediate_size=int(first_key(config, "moe_intermediate_size", "intermediate_size")),
    )


def require(tensors: dict[str, TensorInfo], name: str) -> TensorInfo:
    if name not in tensors:
        raise CheckpointError(f"expected tensor {name!r} is missing from the checkpoint")
    return tensors[name]


def per_expert_or_fused(prefix: str, names: dict[str, str]) -> ExpertSlicer:
    """Experts stored one tensor per expert and projection (the classic Hub layout), or fused as
    `experts.gate_up_proj` [E, 2I, H] + `experts.down_proj` [E, H, I] (transformers 5 style).

    `names` maps MLX projection (gate_proj/up_proj/down_proj) to the checkpoint's (e.g. w1/w3/w2).
    """

    def slices(dims: ModelDims, tensors: dict[str, TensorInfo], layer: int, expert: int):
        base = prefix.format(layer=layer)
        fused = f"{base}.experts.gate_up_proj"
        if fused in tensors:
            return fused_gate_up(fused, f"{base}.experts.down_proj", dims, expert)
        out = {}
        for mlx_name, ckpt_name in names.items():
            name = f"{base}.experts.{expert}.{ckpt_name}.weight"
            require(tensors, name)
            out[f"{mlx_name}.weight"] = ExpertSlice(name)
        return out

    return slices


def fused_gate_up(gate_up: str, down: str, dims: ModelDims, expert: int) -> dict[str, ExpertSlice]:
    """gate_up [E, 2I, H] with gate first then up (Qwen3.5 on the Hub), down [E, H, I]."""
    inter = dims.expert_intermediate_size
    return {
        "gate_proj.weight": ExpertSlice(gate_up, expert, axis=0, start=0, stop=inter),
        "up_proj.weight": ExpertSlice(gate_up, expert, axis=0, start=inter, stop=2 * inter),
        "down_proj.weight": ExpertSlice(down, expert),
    }
