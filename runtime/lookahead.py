"""Router lookahead: predict layer l+1's experts from layer l's MoE input, by applying layer l+1's
own router to it (hidden states change little from one layer to the next). Used to start reads
early (prefetch), and measured here: recall (share of the next layer's routed experts that were
predicted) and waste (predicted experts that were not routed, per useful one)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


def router_of(block):
    """A function x -> top-k expert indices for an mlx-lm MoE block, or None if unknown.

    Logit order is what matters for top-k, so the family's softmax/sigmoid/normalisation can be
    skipped where it is monotonic; DeepSeek-style gates (groups, correction bias) are called whole.
    """
    gate = getattr(block, "gate", None) or getattr(block, "router", None)
    k_attr = next((a for a in ("top_k", "num_experts_per_tok") if isinstance(getattr(block, a, None), int)), None)
    if gate is None:
        return None
    if hasattr(gate, "e_score_correction_bias"):  # deepseek MoEGate returns (indices, scores)
        return lambda x: gate(x)[0]
    if k_attr is None:
        return None

    def route(x):
        k = getattr(block, k_attr)
        logits = gate(x)
        return mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]

    return route


@dataclass
class LookaheadStats:
    predicted: int = 0
    routed: int = 0
    hits: int = 0

    @property
    def recall(self) -> float:
        return self.hits / self.routed if self.routed else 0.0

    @property
    def waste_per_useful(self) -> float:
        return (self.predicted - self.hits) / self.hits if self.hits else float("inf")

    def as_dict(self) -> dict:
        return {"predicted": self.predicted, "routed": self.routed, "hits": self.hits, "recall": self.recall,
                "wasted_per_useful": self.waste_per_useful}


def measure_lookahead(model, token_ids: list[int], window: int = 256) -> LookaheadStats:
    """Run text through a moestream-loaded model; at each MoE layer predict the next MoE layer's
    experts per token with that layer's router, and compare with what it then routes."""
    from .load import resolve_module, runtime_of

    rt = runtime_of(model)
    layers = sorted(rt.store.layers)
    routers = {layer: router_of(resolve_module(model, rt.store.layers[layer].rpartition(".")[0])) for layer in layers}
    nxt = dict(zip(layers, layers[1:], strict=False))
    pending: dict[int, np.ndarray] = {}
    stats = LookaheadStats()

    def observe(layer, x, indices):
        routed = np.array(indices).reshape(-1, indices.shape[-1])
        if layer in pending:
            predicted = pending.pop(layer)
            for p, r in zip(predicted, routed, strict=True):
                p, r = set(p.tolist()), set(r.tolist())
                stats.predicted += len(p)
                stats.routed += len(r)
                stats.hits += len(p & r)
        following = nxt.get(layer)
        if following is not None and routers[following] is not None:
            pending[following] = np.array(routers[following](x)).reshape(routed.shape[0], -1)

    rt.streamer.observers.append(observe)
    try:
        for start in range(0, len(token_ids), window):
            chunk = token_ids[start : start + window]
            if chunk:
                pending.clear()
                mx.eval(model(mx.array([chunk])))
    finally:
        rt.streamer.observers.remove(observe)
    return stats
