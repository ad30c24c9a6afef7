"""Finding and replacing modules inside an mlx-lm model by their dotted paths."""

from __future__ import annotations

import re

import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from ...common.errors import OptionsError
from .streaming import ExpertStreamer, StreamingSwitchGLU


def resolve_module(model: nn.Module, path: str):
    """The module at a dotted MLX path ("model.layers.3.mlp"); list items by index."""
    obj = model
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def module_at(model: nn.Module, path: str):
    """(parent module, attribute name, module) for a dotted MLX module path."""
    parent_path, _, name = path.rpartition(".")
    parent = resolve_module(model, parent_path)
    return parent, name, getattr(parent, name)


def moe_block(model: nn.Module, switch_path: str):
    """The family's MoE block (router, score weighting, shared experts) holding a switch module."""
    return resolve_module(model, switch_path.rpartition(".")[0])


def switch_modules(model: nn.Module) -> dict[int, str]:
    """layer -> module path of every expert module (mlx-lm's SwitchGLU or ours), found by type."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (SwitchGLU, StreamingSwitchGLU)):
            m = re.search(r"layers\.(\d+)\.", path)
            if m is None:
                raise TypeError(f"cannot tell the layer of the expert module at {path}")
            out[int(m.group(1))] = path
    if not out:
        raise TypeError("the model has no SwitchGLU / StreamingSwitchGLU module: not an MoE model mlx-lm builds")
    return out


def install_streaming(model: nn.Module, layers: dict[int, str], streamer: ExpertStreamer) -> None:
    """Replace each layer's SwitchGLU by a StreamingSwitchGLU reading through `streamer`."""
    for layer, path in layers.items():
        parent, name, old = module_at(model, path)
        if not isinstance(old, SwitchGLU):
            raise TypeError(f"{path} is a {type(old).__name__}, expected mlx-lm's SwitchGLU")
        setattr(parent, name, StreamingSwitchGLU(streamer, layer, old.activation))


def set_experts_per_token(model: nn.Module, layers: dict[int, str], k: int, num_experts: int) -> None:
    """Lower (or raise) top-k in every MoE block; the block's own code renormalises the scores
    exactly as the family does (norm_topk_prob, softmax over the top-k ...)."""
    if not 1 <= k <= num_experts:
        raise OptionsError(f"experts_per_token must be between 1 and {num_experts}, got {k}")
    for path in layers.values():
        block = moe_block(model, path)
        touched = False
        for obj in (block, getattr(block, "gate", None)):
            for attr in ("top_k", "num_experts_per_tok"):
                if obj is not None and isinstance(getattr(obj, attr, None), int):
                    setattr(obj, attr, k)
                    touched = True
        if not touched:
            raise TypeError(f"cannot set experts per token on {type(block).__name__} at {path}")
