"""A source checkpoint (Hub layout: config.json + safetensors) seen through its family table.

Reads one expert at a time (bounded memory, whatever the model size) and the resident set,
which it hands to mlx-lm's own `sanitize` so that resident tensors end in exactly the MLX
naming and values mlx-lm would load.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .families import Family, family_for_config
from .families.base import ExpertSlice, ModelDims
from .safetensors_index import CheckpointError, TensorInfo, index_folder, read_bytes, read_tensor
from .tensors import from_buffer, from_numpy_bits, to_numpy_bits


def finish_slice(s: ExpertSlice, info: TensorInfo, buf) -> mx.array:
    """The MLX tensor of a slice from the bytes `slice_range` named."""
    shape = info.shape if s.expert is None else info.shape[1:]
    arr = from_buffer(buf, info.dtype, shape)
    if s.start == 0 and s.stop is None and s.step == 1 and not s.transpose:
        return arr
    bits = to_numpy_bits(arr)  # exact bit patterns: slicing and transposing never round
    index = [slice(None)] * bits.ndim
    index[s.axis] = slice(s.start, s.stop, s.step)
    bits = bits[tuple(index)]
    if s.transpose:
        bits = np.swapaxes(bits, -1, -2)
    return from_numpy_bits(bits, info.dtype)


def load_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _get_dotted(config: dict, key: str):
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def mlx_config(family: Family, config: dict) -> dict:
    """The config as mlx-lm reads it: keys that transformers 5 renamed get their older name too."""
    config = copy.deepcopy(config)
    targets = [config]
    if isinstance(config.get("text_config"), dict):
        targets.append(config["text_config"])
    for target in targets:
        rope = target.get("rope_parameters")
        if isinstance(rope, dict):  # transformers 5 folds rope_theta and rope_scaling in here
            if target.get("rope_theta") is None and "rope_theta" in rope:
                target["rope_theta"] = rope["rope_theta"]
            if target.get("rope_scaling") is None and rope.get("rope_type", rope.get("type", "default")) != "default":
                target["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        for key, aliases in family.config_aliases.items():
            if target.get(key) is not None:
                continue
            for alias in aliases:
                value = _get_dotted(target, alias)
                if value is not None:
                    target[key] = value
                    break
    return config


@dataclass
class SourceCheckpoint:
    folder: Path
    config: dict
    family: Family
    dims: ModelDims
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, folder: str | Path) -> "SourceCheckpoint":
        folder = Path(folder)
        config = load_config(folder)
        family = family_for_config(config)
        tensors = index_folder(folder)
        return cls(folder, config, family, family.dims(config), tensors)

    @property
    def expert_layers(self) -> list[int]:
        return self.family.expert_layers(self.tensors)

    def expert_slices(self, layer: int, expert: int) -> dict[str, ExpertSlice]:
        if not 0 <= expert < self.dims.num_experts:
            raise CheckpointError(f"expert {expert} out of range (the model has {self.dims.num_experts})")
        return self.family.expert_slices(self.dims, self.tensors, layer, expert)

    def read_expert(self, layer: int, expert: int) -> dict[str, mx.array]:
        """One expert's MLX tensors in the source dtype, reading only that expert's bytes."""
        out = {}
        for name, s in self.expert_slices(layer, expert).items():
            info, offset, nbytes = self.slice_range(s)
            out[name] = finish_slice(s, info, read_bytes(info.file, offset, nbytes))
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
        return [n for n in self.tensors if not self.family.is_expert_tensor(n)]

    def read_resident_raw(self) -> dict[str, mx.array]:
        return {n: read_tensor(self.tensors[n]) for n in self.resident_names()}

    def mlx_config(self) -> dict:
        return mlx_config(self.family, self.config)

    def build_mlx_model(self):
        """mlx-lm's model for this config, built lazily (no memory for its random init)."""
        from mlx_lm.utils import _get_classes

        config = self.mlx_config()
        model_class, args_class = _get_classes(config=config)
        return model_class(args_class.from_dict(config))

    def resident_weights(self, model=None) -> dict[str, mx.array]:
        """The resident tensors in MLX naming, as mlx-lm's own `sanitize` produces them."""
        model = model if model is not None else self.build_mlx_model()
        weights = self.read_resident_raw()
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        leftover = [k for k in weights if ".experts." in k and "shared_expert" not in k]
        if leftover:
            raise CheckpointError(f"expert tensors left in the resident set: {leftover[:3]}")
        return weights
