"""plan_expert_bits: spend bits where they matter, under a size budget.

Sensitivity is measured, not guessed: calibration text runs through the source model (the
runtime's CheckpointStore, bounded memory); for every expert, the tokens routed to it give its
real inputs, and its output error at each candidate bit width is ||f(x) - f_q(x)||^2 summed over
those tokens (so it is weighted by how often the expert is routed, and by the router's weight).
Experts no calibration token reached fall back to the error on a few random inputs, weighted by
a tiny pseudo-count. Then a greedy allocation starts every expert at the lowest width and keeps
upgrading the expert with the most error removed per byte added until the budget is spent.
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..common.errors import OptionsError

CANDIDATE_BITS = (2, 3, 4, 8)
MAX_TOKENS_PER_EXPERT = 256
UNSEEN_WEIGHT = 0.05  # routed-token pseudo-count for experts the calibration never reached


@dataclass(frozen=True)
class BitPlan:
    bits: dict[tuple[int, int], int]  # (layer, expert) -> bits
    expert_bytes: int
    error: float

    def to_json(self) -> dict:
        return {"bits": {f"{layer}:{e}": b for (layer, e), b in sorted(self.bits.items())},
                "expert_bytes": self.expert_bytes, "error": self.error}

    @classmethod
    def from_json(cls, data: dict) -> "BitPlan":
        bits = {}
        for key, b in data["bits"].items():
            layer, expert = key.split(":")
            bits[(int(layer), int(expert))] = int(b)
        return cls(bits, int(data.get("expert_bytes", 0)), float(data.get("error", 0.0)))


def load_plan(path: Path) -> BitPlan:
    try:
        return BitPlan.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError) as e:
        raise OptionsError(f"{path}: not a bit plan ({e}); expected {{\"bits\": {{\"LAYER:EXPERT\": BITS}}}}") from None


def quantized_nbytes(shape: tuple[int, int], bits: int, group_size: int, itemsize: int = 2) -> int:
    """Bytes of one quantized [out, in] matrix: packed codes + scales + biases (source dtype)."""
    out_dims, in_dims = shape
    if bits == 16:
        return out_dims * in_dims * itemsize
    return out_dims * in_dims * bits // 8 + 2 * out_dims * (in_dims // group_size) * itemsize


def _fake_quant(w: mx.array, bits: int, group_size: int) -> mx.array:
    if bits == 16:
        return w
    return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def _expert_out(tensors: dict[str, mx.array], x: mx.array, activation) -> mx.array:
    def proj(name):
        y = x @ tensors[f"{name}.weight"].T
        return y + tensors[f"{name}.bias"] if f"{name}.bias" in tensors else y

    h = activation(proj("up_proj"), proj("gate_proj"))
    y = h @ tensors["down_proj.weight"].T
    return y + tensors["down_proj.bias"] if "down_proj.bias" in tensors else y


def collect_routed_inputs(checkpoint: Path, token_ids: list[int], window: int = 256) -> tuple[dict, dict, object]:
    """Per (layer, expert): up to MAX_TOKENS_PER_EXPERT routed inputs, and routed-token counts."""
    from ..runtime.model.load import load, runtime_of

    loaded = load(checkpoint, dtype="float32")
    model = loaded.model
    inputs: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
    counts: dict[tuple[int, int], int] = defaultdict(int)

    def observe(layer, x, indices):
        xs = np.array(x.reshape(-1, x.shape[-1]).astype(mx.float32))
        idx = np.array(indices).reshape(xs.shape[0], -1)
        for row, experts in enumerate(idx):
            for e in experts.tolist():
                counts[(layer, e)] += 1
                if len(inputs[(layer, e)]) < MAX_TOKENS_PER_EXPERT:
                    inputs[(layer, e)].append(xs[row])

    with loaded:
        runtime_of(model).streamer.observers.append(observe)
        for start in range(0, len(token_ids), window):
            chunk = token_ids[start : start + window]
            if chunk:
                mx.eval(model(mx.array([chunk])))
        activations = {layer: m.activation for layer, m in _streaming_modules(model)}
    return dict(inputs), dict(counts), activations


def _streaming_modules(model):
    from ..runtime.model.streaming import StreamingSwitchGLU

    return [(m.layer, m) for _, m in model.named_modules() if isinstance(m, StreamingSwitchGLU)]


def expert_errors(checkpoint: Path, token_ids: list[int], bits_options=CANDIDATE_BITS, group_size: int = 64,
                  seed: int = 0) -> tuple[dict, dict]:
    """(errors[(layer, expert)][bits], nbytes[(layer, expert)][bits])."""
    from ..manifests.checkpoint import SourceCheckpoint

    ckpt = SourceCheckpoint.open(checkpoint)
    inputs, counts, activations = collect_routed_inputs(checkpoint, token_ids)
    rng = np.random.default_rng(seed)
    errors, sizes = {}, {}
    for layer in ckpt.expert_layers:
        for e in range(ckpt.dims.num_experts):
            tensors = {k: v.astype(mx.float32) for k, v in ckpt.read_expert(layer, e).items()}
            seen = inputs.get((layer, e))
            if seen:
                x, weight = mx.array(np.stack(seen)), counts[(layer, e)] / len(seen)
            else:
                x = mx.array(rng.standard_normal((16, ckpt.dims.hidden_size)).astype(np.float32))
                weight = UNSEEN_WEIGHT / 16
            y = _expert_out(tensors, x, activations[layer])
            errors[(layer, e)], sizes[(layer, e)] = {}, {}
            for b in bits_options:
                q = {k: _fake_quant(v, b, group_size) if k.endswith(".weight") else v for k, v in tensors.items()}
                errors[(layer, e)][b] = float(mx.sum((y - _expert_out(q, x, activations[layer])) ** 2)) * weight
                sizes[(layer, e)][b] = sum(quantized_nbytes(tuple(v.shape), b, group_size) if k.endswith(".weight")
                                           else v.size * 2 for k, v in tensors.items())
    return errors, sizes


def allocate(errors: dict, sizes: dict, size_budget: int) -> BitPlan:
    """Greedy: everything at the lowest width, then the best error-per-byte upgrades that fit."""
    bits = {key: min(opts) for key, opts in errors.items()}
    total = sum(sizes[k][b] for k, b in bits.items())
    if total > size_budget:
        raise OptionsError(f"size budget {size_budget} bytes is below the smallest plan ({total} bytes at {min(CANDIDATE_BITS)} bits)")

    def best_step(key):
        cur = bits[key]
        ups = [b for b in sorted(errors[key]) if b > cur]
        if not ups:
            return None
        gains = [((errors[key][cur] - errors[key][b]) / max(sizes[key][b] - sizes[key][cur], 1), b) for b in ups]
        return max(gains)

    heap = []
    for key in bits:
        step = best_step(key)
        if step:
            heapq.heappush(heap, (-step[0], key, step[1]))
    while heap:
        _, key, b = heapq.heappop(heap)
        extra = sizes[key][b] - sizes[key][bits[key]]
        if b <= bits[key]:
            continue
        if total + extra <= size_budget:
            bits[key] = b
            total += extra
        else:
            # too big a jump: try the next smaller width above the current one, if any
            smaller = [x for x in sorted(errors[key]) if bits[key] < x < b]
            if smaller:
                x = smaller[-1]
                gain = (errors[key][bits[key]] - errors[key][x]) / max(sizes[key][x] - sizes[key][bits[key]], 1)
                heapq.heappush(heap, (-gain, key, x))
            continue
        step = best_step(key)
        if step:
            heapq.heappush(heap, (-step[0], key, step[1]))
    return BitPlan(bits, total, sum(errors[k][b] for k, b in bits.items()))


def plan_expert_bits(checkpoint: Path, token_ids: list[int], size_budget: int, group_size: int = 64,
                     bits_options=CANDIDATE_BITS) -> BitPlan:
    errors, sizes = expert_errors(checkpoint, token_ids, bits_options, group_size)
    return allocate(errors, sizes, size_budget)


def calibration_token_ids(checkpoint: Path, calibration: str | Path | None, max_tokens: int = 8192) -> list[int]:
    """Token ids of the calibration text (a file, a folder, a dataset name, or the shipped set)."""
    from transformers import AutoTokenizer

    from .profile import load_calibration

    text = "\n\n".join(load_calibration(calibration))
    return AutoTokenizer.from_pretrained(str(checkpoint)).encode(text)[:max_tokens]
