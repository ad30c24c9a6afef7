"""Eviction policies of the expert cache, by name: "lru", "lfu", and those that use a routing profile.

Each implements expert_cache.py's CachePolicy protocol (on_insert, on_access, on_remove, victim).
Keys are (layer, expert), as ExpertStreamer uses them. A profile (per-layer expert frequency from
stages/profile.py, shipped in a profiled bundle's profile/) is what the profile policies know up
front; `make_policy(name, profile)` builds any of them by name.

- "lru"   least recently used first.
- "lfu"   least frequently used first, ties by recency.

- "hot"   pinned hot set: the hottest experts by profile frequency, as many as fit in `hot_fraction`
          of the cache (and never more than the cache minus one layer's working set), are evicted
          only when nothing else is evictable; everything else is LRU. Needs `configure(...)` with
          the cache's capacity and the experts' sizes to size the set (else `hot_count` keys).
- "prior" static frequency priority (the independent-reference-model optimum, "A0"): evict the
          cached expert with the lowest profile frequency, least recently used first among equals.
- "lrfu"  frequency prior plus decayed recency: score = prior_weight * p / (1 - decay) + sum over
          past uses of decay^(age in tokens); evict the lowest. The prior term is what an expert used
          at its profile rate p would have accumulated, so a cold start behaves like "prior" and
          observed bursts (a token reusing the previous token's experts) raise an expert above it.

Policies that take the cache's size expose `configure(capacity_bytes, nbytes, reserve_bytes=0)`;
`configure_policy` calls it once the cache is sized.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Protocol

import numpy as np

from ...common.errors import OptionsError
from ...manifests.profile import FREQUENCY_FILE, read_frequency, trace_arrays

PROFILE_POLICIES = ("hot", "prior", "lrfu")


class CachePolicy(Protocol):
    """Orders the keys of the cache for eviction. The cache calls on_insert/on_access/on_remove
    as keys come, are read and go; victim returns the key to evict next among those for which
    evictable(key) is true (pinned keys are not), or None if there is none."""

    def on_insert(self, key: Hashable) -> None: ...
    def on_access(self, key: Hashable) -> None: ...
    def on_remove(self, key: Hashable) -> None: ...
    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None: ...


class LRUPolicy:
    """Least recently used first; O(1) per operation (an OrderedDict, oldest first)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        del self._order[key]

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        # Pinned keys are few (one layer's experts, a hot set), so the scan stops early.
        return next((k for k in self._order if evictable(k)), None)


class LFUPolicy:
    """Least frequently used first, ties broken by recency (least recent first).
    Keys live in one OrderedDict per access count; a new key starts at count 1."""

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}

    def on_insert(self, key: Hashable) -> None:
        if key in self._count:
            self.on_access(key)
            return
        self._count[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None

    def on_access(self, key: Hashable) -> None:
        n = self._count[key]
        self._unlink(key, n)
        self._count[key] = n + 1
        self._buckets.setdefault(n + 1, OrderedDict())[key] = None

    def on_remove(self, key: Hashable) -> None:
        self._unlink(key, self._count.pop(key))

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        for n in sorted(self._buckets):
            k = next((k for k in self._buckets[n] if evictable(k)), None)
            if k is not None:
                return k
        return None

    def _unlink(self, key: Hashable, n: int) -> None:
        bucket = self._buckets[n]
        del bucket[key]
        if not bucket:
            del self._buckets[n]


BASE_POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy}


class FrequencyTable:
    """Per-(layer, expert) routing frequency: the share of tokens a layer routes to each expert."""

    def __init__(self, share: dict[int, np.ndarray], experts_per_token: int | None = None):
        self.share = {int(layer): np.asarray(v, dtype=np.float64) for layer, v in share.items()}
        self.experts_per_token = experts_per_token

    def get(self, key: Hashable) -> float:
        try:
            layer, expert = key
            return float(self.share[int(layer)][int(expert)])
        except (KeyError, IndexError, TypeError, ValueError):
            return 0.0

    def ranking(self) -> list[tuple[int, int]]:
        """Every (layer, expert), hottest first (ties: lower layer, then lower expert)."""
        keys = [(layer, e) for layer, v in self.share.items() for e in range(len(v))]
        vals = np.array([self.share[layer][e] for layer, e in keys])
        order = np.lexsort((np.array([e for _, e in keys]), np.array([layer for layer, _ in keys]), -vals))
        return [keys[i] for i in order]

    @classmethod
    def load(cls, profile) -> FrequencyTable:
        """From a FrequencyTable, a profile folder (frequency.parquet) or a bundle with one in
        profile/, a frequency.parquet file, a routing trace (table, path or TraceArrays), or
        {layer: [E] shares}."""
        if isinstance(profile, FrequencyTable):
            return profile
        if isinstance(profile, dict):
            return cls(profile)
        if isinstance(profile, (str, Path)):
            p = Path(profile)
            if p.is_dir():  # a profile folder, or a bundle with its profile/ folder
                freq = next((f for f in (p / FREQUENCY_FILE, p / "profile" / FREQUENCY_FILE) if f.is_file()), None)
                if freq is None:
                    raise FileNotFoundError(f"{p}: no {FREQUENCY_FILE} or profile/{FREQUENCY_FILE} "
                                            f"(not a moestream profile folder or a profiled bundle)")
                return cls(read_frequency(freq))
            if p.name == FREQUENCY_FILE:
                return cls(read_frequency(p))
        t = trace_arrays(profile)
        share = {}
        for layer in np.unique(t.layer).tolist():
            ex = t.experts[t.layer == layer]
            share[int(layer)] = np.bincount(ex.reshape(-1), minlength=t.num_experts) / max(len(ex), 1)
        return cls(share, t.k)


