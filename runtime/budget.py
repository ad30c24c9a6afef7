"""The memory budget: one number covering resident weights, the expert cache, the KV cache and
read buffers, split up front so that the expert cache gets what is left."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

# KV cache kept in reserve: this many tokens of context (the budget is checked at load, before
# anyone knows the prompt; a longer context may exceed the reserve).
KV_RESERVE_TOKENS = 4096


class BudgetError(ValueError):
    pass


def parse_bytes(value: int | float | str | None) -> int | None:
    """Bytes from an int or a string like "6GB", "6 GiB", "512MB", "1.5e9"; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value <= 0:
            raise BudgetError(f"a memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(f"cannot read {value!r} as a memory size; use e.g. 6GB, 800MB, 4GiB or a byte count")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise BudgetError(f"a memory size must be positive, got {value!r}")
    return n


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int | None
    resident_bytes: int
    kv_reserve_bytes: int
    buffer_bytes: int
    min_layer_bytes: int  # one layer's routed experts: the least the cache must hold
    cache_bytes: int | None  # what the expert cache gets (None: unbounded)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_budget(budget: int | None, resident: int, kv_reserve: int, buffers: int, min_layer: int) -> BudgetPlan:
    if budget is None:
        return BudgetPlan(None, resident, kv_reserve, buffers, min_layer, None)
    need = resident + kv_reserve + buffers + min_layer
    if budget < need:
        raise BudgetError(
            f"memory budget {fmt_bytes(budget)} is too small: resident weights {fmt_bytes(resident)} + "
            f"KV cache reserve {fmt_bytes(kv_reserve)} ({KV_RESERVE_TOKENS} tokens) + read buffers "
            f"{fmt_bytes(buffers)} + one layer's routed experts {fmt_bytes(min_layer)} need at least "
            f"{fmt_bytes(need)} ({need} bytes)"
        )
    return BudgetPlan(budget, resident, kv_reserve, buffers, min_layer, budget - resident - kv_reserve - buffers)


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
