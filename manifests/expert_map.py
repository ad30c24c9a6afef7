"""Where each expert's tensors are in a source checkpoint: learned, not tabulated.

The target of every expert tensor is known from mlx-lm's model (architecture.py): switch module
`P`, projection `gate_proj`, stacked `[E, out, in]`. How a checkpoint's tensors become those
targets is what the family's own `sanitize` does (stacking `experts.{e}.w1`, splitting fused
`gate_up_proj` halves, de-interleaving, transposing, renaming prefixes). So it is learned by
running that `sanitize` on stand-ins: every expert tensor of the checkpoint becomes a small array
of unique integer tags with the same names and the same shape relations (each size divided by one
common factor, the expert axis kept), every other tensor a lazy zero array that is never computed.
Where each tag lands in each switch target says, per expert, which source tensor and which rows or
columns (start, step, transposed or not) hold it: an `ExpertSlice`, which reads one expert's bytes
and nothing more, however large the model.

Where a family's `sanitize` does not handle the layout a checkpoint uses (checkpoints written by
transformers 5's `save_pretrained` are often not the layout the Hub repo had), the expert tensors
are recognised by name and shape instead: one tensor per expert (`experts.{e}.{gate,up,down}_proj`,
`w1/w3/w2`, `fc1/fc2`), or fused 3-D tensors (gate and up concatenated or interleaved, transposed or
not), under any prefix. Interleaved gate/up cannot be told from concatenated by shape: the few
families that interleave are named in INTERLEAVED.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from .architecture import Architecture, SwitchTarget, UnsupportedModel
from .safetensors_index import TensorInfo
from .tensors import DTYPES

# Families whose fused gate_up tensor alternates gate and up rows/columns (gate = ::2, up = 1::2).
INTERLEAVED = {"gpt_oss"}
MAX_TAGS = 1 << 26  # int32 tags; a probe larger than this falls back to recognising names
_EXPERT_PART = re.compile(r"(^|\.)(\w*experts?|\w*moe|switch_mlp|switch_glu)(\.|$)")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ExpertSlice:
    """One expert tensor, cut from one checkpoint tensor.

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
class TensorRule:
    """How one expert tensor of one layer is cut from the checkpoint, for any expert."""

    tensors: tuple[str, ...]  # one name per expert, or one (stacked [E, ...]) for all
    axis: int = 0
    start: int = 0
    stop: int | None = None
    step: int = 1
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return len(self.tensors) == 1

    def slice(self, expert: int) -> ExpertSlice:
        if self.stacked:
            return ExpertSlice(self.tensors[0], expert, self.axis, self.start, self.stop, self.step, self.transpose)
        return ExpertSlice(self.tensors[expert], None, self.axis, self.start, self.stop, self.step, self.transpose)


@dataclass(frozen=True)
class ExpertMap:
    """layer -> bundle tensor name ("gate_proj.weight" ...) -> its rule; and how it was learned."""

    rules: dict[int, dict[str, TensorRule]]
    method: str  # "sanitize" (the family's own) or "names" (recognised by name and shape)
    derived_keys: frozenset[str] = frozenset()  # sanitize outputs made from expert tensors

    def slices(self, layer: int, expert: int) -> dict[str, ExpertSlice]:
        return {name: rule.slice(expert) for name, rule in self.rules[layer].items()}

    def source_tensors(self) -> set[str]:
        return {t for layer in self.rules.values() for rule in layer.values() for t in rule.tensors}


def beyond_the_model(arch: Architecture, tensors: dict[str, TensorInfo]) -> set[str]:
    """Per-expert tensors of experts the model does not have (index >= its E in an MoE layer):
    transformers writes weights for LongCat's identity "zero experts", which compute nothing."""
    out = set()
    for name in tensors:
        m, layer = _PER_EXPERT.match(name), _LAYER.search(name)
        if m and layer and _EXPERT_PART.search(name) and int(layer.group(1)) in arch.targets:
            if int(m.group("e")) >= arch.targets[int(layer.group(1))].num_experts:
                out.add(name)
    return out


def map_experts(arch: Architecture, model, tensors: dict[str, TensorInfo]) -> ExpertMap:
    """The expert map of a checkpoint: learned from the family's sanitize, else by names."""
    probed = _probe_sanitize(arch, model, tensors)
    if probed is not None:
        return probed
    return _recognise(arch, tensors)


# ----------------------------------------------------------------------------- the sanitize probe


