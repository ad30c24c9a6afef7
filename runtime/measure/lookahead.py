"""How well router lookahead predicts the next MoE layer's experts (model/lookahead.py): recall
(share of the next layer's routed experts that were predicted) and waste (predicted experts that
were not routed, per useful one)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..model.load import runtime_of
from ..model.lookahead import router_of
from ..model.modules import moe_block


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
    rt = runtime_of(model)
    layers = sorted(rt.store.layers)
    routers = {layer: router_of(moe_block(model, rt.store.layers[layer])) for layer in layers}
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
