"""Corrections to mlx-lm's model code where it computes something other than transformers does for
the same checkpoint. mlx-lm stays as released (pinned, unpatched on disk); a correction changes
one built model instance (a module's class swapped for a subclass that computes as transformers
does), and where the corrected model needs a tensor mlx-lm's sanitize drops, says which
(`kept`). Each is checked against transformers' own forward pass on checkpoints written by its
`save_pretrained` (tests/test_transformers_fixtures.py).
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import mlx.nn as nn


def yarn_freqs(dims: int, base: float, factor: float, original_max: int, beta_fast: float, beta_slow: float,
               truncate: bool) -> mx.array:
    """YaRN's per-dimension frequencies in mlx-lm's YarnRoPE convention (its `_freqs`, the inverse of
    transformers' inv_freq), with the correction range floored/ceiled only when `truncate`, as
    transformers' `_compute_yarn_parameters` does (gpt-oss's config says false; mlx-lm always
    truncates)."""

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # as transformers and mlx-lm: no zero-width ramp
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    freq_extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    freq_inter = factor * freq_extra
    return (freq_inter * freq_extra) / (freq_inter * extrapolation + freq_extra * (1 - extrapolation))


def _yarn_truncate(model: nn.Module, config: dict) -> None:
    """rope_scaling.truncate = false: mlx-lm's YarnRoPE ignores it."""
    from mlx_lm.models.rope_utils import YarnRoPE

    cfg = config.get("text_config", config)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("truncate", True) is not False:
        return
    for _, module in model.named_modules():
        if isinstance(module, YarnRoPE):
            module._freqs = yarn_freqs(
                module.dims, float(cfg.get("rope_theta", 10000.0)), float(scaling.get("factor", 1.0)),
                int(scaling.get("original_max_position_embeddings", 4096)), float(scaling.get("beta_fast", 32)),
                float(scaling.get("beta_slow", 1)), truncate=False)


def _swap(model: nn.Module, cls_name: str, module_name: str, corrected: type) -> int:
    """Give every instance of mlx-lm's class `cls_name` (from mlx_lm.models.<module_name>) the
    corrected subclass; returns how many."""
    n = 0
    for _, module in model.named_modules():
        if type(module).__name__ == cls_name and type(module).__module__ == f"mlx_lm.models.{module_name}":
            module.__class__ = type(f"Corrected{cls_name}", (type(module),), {"__call__": corrected})
            n += 1
    return n


def _jamba_call(self, x: mx.array) -> mx.array:
    """transformers' JambaTopKRouter: softmax over all experts, then the top-k of it, not
    renormalised (mlx-lm takes the softmax of the top-k logits)."""
    probs = mx.softmax(self.router(x).astype(mx.float32), axis=-1, precise=True)
    k = self.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(probs, inds, axis=-1)
    y = self.switch_mlp(x, inds)
    return (y * scores[..., None].astype(y.dtype)).sum(axis=-2)


def _jamba_routing(model: nn.Module, config: dict) -> None:
    if config.get("model_type") == "jamba":
        _swap(model, "JambaSparseMoeBlock", "jamba", _jamba_call)


def _ernie_call(self, x: mx.array) -> mx.array:
    """transformers' Ernie4_5_MoeTopKRouter: experts chosen by softmax + e_score_correction_bias,
    weighted by the unbiased softmax, normalised by max(sum, moe_norm_min) (mlx-lm drops the bias)."""
    gates = self.gate_act(self.gate(x).astype(mx.float32))
    k = self.k
    inds = mx.stop_gradient(mx.argpartition(-(gates + self.e_score_correction_bias), kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    scores = scores / mx.maximum(scores.sum(axis=-1, keepdims=True), self._norm_min)
    y = self.switch_mlp(x, inds)
    y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if self.shared_experts is not None:
        y = y + self.shared_experts(x)
    return y


def _ernie_bias(model: nn.Module, config: dict) -> None:
    if config.get("model_type") != "ernie4_5_moe":
        return
    for _, module in model.named_modules():
        if type(module).__name__ == "Ernie4_5_MoeMLP":
            module.e_score_correction_bias = mx.zeros((module.gate.weight.shape[0],), mx.float32)
            object.__setattr__(module, "_norm_min", float(config.get("moe_norm_min", 1e-12)))
    _swap(model, "Ernie4_5_MoeMLP", "ernie4_5_moe", _ernie_call)


_ERNIE_BIAS = re.compile(r"^(?P<layer>.*\.mlp)\.moe_statics\.e_score_correction_bias$")


def kept(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Source tensors the corrected model needs that mlx-lm's sanitize drops, in the corrected
    model's naming (taken from the checkpoint's weights before sanitize)."""
    out = {}
    if config.get("model_type") == "ernie4_5_moe":
        for name, value in weights.items():
            m = _ERNIE_BIAS.match(name)
            if m:
                out[f"{m.group('layer')}.e_score_correction_bias"] = value.reshape(-1).astype(mx.float32)
    return out


CORRECTIONS = (_yarn_truncate, _jamba_routing, _ernie_bias)


def correct_model(model: nn.Module, config: dict) -> None:
    for correction in CORRECTIONS:
        correction(model, config)