def _is_candidate(name: str, info: TensorInfo) -> bool:
    return (_EXPERT_PART.search(name) is not None and "shared" not in name
            and info.dtype in ("bfloat16", "float16", "float32"))


def _has_expert_index(name: str) -> bool:
    return re.search(r"(^|\.)(\w*experts?|mlp)\.\d+\.", name) is not None


def _scale(arch: Architecture) -> int:
    """The common factor every expert size is divided by in the stand-ins (keeping each >= 2)."""
    sizes = {s for t in arch.targets.values() for shape in t.shapes for s in shape[1:]}
    s = math.gcd(*sizes)
    while s > 1 and min(sizes) // s < 2:
        s = s // 2 if s % 2 == 0 else 1
    return s


def _tiny(info: TensorInfo, num_experts: int, s: int) -> tuple[int, ...] | None:
    shape = list(info.shape)
    stacked = len(shape) >= 2 and shape[0] == num_experts and not _has_expert_index(info.name)
    out = [shape[0]] if stacked else []
    for size in shape[1:] if stacked else shape:
        out.append(size // s if size % s == 0 else size)
    return tuple(out)


def _probe_sanitize(arch: Architecture, model, tensors: dict[str, TensorInfo]) -> ExpertMap | None:
    sanitize = getattr(model, "sanitize", None)
    num_experts = next(iter(arch.targets.values())).num_experts
    s = _scale(arch)
    weights, tags = {}, []  # tags: (first tag, name, stand-in shape)
    offset = 0
    for name, info in tensors.items():
        tiny = _tiny(info, num_experts, s) if _is_candidate(name, info) else None
        if tiny is None:
            weights[name] = mx.zeros(info.shape, DTYPES[info.dtype][2])  # lazy: never computed
            continue
        n = math.prod(tiny)
        if offset + n > MAX_TAGS:
            return None
        weights[name] = mx.arange(offset, offset + n, dtype=mx.int32).reshape(tiny)
        tags.append((offset, name, tiny))
        offset += n
    if not tags:
        return None
    try:
        out = sanitize(dict(weights)) if sanitize is not None else weights
    except Exception:  # noqa: BLE001 - the family's sanitize does not take this layout: recognise names
        return None
    starts = np.array([t[0] for t in tags])
    rules = {}
    for layer, target in arch.targets.items():
        layer_rules = {}
        for name in target.tensor_names():
            arr = out.get(f"{target.path}.{name}")
            if arr is None or arr.dtype != mx.int32:
                return None
            rule = _fit(np.array(arr), starts, tags, tensors, target, name, s)
            if rule is None:
                return None
            layer_rules[name] = rule
        rules[layer] = layer_rules
    expert_ids = {i for i, t in enumerate(tags) if t[1] in {n for r in rules.values() for x in r.values()
                                                           for n in x.tensors}}
    derived = frozenset(k for k, v in out.items() if isinstance(v, mx.array) and v.dtype == mx.int32
                        and expert_ids & set(np.unique(np.searchsorted(starts, np.array(v).ravel(), side="right") - 1)))
    return ExpertMap(rules, "sanitize", derived)


def _decode(values: np.ndarray, starts: np.ndarray, tags) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tag values -> (index of the source tensor, [coordinate arrays in its stand-in])."""
    which = np.searchsorted(starts, values, side="right") - 1
    ndim = max(len(tags[i][2]) for i in np.unique(which))
    coords = [np.full(values.shape, -1, np.int64) for _ in range(ndim)]
    for i in np.unique(which):
        sel = which == i
        idx = np.unravel_index(values[sel] - tags[i][0], tags[i][2])
        for axis, c in enumerate(idx):
            coords[axis][sel] = c
    return which, coords


def _affine(values: np.ndarray) -> tuple[int, int] | None:
    """(start, step) if values == start + step * arange(len), else None."""
    if len(values) == 1:
        return int(values[0]), 1
    start, step = int(values[0]), int(values[1] - values[0])
    return (start, step) if step > 0 and np.array_equal(values, start + step * np.arange(len(values))) else None


def _fit(arr: np.ndarray, starts, tags, tensors, target: SwitchTarget, name: str, s: int) -> TensorRule | None:
    """The rule that reproduces `arr` ([E, out(, in)] of tags) from the source tensors."""
    which, coords = _decode(arr, starts, tags)
    num_experts = arr.shape[0]
    names = []
    for e in range(num_experts):
        ids = np.unique(which[e])
        if len(ids) != 1:
            return None  # one expert's tensor assembled from several sources
        names.append(tags[ids[0]][1])
    stacked = len(set(names)) == 1
    if not stacked and len(set(names)) != num_experts:
        return None
    src = tags[which[0].flat[0]][2]
    if stacked:
        if not all((coords[0][e] == e).all() for e in range(num_experts)):
            return None
        coords, src = coords[1:], src[1:]
    coords = coords[: len(src)]
    target_axes = arr.ndim - 1  # out (and in)
    if len(coords) != target_axes:
        return None
    # which source axis follows which target axis, each an affine function of it
    fits = {}
    for a, c in enumerate(coords):
        c = c[0]  # expert 0; the others are checked below
        for t in range(target_axes):
            line = np.moveaxis(c, t, 0).reshape(c.shape[t], -1)
            if (line == line[:, :1]).all():
                f = _affine(line[:, 0])
                if f is not None:
                    fits[a] = (t, *f)
                    break
        if a not in fits:
            return None
    if sorted(t for t, _, _ in fits.values()) != list(range(target_axes)):
        return None
    if not all(np.array_equal(c[e], c[0]) for c in coords for e in range(num_experts)):
        return None  # every expert is cut the same way from its tensor
    sliced = [a for a, (t, start, step) in fits.items() if not (start == 0 and step == 1
                                                                and src[a] == arr.shape[1 + t])]
    if len(sliced) > 1:
        return None
    real_name = names[0]
    real_shape = tensors[real_name].shape[1:] if stacked else tensors[real_name].shape
    rule = TensorRule(tuple(names[:1] if stacked else names), transpose=target_axes == 2 and fits[0][0] == 1)
    if sliced:
        a = sliced[0]
        t, start, step = fits[a]
        scale = real_shape[a] // src[a]
        start = start * scale if step == 1 else start
        length = target.shape_of(name)[t]
        rule = TensorRule(rule.tensors, a, start, start + step * (length - 1) + 1, step, rule.transpose)
    return rule if _consistent(rule, tensors, target, name) else None


def _consistent(rule: TensorRule, tensors: dict[str, TensorInfo], target: SwitchTarget, name: str) -> bool:
    """The rule, applied to the real tensors, gives exactly the target's shape."""
    for e in (0, target.num_experts - 1):
        sl = rule.slice(e)
        info = tensors[sl.tensor]
        shape = list(info.shape if sl.expert is None else info.shape[1:])
        if sl.expert is not None and sl.expert >= info.shape[0]:
            return False
        shape[sl.axis] = len(range(*slice(sl.start, sl.stop, sl.step).indices(shape[sl.axis])))
        if sl.transpose:
            shape[-2:] = shape[-1], shape[-2]
        if tuple(shape) != target.shape_of(name):
            return False
    return True


# ----------------------------------------------------------------------------- recognised by name

_PER_EXPERT = re.compile(r"^(?P<prefix>.*)\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<kind>weight|bias)$")
_STACKED = re.compile(r"^(?P<prefix>.*)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2|fc1|fc2)\.(?P<kind>weight|bias)$")
_FUSED = re.compile(r"^(?P<prefix>.*)\.(?P<proj>gate_up_proj|down_proj|fc1|fc2|w13|w2)(?P<suffix>_bias|\.weight|\.bias)?$")
# checkpoint projection names -> mlx-lm's
_NAMES = {"gate_proj": "gate_proj", "w1": "gate_proj", "up_proj": "up_proj", "w3": "up_proj",
          "down_proj": "down_proj", "w2": "down_proj", "fc1": "fc1", "fc2": "fc2"}


def _layer_tensors(tensors: dict[str, TensorInfo], layer: int) -> dict[str, TensorInfo]:
    out = {}
    for name, info in tensors.items():
        m = _LAYER.search(name)
        if m is not None and int(m.group(1)) == layer and _EXPERT_PART.search(name) and "shared" not in name:
            out[name] = info
    return out


def _recognise(arch: Architecture, tensors: dict[str, TensorInfo]) -> ExpertMap:
    rules = {layer: _recognise_layer(arch, target, _layer_tensors(tensors, layer))
             for layer, target in arch.targets.items()}
    return ExpertMap(rules, "names")


def _recognise_layer(arch: Architecture, target: SwitchTarget, found: dict[str, TensorInfo]) -> dict[str, TensorRule]:
    per_expert: dict[tuple[str, str], dict[int, str]] = {}
    stacked: dict[str, TensorInfo] = {}
    fused: dict[str, TensorInfo] = {}
    for name, info in found.items():
        m = _PER_EXPERT.match(name)
        if m and m.group("proj") in _NAMES:
            per_expert.setdefault((_NAMES[m.group("proj")], m.group("kind")), {})[int(m.group("e"))] = name
            continue
        m = _STACKED.match(name)
        if m and info.shape and info.shape[0] == target.num_experts:
            stacked[f"{_NAMES[m.group('proj')]}.{m.group('kind')}"] = info
            continue
        m = _FUSED.match(name)
        if m:
            kind = "bias" if (m.group("suffix") or "").endswith("bias") else "weight"
            fused[f"{m.group('proj')}.{kind}"] = info
    rules = {}
    for name in target.tensor_names():
        proj, kind = name.rsplit(".", 1)
        names = per_expert.get((proj, kind))
        if names and len(names) == target.num_experts:
            rules[name] = _per_expert_rule(tuple(names[e] for e in range(target.num_experts)), found, target, name)
        elif name in stacked:  # one [E, out, in] tensor per projection (mlx-lm's own layout, step3p5 ...)
            info = stacked[name]
            rule = _per_expert_rule((info.name,), {info.name: replace(info, shape=info.shape[1:])}, target, name)
            rules[name] = TensorRule((info.name,), transpose=rule.transpose)
        else:
            rules[name] = _fused_rule(arch, target, name, fused)
    return rules


def _per_expert_rule(names: tuple[str, ...], found, target: SwitchTarget, name: str) -> TensorRule:
    want, shape = target.shape_of(name), found[names[0]].shape
    if tuple(shape) == want:
        return TensorRule(names)
    if len(shape) == 2 and tuple(shape[::-1]) == want:
        return TensorRule(names, transpose=True)
    raise UnsupportedModel(f"{names[0]}: shape {list(shape)}, but mlx-lm's {target.path}.{name} needs "
                           f"{list(want)} per expert")


def _fused_rule(arch: Architecture, target: SwitchTarget, name: str, fused: dict[str, TensorInfo]) -> TensorRule:
    proj, kind = name.rsplit(".", 1)
    out, inp = target.shape_of(name) if kind == "weight" else (target.shape_of(name)[0], None)
    first = proj in ("gate_proj", "up_proj")
    key = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
           "fc1": "fc1", "fc2": "fc2"}[proj] + f".{kind}"
    info = fused.get(key) or (fused.get(f"w13.{kind}") if first else fused.get(f"w2.{kind}") if proj == "down_proj" else None)
    if info is None:
        raise UnsupportedModel(f"layer {target.layer}: no checkpoint tensor found for mlx-lm's {target.path}.{name} "
                               f"(looked for experts.{{e}}.{proj} and fused {key.split('.')[0]} tensors)")
    shape = info.shape[1:]  # [E, ...]
    if info.shape[0] != target.num_experts:
        raise UnsupportedModel(f"{info.name}: {info.shape[0]} experts, mlx-lm's model has {target.num_experts}")
    halves = proj in ("gate_proj", "up_proj") and key.startswith(("gate_up_proj", "w13"))
    rows = 2 * out if halves else out
    interleaved = arch.family in INTERLEAVED
    offset = (0 if proj == "gate_proj" else (1 if interleaved else out)) if halves else 0
    step = 2 if halves and interleaved else 1
    stop = None if not halves else (offset + step * (out - 1) + 1)
    if kind == "bias":
        return TensorRule((info.name,), 0, offset, stop, step)
    # orientation: [rows, in] as mlx-lm (W @ x) or [in, rows] (x @ W); a square down_proj follows gate_up
    if tuple(shape) == (rows, inp) and (rows != inp or not _transposed_sibling(fused, target)):
        return TensorRule((info.name,), 0, offset, stop, step)
    if tuple(shape) == (inp, rows):
        return TensorRule((info.name,), 1, offset, stop, step, transpose=True)
    raise UnsupportedModel(f"{info.name}: shape {list(info.shape)} is neither [E, {rows}, {inp}] nor [E, {inp}, {rows}] "
                           f"as mlx-lm's {target.path}.{name} [E, {out}, {inp}] needs")


def _transposed_sibling(fused: dict[str, TensorInfo], target: SwitchTarget) -> bool:
    """Whether the fused gate_up tensor is stored x @ W ([E, H, 2I]), so a square down_proj is too."""
    gate_up = fused.get("gate_up_proj.weight") or fused.get("w13.weight")
    return gate_up is not None and gate_up.shape[1] == target.hidden_size and gate_up.shape[2] == 2 * target.intermediate_size
