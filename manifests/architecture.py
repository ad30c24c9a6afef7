"""What mlx-lm builds for a checkpoint's config, and where its routed experts live in it.

mlx-lm's model classes are the truth for the target layout: the model for a config is built lazily
(MLX allocates nothing until evaluated, so a 671B model builds in a fraction of a second), and
every `SwitchGLU` / `SwitchMLP` in it is a routed-expert module: its dotted path, its layer, its
projections and their stacked `[E, out, in]` shapes say what a bundle must hold, with no table
per family. Which layers are MoE, how many experts, their sizes: all read off the built model.

Configs come in two generations: transformers 5 writes `rope_parameters` and renames keys
(`num_local_experts` ...) that mlx-lm's ModelArgs does not read, and mlx-lm silently drops keys it
does not know. `mlx_config` folds `rope_parameters` back and fills every ModelArgs field the file
lacks from transformers' own config class for the model type (its attribute aliases resolve the
renames), so the model mlx-lm builds computes what transformers computes.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
import types
from dataclasses import dataclass
from functools import lru_cache

import mlx.nn as nn

from ..common.errors import MoestreamError
from .safetensors_index import CheckpointError

# The attributes an MoE block (or its router, or the config it holds) keeps its top-k in.
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "k", "num_experts_per_token", "top_k_experts", "moe_topk", "moe_k")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class UnsupportedModel(MoestreamError, ValueError):
    """The checkpoint is not a Mixture-of-Experts model moestream can prepare and stream."""


@dataclass(frozen=True)
class SwitchTarget:
    """One routed-expert module of the mlx-lm model."""

    layer: int
    path: str  # dotted module path, e.g. "model.layers.3.mlp.switch_mlp"
    projections: tuple[str, ...]  # ("gate_proj", "up_proj", "down_proj") or ("fc1", "fc2")
    shapes: tuple[tuple[int, int, int], ...]  # per projection: (experts, out, in)
    bias: bool

    @property
    def num_experts(self) -> int:
        return self.shapes[0][0]

    @property
    def hidden_size(self) -> int:
        return self.shapes[0][2]

    @property
    def intermediate_size(self) -> int:
        return self.shapes[0][1]

    def tensor_names(self) -> list[str]:
        """The expert's tensors, named relative to the module, as the bundle stores them."""
        suffixes = ("weight", "bias") if self.bias else ("weight",)
        return [f"{p}.{s}" for p in self.projections for s in suffixes]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """One expert's shape of a tensor named by tensor_names()."""
        proj, kind = name.rsplit(".", 1)
        _, out, inp = self.shapes[self.projections.index(proj)]
        return (out, inp) if kind == "weight" else (out,)


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a model that the bundle and the runtime need."""

    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    expert_intermediate_size: int


# ----------------------------------------------------------------------------- config


def model_module(config: dict):
    """mlx-lm's model module for a config (with mlx-lm's own model_type remapping)."""
    from mlx_lm.utils import _get_classes

    if not isinstance(config.get("model_type"), str):
        raise CheckpointError("config.json has no model_type: not a Hugging Face model config")
    try:
        model_class, _ = _get_classes(config=config)
        return importlib.import_module(model_class.__module__)
    except (ValueError, AttributeError, ImportError):  # no such module, or a module that is not a model ("base")
        import mlx_lm

        raise UnsupportedModel(f"model_type {config['model_type']!r}: mlx-lm {mlx_lm.__version__} has no model for it, "
                               "so moestream cannot run it") from None


def _args_classes(module, depth: int = 2) -> list[type]:
    """The ModelArgs dataclasses a model module uses: its own, and those of the model modules it
    builds on (a vision-language wrapper's text model)."""
    from mlx_lm.models.base import BaseModelArgs

    out = []
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, BaseModelArgs) and value is not BaseModelArgs:
            out.append(value)
        elif depth and isinstance(value, types.ModuleType) and value.__name__.startswith("mlx_lm.models."):
            out += _args_classes(value, depth - 1)
        elif depth and isinstance(value, type) and value.__module__.startswith("mlx_lm.models.") \
                and value.__module__ != module.__name__:
            out += _args_classes(importlib.import_module(value.__module__), depth - 1)
    return list(dict.fromkeys(out))


def _required(classes: list[type]) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _transformers_config(config: dict):
    """transformers' config object for this config (None where transformers does not know the type)."""
    try:
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k != "model_type"}
        return AutoConfig.for_model(config["model_type"], **fields)
    except Exception:  # noqa: BLE001 - an unknown or unparsable type just gets no filling
        return None