class HotSetPolicy:
    """Hot experts (from the profile) stay; the rest is LRU. See the module docstring."""

    def __init__(self, frequency: FrequencyTable, hot_fraction: float = 0.5, hot_count: int | None = None,
                 hot_keys=None):
        if not 0 <= hot_fraction <= 1:
            raise ValueError(f"hot_fraction must be in [0, 1], got {hot_fraction}")
        self.frequency = frequency
        self.hot_fraction = hot_fraction
        ranking = frequency.ranking()
        if hot_keys is not None:
            self.hot = set(hot_keys)
        else:
            self.hot = set(ranking[: hot_count or 0])
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # everything but the hot set
        self._hot: dict[Hashable, None] = {}  # cached hot keys

    def configure(self, capacity_bytes: int | None, nbytes: Callable[[Hashable], int], reserve_bytes: int = 0) -> None:
        """Size the hot set: hottest first while their bytes fit in hot_fraction * capacity and in
        capacity - reserve_bytes (reserve: one layer's routed experts, which must always fit)."""
        if capacity_bytes is None:  # unbounded cache: nothing is ever evicted
            return
        room = min(self.hot_fraction * capacity_bytes, capacity_bytes - reserve_bytes)
        hot, used = set(), 0
        for key in self.frequency.ranking():
            if self.frequency.get(key) <= 0:
                break
            size = nbytes(key)
            if used + size > room:
                break
            hot.add(key)
            used += size
        self._set_hot(hot)

    def _set_hot(self, hot: set) -> None:
        cached = list(self._lru) + list(self._hot)
        self.hot = hot
        self._lru.clear()
        self._hot.clear()
        for k in cached:
            self.on_insert(k)

    def _bucket(self, key: Hashable) -> OrderedDict:
        return self._hot if key in self.hot else self._lru

    def on_insert(self, key: Hashable) -> None:
        if key in self.hot:
            self._hot[key] = None
        else:
            self._lru[key] = None
            self._lru.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        if key not in self.hot:
            self._lru.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        del self._bucket(key)[key]

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        k = next((k for k in self._lru if evictable(k)), None)
        if k is None:  # only when the hot set plus the pinned working set fill the cache: coldest hot first
            k = next((k for k in sorted(self._hot, key=lambda k: (self.frequency.get(k), k)) if evictable(k)), None)
        return k


