"""The memory budget: one number covering resident weights, the KV cache, read buffers and the
expert cache, split up front so that the expert cache gets what is left.

`MemoryNeeds` is what a model holds besides its expert cache, computed once from its sizes (the
same function whether the model is loaded or only planned: `plan_memory` does not build it);
`MemoryNeeds.plan(budget)` splits a budget, or refuses one too small with the minimum it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...common.errors import OptionsError
from ...common.units import fmt_bytes

# KV cache kept in reserve by default: this many tokens of context (mlx-lm's --max-kv-size bounds
# the cache the same way; a longer context than the reserve would exceed the budget).
DEFAULT_KV_TOKENS = 4096


class BudgetError(OptionsError):
    """The memory budget cannot hold what the model needs; the message gives the minimum."""


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is split. All in bytes; budget_bytes and cache_bytes are None when unbounded."""

    budget_bytes: int | None
    resident_bytes: int
    kv_reserve_bytes: int
    kv_tokens: int
    buffer_bytes: int  # read buffers: one layer's routed experts in flight
    min_layer_bytes: int  # one layer's routed experts: the least the expert cache must hold
    cache_bytes: int | None  # what the expert cache gets (None: unbounded)
    expert_bytes: int  # every expert, in memory

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that runs: everything but the cache, and one layer's experts."""
        return self.resident_bytes + self.kv_reserve_bytes + self.buffer_bytes + self.min_layer_bytes

    @property
    def cache_share(self) -> float | None:
        """The share of all experts the expert cache holds (None: unbounded)."""
        if self.cache_bytes is None:
            return None
        return min(1.0, self.cache_bytes / self.expert_bytes) if self.expert_bytes else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "minimum_bytes": self.minimum_bytes, "cache_share": self.cache_share}


@dataclass(frozen=True)
class MemoryNeeds:
    resident_bytes: int  # resident weights, in the compute dtype
    kv_bytes_per_token: int
    kv_tokens: int
    layer_bytes: int  # the most one MoE layer's k largest experts take
    expert_bytes: int  # every expert, in the compute dtype

    @property
    def kv_reserve_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_tokens

    def budget_for_share(self, share: float) -> int:
        """The budget whose expert cache holds `share` of all experts (at least one layer's k)."""
        if not 0 < share <= 1:
            raise OptionsError(f"an expert cache share must be in (0, 1], got {share}")
        cache = max(self.layer_bytes, int(share * self.expert_bytes))
        return self.resident_bytes + self.kv_reserve_bytes + self.layer_bytes + cache

    def plan(self, budget: int | None) -> MemoryPlan:
        fixed = self.resident_bytes + self.kv_reserve_bytes + self.layer_bytes
        cache = None if budget is None else budget - fixed
        plan = MemoryPlan(budget, self.resident_bytes, self.kv_reserve_bytes, self.kv_tokens, self.layer_bytes,
                          self.layer_bytes, cache, self.expert_bytes)
        if budget is not None and budget < plan.minimum_bytes:
            raise BudgetError(
                f"memory budget {fmt_bytes(budget)} is too small: resident weights {fmt_bytes(self.resident_bytes)} + "
                f"KV cache reserve {fmt_bytes(self.kv_reserve_bytes)} ({self.kv_tokens} tokens) + read buffers "
                f"{fmt_bytes(self.layer_bytes)} + one layer's routed experts {fmt_bytes(self.layer_bytes)} need at "
                f"least {fmt_bytes(plan.minimum_bytes)} ({plan.minimum_bytes} bytes)"
            )
        return plan


def memory_needs(expert_sizes: dict[tuple[int, int], int], k: int, resident_bytes: int, config: dict,
                 itemsize: int, kv_tokens: int | None = None) -> MemoryNeeds:
    """expert_sizes: (layer, expert) -> bytes in memory; k: experts per token; itemsize: of the
    compute dtype (the KV cache's)."""
    kv_tokens = DEFAULT_KV_TOKENS if kv_tokens is None else kv_tokens
    if not isinstance(kv_tokens, int) or kv_tokens < 1:
        raise OptionsError(f"max_kv_size must be a positive number of tokens, got {kv_tokens!r}")
    return MemoryNeeds(resident_bytes, kv_bytes_per_token(config, itemsize), kv_tokens,
                       layer_bytes(expert_sizes, k), sum(expert_sizes.values()))


def layer_bytes(expert_sizes: dict[tuple[int, int], int], k: int) -> int:
    """The most one MoE layer's k largest experts take: what one forward pass must hold at once."""
    by_layer: dict[int, list[int]] = {}
    for (layer, _), n in expert_sizes.items():
        by_layer.setdefault(layer, []).append(n)
    return max((sum(sorted(v, reverse=True)[:k]) for v in by_layer.values()), default=0)


def kv_bytes_per_token(config: dict, itemsize: int) -> int:
    """An estimate from the config: keys and values of every attention layer (MLA and linear
    attention layers keep less, so this errs on the safe side)."""
    cfg = config.get("text_config", config)
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 0)
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1)))
    if cfg.get("kv_lora_rank"):  # MLA: mlx-lm caches the expanded keys and values per head
        head_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
        heads = int(cfg.get("num_attention_heads", 0))
    return 2 * layers * heads * int(head_dim) * itemsize
