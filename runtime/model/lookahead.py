"""Router lookahead: predict layer l+1's experts from layer l's MoE input, by applying layer l+1's
own router to it (hidden states change little from one layer to the next), so that their reads
can start early (prefetch). How good the prediction is: measure/lookahead.py."""

from __future__ import annotations

import mlx.core as mx

from .modules import module_at, moe_block


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




def enable_lookahead(model, layers: dict[int, str], streamer) -> None:
    """Give each MoE layer the next MoE layer's router, so it can prefetch that layer's experts."""
    order = sorted(layers)
    for layer, following in zip(order, order[1:], strict=False):
        route = router_of(moe_block(model, layers[following]))
        if route is not None:
            object.__setattr__(module_at(model, layers[layer])[2], "lookahead", (following, route))
    streamer.enable_prefetch()