class _Indexed:
    """Dense per-key arrays for scored policies: keys get small integer slots on first sight."""

    def __init__(self, frequency: FrequencyTable):
        self.frequency = frequency
        self._slot: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []
        self.prior = np.zeros(64)
        self.cached = np.zeros(64, bool)

    def slot(self, key: Hashable) -> int:
        i = self._slot.get(key)
        if i is None:
            i = self._slot[key] = len(self._keys)
            self._keys.append(key)
            if i >= len(self.prior):
                self._grow(2 * len(self.prior))
            self.prior[i] = self.frequency.get(key)
        return i

    def _grow(self, n: int) -> None:
        for name in self._array_names():
            a = getattr(self, name)
            b = np.zeros(n, a.dtype)
            b[: len(a)] = a
            setattr(self, name, b)

    def _array_names(self) -> tuple[str, ...]:
        return ("prior", "cached")

    def _pick(self, order: np.ndarray, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        for i in order.tolist():
            key = self._keys[i]
            if evictable(key):
                return key
        return None


class FrequencyPriorPolicy(_Indexed):
    """Evict the lowest profile frequency; among equals, least recently used."""

    def __init__(self, frequency: FrequencyTable):
        super().__init__(frequency)
        self.last = np.zeros(64, np.int64)
        self.clock = 0

    def _array_names(self) -> tuple[str, ...]:
        return ("prior", "cached", "last")

    def _touch(self, key: Hashable) -> None:
        i = self.slot(key)
        self.clock += 1
        self.last[i] = self.clock
        self.cached[i] = True

    on_insert = on_access = _touch

    def on_remove(self, key: Hashable) -> None:
        self.cached[self.slot(key)] = False

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        idx = np.flatnonzero(self.cached[: len(self._keys)])
        order = idx[np.lexsort((self.last[idx], self.prior[idx]))]
        return self._pick(order, evictable)


class LRFUPolicy(_Indexed):
    """Frequency prior plus exponentially decayed use counts; see the module docstring.

    Time is counted in tokens per layer: each layer's clock advances by 1/k per use (a token routes
    k experts in a layer), so decay**age means "per token" whatever the layer count.
    half_life: tokens after which a use counts half. prior_weight: how much the profile counts
    against what is observed (1: as much as a steady history at the profile rate)."""

    def __init__(self, frequency: FrequencyTable, half_life: float = 4.0, prior_weight: float = 1.0,
                 experts_per_token: int | None = None):
        super().__init__(frequency)
        if half_life <= 0:
            raise ValueError("half_life must be > 0")
        self.decay = 0.5 ** (1.0 / half_life)
        self.prior_weight = prior_weight
        self.k = experts_per_token or frequency.experts_per_token or 8
        self.count = np.zeros(64)
        self.stamp = np.zeros(64)
        self.layer_of = np.zeros(64, np.int64)
        self._clock: dict[int, float] = {}
        self._layer_slot: dict[Hashable, int] = {}

    def _array_names(self) -> tuple[str, ...]:
        return ("prior", "cached", "count", "stamp", "layer_of")

    def _layer(self, key: Hashable) -> int:
        layer = key[0] if isinstance(key, tuple) and key else key
        s = self._layer_slot.get(layer)
        if s is None:
            s = self._layer_slot[layer] = len(self._layer_slot)
            self._clock[s] = 0.0
        return s

    def _touch(self, key: Hashable) -> None:
        i = self.slot(key)
        s = self._layer(key)
        now = self._clock[s] = self._clock[s] + 1.0 / self.k
        self.count[i] = self.count[i] * self.decay ** (now - self.stamp[i]) + 1.0
        self.stamp[i] = now
        self.layer_of[i] = s
        self.cached[i] = True

    on_insert = on_access = _touch

    def on_remove(self, key: Hashable) -> None:
        self.cached[self.slot(key)] = False

    def scores(self, idx: np.ndarray) -> np.ndarray:
        clocks = np.array([self._clock[s] for s in range(len(self._clock))])
        age = clocks[self.layer_of[idx]] - self.stamp[idx]
        return self.prior_weight * self.prior[idx] / (1.0 - self.decay) + self.count[idx] * self.decay**age

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        idx = np.flatnonzero(self.cached[: len(self._keys)])
        order = idx[np.lexsort((self.stamp[idx], self.scores(idx)))]
        return self._pick(order, evictable)


def policy_names() -> list[str]:
    return sorted(set(BASE_POLICIES) | set(PROFILE_POLICIES))


def make_policy(name: str | CachePolicy, profile=None, **options) -> CachePolicy:
    """A cache policy by name: "lru", "lfu" or a profile policy ("hot", "prior",
    "lrfu"), which need `profile` (anything FrequencyTable.load takes). options go to the policy's
    constructor (e.g. hot_fraction=0.5, half_life=4.0). A policy object is returned as is."""
    if not isinstance(name, str):
        return name
    if name in BASE_POLICIES:
        if options:
            raise TypeError(f"policy {name!r} takes no options, got {sorted(options)}")
        return BASE_POLICIES[name]()
    if name not in PROFILE_POLICIES:
        raise OptionsError(f"unknown cache policy {name!r}; known: {', '.join(policy_names())}")
    if profile is None:
        raise OptionsError(f"cache policy {name!r} needs a routing profile (a bundle prepared with profiling, "
                         f"or a profile folder / trace); use 'lru' or 'lfu' without one")
    freq = FrequencyTable.load(profile)
    if name == "hot":
        return HotSetPolicy(freq, **options)
    if name == "prior":
        return FrequencyPriorPolicy(freq, **options)
    return LRFUPolicy(freq, **options)


def configure_policy(policy: CachePolicy, capacity_bytes: int | None, nbytes: Callable[[Hashable], int],
                     reserve_bytes: int = 0) -> None:
    """Tell a policy the cache's size, if it wants to know (a no-op for the others)."""
    configure = getattr(policy, "configure", None)
    if configure is not None:
        configure(capacity_bytes, nbytes, reserve_bytes)

