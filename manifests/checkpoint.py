"""A source checkpoint (Hub layout: config.json + safetensors) resolved against mlx-lm's model.

Which tensors are routed experts, and how each expert's tensors are cut out of them, is derived
(architecture.py builds mlx-lm's model for the config; expert_map.py learns the mapping from the
family's own `sanitize`): no table per family. Reads one expert at a time (bounded memory, whatever
the model size) and the resident set, which goes through mlx-lm's own `sanitize` so that resident
tensors end in exactly the MLX naming and values mlx-lm would load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .architecture import (
    Architecture,
    ModelDims,
    UnsupportedModel,
    architecture_of,
    build_model,
    mlx_config,
    quantize_like_mlx_lm,
)
from .corrections import kept
from .expert_map import ExpertMap, ExpertSlice, beyond_the_model, map_experts
from .safetensors_index import CheckpointError, TensorInfo, index_folder, read_bytes, read_tensor
from .source_formats import QuantizedTensor, dequantize, logical_tensors, mxfp4_parts
from .tensors import DTYPES, dtype_name, from_buffer, from_numpy_bits, to_numpy_bits


def finish_slice(s: ExpertSlice, info: TensorInfo, buf) -> mx.array:
    """The MLX tensor of a slice from the bytes `slice_range` named."""
    shape = info.shape if s.expert is None else info.shape[1:]
    return cut(s, from_buffer(buf, info.dtype, shape))


def cut(s: ExpertSlice, arr: mx.array, axis_only: bool = False) -> mx.array:
    """The slice's strided range (and transpose) of one expert's tensor `arr`, bit for bit.
    axis_only: the range only (for the parts of a quantized tensor, cut along its rows)."""
    if s.start == 0 and s.stop is None and s.step == 1 and (axis_only or not s.transpose):
        return arr
    dtype = dtype_name(arr.dtype)
    bits = to_numpy_bits(arr)  # exact bit patterns: slicing and transposing never round
    index = [slice(None)] * bits.ndim
    index[s.axis] = slice(s.start, s.stop, s.step)
    bits = bits[tuple(index)]
    if s.transpose and not axis_only:
        bits = np.swapaxes(bits, -1, -2)
    return from_numpy_bits(bits, dtype)


def load_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


@dataclass
class SourceCheckpoint:
    folder: Path
    config: dict  # config.json as the checkpoint has it
    tensors: dict[str, TensorInfo]  # quantized groups as one logical float tensor each
    quantized: dict[str, QuantizedTensor]  # logical name -> how it is stored
    arch: Architecture
    experts: ExpertMap

    @classmethod
    def open(cls, folder: str | Path, headers: Mapping[str, tuple[bytes, int]] | None = None) -> SourceCheckpoint:
        """Index and resolve a checkpoint folder (remembered while its files are unchanged: every
        preparation step opens it). headers: {weight file name: (its safetensors header, its size)}
        to index weight files not in the folder yet (a Hub checkpoint fetched shard by shard): their
        tensors point where the shard will be once downloaded."""
        folder = Path(folder).absolute()
        if headers is not None:  # shards come and go while it is used: only the JSON files count
            stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.json")))
            return _open(folder, stamp, tuple(sorted(headers.items())))
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                      for p in sorted(folder.glob("*")) if p.suffix in (".json", ".safetensors"))
        return _open(folder, stamp)

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def dims(self) -> ModelDims:
        return self.arch.dims

    def module_path(self, layer: int) -> str:
        return self.arch.targets[layer].path

    @property
    def expert_layers(self) -> list[int]:
        return list(self.arch.targets)

    def expert_slices(self, layer: int, expert: int) -> dict[str, ExpertSlice]:
        if not 0 <= expert < self.dims.num_experts:
            raise CheckpointError(f"expert {expert} out of range (the model has {self.dims.num_experts})")
        return self.experts.slices(layer, expert)

    def read_expert(self, layer: int, expert: int, keep_quantized: bool = False) -> dict[str, mx.array]:
        """One expert's MLX tensors, reading only that expert's bytes: in the source dtype, with
        quantized source tensors dequantized (bfloat16) unless `keep_quantized` and MLX computes
        their format as stored, in which case the projection comes as its parts
        (`<proj>.weight` codes, `.scales`[, `.biases`]); `quantization(layer, expert)` says how."""
        out = {}
        for name, s in self.expert_slices(layer, expert).items():
            q = self.quantized.get(s.tensor)
            if q is None:
                info, offset, nbytes = self.slice_range(s)
                out[name] = finish_slice(s, info, read_bytes(info.file, offset, nbytes))
            elif keep_quantized and self._keeps(q, s):
                proj = name.rsplit(".", 1)[0]
                parts = {k: cut(s, v, axis_only=True) for k, v in self._read_parts(q, s.expert).items()}
                if q.kind == "mxfp4":
                    parts["weight"], parts["scales"] = mxfp4_parts(parts.pop("blocks"), parts["scales"])
                out.update({f"{proj}.{k}": v for k, v in parts.items()})
            else:
                out[name] = cut(s, dequantize(q, self._read_parts(q, s.expert)))
        return out

    def quantization(self, layer: int, expert: int) -> dict[str, QuantizedTensor]:
        """projection -> how it is stored, for the projections read_expert keeps quantized."""
        out = {}
        for name, s in self.expert_slices(layer, expert).items():
            q = self.quantized.get(s.tensor)
            if q is not None and self._keeps(q, s):
                out[name.rsplit(".", 1)[0]] = q
        return out

    @staticmethod
    def _keeps(q: QuantizedTensor, s: ExpertSlice) -> bool:
        """MLX computes q as stored, and the expert is whole rows of it (no transpose)."""
        return q.native and s.axis == 0 and not s.transpose

    def _read_parts(self, q: QuantizedTensor, expert: int | None) -> dict[str, mx.array]:
        out = {}
        for part, info in q.parts.items():
            if expert is None:
                out[part] = read_tensor(info)
            else:
                offset, nbytes = info.rows_range(expert, expert + 1)
                out[part] = from_buffer(read_bytes(info.file, offset, nbytes), info.dtype, info.shape[1:])
        return out

    def slice_range(self, s: ExpertSlice) -> tuple[TensorInfo, int, int]:
        """The tensor a slice comes from and the (offset, nbytes) of the bytes it needs."""
        if s.tensor not in self.tensors:
            raise CheckpointError(f"expected tensor {s.tensor!r} is missing from the checkpoint")
        info = self.tensors[s.tensor]
        if s.expert is None:
            return info, info.offset, info.nbytes
        if not info.shape or s.expert >= info.shape[0]:
            raise CheckpointError(f"{s.tensor} {list(info.shape)} has no expert {s.expert}")
        return (info, *info.rows_range(s.expert, s.expert + 1))

    def resident_names(self) -> list[str]:
        experts = self.experts.source_tensors() | beyond_the_model(self.arch, self.tensors)
        return [n for n in self.tensors if n not in experts]

    def mlx_config(self) -> dict:
        return self.arch.config

    def build_mlx_model(self):
        """mlx-lm's model for this config, built lazily (no memory for its random init)."""
        return build_model(self.arch.config)

    def read_resident(self, name: str) -> dict[str, mx.array]:
        """One resident tensor: fp8 and MXFP4 dequantized, MLX codes kept as their parts."""
        q = self.quantized.get(name)
        if q is None:
            return {name: read_tensor(self.tensors[name])}
        parts = self._read_parts(q, None)
        if q.kind == "mlx":
            module = name[: -len(".weight")]
            return {f"{module}.{k}": v for k, v in parts.items()}
        return {name: dequantize(q, parts)}

    def resident_quantization(self) -> dict | None:
        """config.json's `quantization` where resident tensors stay quantized (MLX codes), else None."""
        if any(q.kind == "mlx" for n, q in self.quantized.items() if n in set(self.resident_names())):
            return self.config.get("quantization") or self.config.get("text_config", {}).get("quantization")
        return None

    def resident_weights(self, model=None) -> dict[str, mx.array]:
        """The resident tensors in MLX naming and values, as mlx-lm's own `sanitize` makes them.

        When the expert map was learned from sanitize, sanitize also sees the expert tensors (as
        lazy zeros: never computed), because some families' sanitize needs every key it expects;
        what it makes of them is dropped.

        sanitize runs in float32: some families' sanitize computes (gemma-style norms get +1), and
        in bfloat16 that rounding alone moves the logits by ~1e-2; a result that the source dtype
        holds exactly is stored in it, any other stays float32 (a norm vector, a few KB)."""
        model = model if model is not None else self.build_mlx_model()
        weights = {}
        for name in self.resident_names():
            weights.update(self.read_resident(name))
        source_dtype = _main_float_dtype(weights)
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
        drop = set()
        if self.experts.method == "sanitize":
            for name in self.experts.source_tensors():
                info = self.tensors[name]
                weights[name] = mx.zeros(info.shape, DTYPES[info.dtype][2])
            drop = self.experts.derived_keys
        rescued = kept(weights, self.arch.config)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        weights.update(rescued)
        switches = tuple(f"{t.path}." for t in self.arch.targets.values())
        weights = {k: _narrow(v, source_dtype) for k, v in weights.items() if k not in drop and not k.startswith(switches)}
        quantization = self.resident_quantization()
        if quantization:
            quantize_like_mlx_lm(model, quantization, weights)
        _tie_head(weights, model, self.config)
        _check_resident(weights, model, switches)
        return weights


