"""The reference nobody here wrote: mlx-lm loading a source checkpoint fully in memory, its
SwitchLinear experts quantized with `nn.quantize` in the checkpoint's dtype, then cast to float32.
moestream's documented corrections of mlx-lm (manifests/corrections.py, each checked against
transformers itself in test_transformers_fixtures.py) are applied to it too."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import _get_classes, load_model

from moestream.manifests.corrections import correct_model


def _gpt_oss_transformers_to_mlx_lm(weights: dict) -> dict:
    """transformers' bf16 gpt-oss experts are used as x @ W ([E, H, 2I], [E, I, H]); mlx-lm's
    sanitize expects W @ x ([E, 2I, H], [E, H, I]) as in the mxfp4 checkpoint. Re-stated here
    from transformers' GptOssExperts.forward, independently of moestream's family table."""
    out = {}
    for k, v in weights.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # mlx-lm's sanitize takes unquantized experts as "<name>.weight" in W @ x orientation
            k, v = k + ".weight", v.swapaxes(-1, -2)
        out[k] = v
    return out


def reference_model(checkpoint: Path, bits: int | None, group_size: int = 64):
    config = json.loads((checkpoint / "config.json").read_text())
    if config["model_type"] == "gpt_oss":
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
        weights = {}
        for f in glob.glob(str(checkpoint / "model*.safetensors")):
            weights.update(mx.load(f))
        weights = model.sanitize(_gpt_oss_transformers_to_mlx_lm(weights))
        model.load_weights(list(weights.items()), strict=True)
    else:
        model, _ = load_model(checkpoint)
    correct_model(model, config)
    if bits is not None and bits != 16:
        nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda p, m: isinstance(m, SwitchLinear))
    model.set_dtype(mx.float32)
    model.eval()
    return model


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(int(token))
    return out