def _fold_rope(cfg: dict, fields: set[str]) -> None:
    """transformers 5 folds rope_theta / rope_scaling / partial_rotary_factor into rope_parameters;
    mlx-lm models that read rope_parameters themselves get it as it is. rope_scaling keeps its
    rope_theta, as transformers requires of it when it reads config.json back."""
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_parameters" in fields:
        return
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type: the full-attention one
        rope = rope.get("full_attention") or next(iter(rope.values()))
    if cfg.get("rope_theta") is None and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if cfg.get("partial_rotary_factor") is None and "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if cfg.get("rope_scaling") is None and kind != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if to_dict else None


def _fill(cfg: dict, source, fields: set[str], required: set[str]) -> None:
    """Fields mlx-lm reads that the config file lacks, from transformers' config object (a None
    there still fills a field mlx-lm requires). Not its computed properties: config.json must stay
    loadable by transformers (the tokenizer reads it)."""
    if source is None:
        return
    for name in sorted(fields):
        if cfg.get(name) is None and not isinstance(getattr(type(source), name, None), property):
            value = _jsonable(getattr(source, name, None))
            if value is not None or (name in required and name not in cfg and hasattr(source, name)):
                cfg[name] = value


def _attention_interval(cfg: dict) -> int | None:
    """transformers 5 lists layer_types; mlx-lm's hybrid models take full_attention_interval."""
    kinds = cfg.get("layer_types")
    if not isinstance(kinds, list) or "full_attention" not in kinds:
        return None
    k = kinds.index("full_attention") + 1
    regular = all((t == "full_attention") == ((i + 1) % k == 0) for i, t in enumerate(kinds))
    return k if regular else None


class Key(str):
    """In IMPLIED: the value of another config key (dotted from the top, or in the same config)."""


# What mlx-lm's ModelArgs needs that neither config.json nor transformers' config object carries:
# values transformers' own modeling code implies (each checked against it on the family's
# fixture). A value is a constant, a Key (another key's value), or a function of the config being
# filled.
IMPLIED: dict[str, dict[str, object]] = {
    "*": {"head_dim": lambda c: c["hidden_size"] // c["num_attention_heads"],
          "full_attention_interval": _attention_interval,
          "rope_scaling": lambda c: None},  # transformers 5 folds it into rope_parameters; None: no scaling
    "qwen3_vl_moe": {"norm_topk_prob": True, "num_experts": Key("num_local_experts")},  # its router always normalises
    "gemma4": {"vocab_size": Key("text_config.vocab_size"),  # mlx-lm's wrapper would copy its own default down
               "global_head_dim": lambda c: ((c.get("per_layer_config") or {}).get("full_attention") or {}).get(
                   "head_dim") or c["head_dim"]},
    # transformers' LongcatFlash always scales q and kv by sqrt(hidden / lora rank); its zero experts are identities
    "longcat_flash": {"attention_method": "MLA", "zero_expert_type": "identity", "mla_scale_q_lora": True,
                      "mla_scale_kv_lora": True},
    "minimax_m2": {"rotary_dim": lambda c: int(c["head_dim"] * c.get("partial_rotary_factor", 1.0)),
                   "shared_intermediate_size": 0},  # no shared experts
}


# Where config.json says one thing in two places and transformers reads the other one than mlx-lm:
# (dotted key mlx-lm reads) -> (the key transformers reads).
PRECEDENCE: dict[str, dict[str, str]] = {
    "qwen3_vl_moe": {"text_config.tie_word_embeddings": "tie_word_embeddings"},
    "kimi_k25": {"text_config.tie_word_embeddings": "tie_word_embeddings"},
}


def _imply(cfg: dict, model_type: str, fields: set[str], required: set[str], root: dict) -> None:
    for name, value in (*IMPLIED["*"].items(), *IMPLIED.get(model_type, {}).items()):
        if name not in fields or cfg.get(name) is not None:
            continue
        try:
            if callable(value):
                value = value(cfg)
            elif isinstance(value, Key):
                value = cfg.get(value) if value in cfg else _get_dotted(root, value)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if value is not None or (name in required and name not in cfg):
            cfg[name] = value


def _get_dotted(config: dict, key: str):
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def mlx_config(config: dict) -> dict:
    """The config as mlx-lm should read it (see the module docstring); the input is not changed."""
    config = copy.deepcopy(config)
    module = model_module(config)
    classes = _args_classes(module)
    fields, required = {f.name for cls in classes for f in dataclasses.fields(cls)}, _required(classes)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for cfg in filter(None, (config, text)):
        _fold_rope(cfg, fields)
    tf = _transformers_config(config)
    _fill(config, tf, fields, required)
    if text is not None:
        _fill(text, getattr(tf, "text_config", None), fields, required)
    for cfg in filter(None, (config, text)):
        _imply(cfg, config["model_type"], fields, required, config)
    for target, source in PRECEDENCE.get(config["model_type"], {}).items():
        value, (*parents, last) = _get_dotted(config, source), target.split(".")
        holder = _get_dotted(config, ".".join(parents)) if parents else config
        if value is not None and isinstance(holder, dict):
            holder[last] = value
    return config