def _main_float_dtype(weights: dict[str, mx.array]):
    """The float dtype holding most of the resident bytes (bfloat16 for most checkpoints)."""
    sizes: dict = {}
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.nbytes
    return max(sizes, key=sizes.get) if sizes else None


def _narrow(v: mx.array, dtype) -> mx.array:
    """v (float32) back in `dtype` when that holds it exactly."""
    if dtype is None or v.dtype != mx.float32 or dtype == mx.float32:
        return v
    narrow = v.astype(dtype)
    return narrow if bool(mx.array_equal(narrow.astype(mx.float32), v)) else v


# Tensor names some checkpoint writers get wrong, per model_type: (pattern, replacement or None to
# drop). transformers 5's save_pretrained of Kimi-K2.5 reverses its vision tower's `layers` ->
# `blocks` rename on the text model too, and writes a projector mlx-lm's model does not have.
RENAMES: dict[str, list[tuple[str, str | None]]] = {
    "kimi_k25": [(r"^language_model\.model\.blocks\.", "language_model.model.layers."), (r"^model\.mm_projector\.", None)],
}


def _renamed(tensors: dict[str, TensorInfo], model_type: str) -> dict[str, TensorInfo]:
    rules = RENAMES.get(model_type)
    if not rules:
        return tensors
    out = {}
    for name, info in tensors.items():
        for pattern, replacement in rules:
            if re.match(pattern, name):
                name = None if replacement is None else re.sub(pattern, replacement, name)
                break
        if name is not None:
            out[name] = replace(info, name=name)
    return out


