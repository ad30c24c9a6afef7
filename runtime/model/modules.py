"""Finding and replacing modules inside an mlx-lm model by their dotted paths."""

from __future__ import annotations

import re

import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from ...common.errors import OptionsError
from ...manifests.architecture import resolve_module, top_k_holder
from .streaming import ExpertStreamer, StreamingSwitchGLU

__all__ = ["install_streaming", "module_at", "moe_block", "resolve_module", "set_experts_per_token", "switch_modules"]


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
        if isinstance(module, (SwitchGLU, SwitchMLP, StreamingSwitchGLU)):
            m = re.search(r"layers\.(\d+)\.", path)
            if m is None:
                raise TypeError(f"cannot tell the layer of the expert module at {path}")
            out[int(m.group(1))] = path
    if not out:
        raise TypeError("the model has no SwitchGLU / StreamingSwitchGLU module: not an MoE model mlx-lm builds")
    return out


def install_streaming(model: nn.Module, layers: dict[int, str], streamer: ExpertStreamer) -> None:
    """Replace each layer's SwitchGLU / SwitchMLP by a StreamingSwitchGLU reading through `streamer`."""
    for layer, path in layers.items():
        parent, name, old = module_at(model, path)
        if not isinstance(old, (SwitchGLU, SwitchMLP)):
            raise TypeError(f"{path} is a {type(old).__name__}, expected mlx-lm's SwitchGLU or SwitchMLP")
        setattr(parent, name, StreamingSwitchGLU(streamer, layer, old.activation, glu=isinstance(old, SwitchGLU)))


def set_experts_per_token(model: nn.Module, layers: dict[int, str], k: int, num_experts: int) -> None:
    """Lower (or raise) top-k in every MoE layer, where the family keeps it (the block, its gate or
    router, or the args they share); the family's own code then renormalises the scores exactly as
    it does (norm_topk_prob, softmax over the top-k ...)."""
    if not 1 <= k <= num_experts:
        raise OptionsError(f"experts_per_token must be between 1 and {num_experts}, got {k}")
    for path in layers.values():
        holder = top_k_holder(model, path)
        if holder is None:
            raise OptionsError(f"cannot set experts per token on {type(moe_block(model, path)).__name__} at {path}")
        setattr(*holder, k)