# ----------------------------------------------------------------------------- the model


def _floats(value):
    """transformers writes non-finite floats as {"__float__": "Infinity"} (JSON has none)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def build_model(config: dict) -> nn.Module:
    """mlx-lm's model for an mlx config, built lazily, with moestream's corrections applied."""
    from .corrections import correct_model

    module = model_module(config)
    try:
        model = module.Model(module.ModelArgs.from_dict(_floats(config)))
    except TypeError as e:  # missing required ModelArgs fields
        raise UnsupportedModel(f"mlx-lm cannot build model_type {config.get('model_type')!r} from this config: {e}") from None
    correct_model(model, config)
    return model


def quantize_like_mlx_lm(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Quantize the modules whose codes `weights` holds, as mlx-lm's load_model does: a module's
    own recipe from config.json's `quantization` first, else bits and group size inferred from the
    stored shapes (mlx-lm's `infer_quant_config`)."""
    from mlx_lm.utils import infer_quant_config

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def switch_targets(model: nn.Module) -> dict[int, SwitchTarget]:
    """layer -> its routed-expert module, found by type."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (SwitchGLU, SwitchMLP)):
            m = _LAYER.search(path) or re.search(r"\.(\d+)\.", path)
            if m is None:
                raise UnsupportedModel(f"cannot tell the layer of the expert module at {path}")
            projections = ("gate_proj", "up_proj", "down_proj") if isinstance(module, SwitchGLU) else ("fc1", "fc2")
            linears = [getattr(module, p) for p in projections]
            shapes = tuple(tuple(int(s) for s in lin.weight.shape) for lin in linears)
            out[int(m.group(1))] = SwitchTarget(int(m.group(1)), path, projections, shapes, "bias" in linears[0])
    return dict(sorted(out.items()))


def resolve_module(model: nn.Module, path: str):
    """The module at a dotted MLX path ("model.layers.3.mlp"); list items by index."""
    obj = model
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def top_k_holder(model: nn.Module, switch_path: str) -> tuple[object, str] | None:
    """(object, attribute) holding the routed top-k of the layer whose expert module is at
    switch_path: on the MoE block, its gate or router, or the args/config they hold, searching
    outward from the expert module's parent (some families route one level up)."""
    parts = switch_path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:depth])
        for obj in _holders(resolve_module(model, path)):
            for attr in TOP_K_ATTRS:
                value = getattr(obj, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return obj, attr
        if re.search(r"\.\d+$", path):  # the decoder layer: no further
            break
    return None


def _holders(block) -> list:
    out = [block]
    for name in ("router", "gate"):
        child = getattr(block, name, None)
        if child is not None:
            out.append(child)
            out += [getattr(child, a) for a in ("config", "args") if getattr(child, a, None) is not None]
    out += [getattr(block, a) for a in ("args", "config") if getattr(block, a, None) is not None]
    return out


@dataclass(frozen=True)
class Architecture:
    """A config resolved against mlx-lm: its model module and routed-expert modules."""

    family: str  # mlx-lm's model module name, e.g. "deepseek_v3"
    config: dict  # the mlx config
    targets: dict[int, SwitchTarget]
    experts_per_token: int

    @property
    def dims(self) -> ModelDims:
        first = next(iter(self.targets.values()))
        cfg = self.config.get("text_config", self.config)
        layers = cfg.get("num_hidden_layers", self.config.get("num_hidden_layers", max(self.targets) + 1))
        return ModelDims(int(layers), first.num_experts, self.experts_per_token, first.hidden_size,
                         first.intermediate_size)


def architecture(config: dict) -> Architecture:
    """Build the model for an (mlx) config and find its routed experts; one clear error for a model
    moestream cannot stream."""
    model = build_model(config)
    targets = switch_targets(model)
    if not targets:
        raise UnsupportedModel(f"model_type {config.get('model_type')!r} has no routed experts (no SwitchGLU/SwitchMLP "
                               "in mlx-lm's model): a dense model, nothing to stream")
    first = next(iter(targets.values()))
    holder = top_k_holder(model, first.path)
    if holder is None:
        raise UnsupportedModel(f"cannot find the routed top-k of {type(resolve_module(model, first.path)).__name__} "
                               f"at {first.path}")
    return Architecture(model_module(config).__name__.rsplit(".", 1)[-1], config, targets, int(getattr(*holder)))


@lru_cache(maxsize=8)
def _cached(key: str) -> Architecture:
    import json

    return architecture(json.loads(key))


def architecture_of(config: dict) -> Architecture:
    """architecture(), remembered per config (building a large model's graph takes a moment)."""
    import json

    return _cached(json.dumps(config, sort_keys=True))