@lru_cache(maxsize=4)
def _open(folder: Path, stamp: tuple, headers: tuple = ()) -> SourceCheckpoint:
    config = load_config(folder)
    arch = architecture_of(mlx_config(config))
    indexed = index_folder(folder, dict(headers) if headers else None)
    tensors, quantized = logical_tensors(_renamed(indexed, config.get("model_type")), config)
    experts = map_experts(arch, build_model(arch.config), tensors)
    return SourceCheckpoint(folder, config, tensors, quantized, arch, experts)


def _tie_head(weights: dict, model, config: dict) -> None:
    """A checkpoint that ties its output head to the embeddings (and so stores no head), for an
    mlx-lm model that keeps a separate head: the head is the embeddings (as transformers ties them)."""
    if not (config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings")):
        return
    for key, _ in tree_flatten(model.parameters()):
        if key.endswith("lm_head.weight") and key not in weights:
            prefix = key[: -len("lm_head.weight")]
            embed = next((k for k in (f"{prefix}model.embed_tokens.weight", f"{prefix}embed_tokens.weight") if k in weights),
                         None)
            if embed is not None:
                weights[key] = weights[embed]


def _check_resident(weights: dict, model, switches: tuple[str, ...]) -> None:
    """Every resident parameter of mlx-lm's model is there, and nothing else."""
    want = {k for k, _ in tree_flatten(model.parameters()) if not k.startswith(switches)}
    extra, missing = sorted(set(weights) - want), sorted(want - set(weights))
    if extra or missing:
        raise UnsupportedModel(
            "the checkpoint's non-expert tensors do not make mlx-lm's model"
            + (f"; not in the model: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}" if extra else "")
            + (f"; missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else ""))
