"""Corrections to mlx-lm's model code where it computes something other than transformers does for
the same checkpoint. mlx-lm stays as released (pinned, unpatched on disk); a correction changes
one built model instance, and is checked against transformers' own forward pass on checkpoints
written by its `save_pretrained` (tests/test_transformers_fixtures.py).
"""

from __future__ import annotations

import math

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


CORRECTIONS = (_yarn_truncate,)


def correct_model(model: nn.Module, config: dict) -> None:
    for correction in CORRECTIONS:
        correction(model, config)
