"""The expert cache: holds decoded experts in memory, bounded in bytes, with a pluggable policy.

The byte bound is part of one memory budget (resident weights, KV cache, buffers, this cache), so
the cache never exceeds it: when everything evictable is pinned and a new item does not fit, it
raises instead of growing, because that means the caller sized the budget wrong.

Pins are counted (pin twice, unpin twice) so that independent users (the layer being computed,
a hot set from the profile) can pin the same expert. A key may be pinned before it is inserted.

A policy only orders keys; the cache owns values, sizes, pins and the byte accounting. Policies
(LRU, LFU and those that use a routing profile) are in policies.py.

The capacity may change while items are cached (`set_capacity`): shrinking it evicts, as a put
would, until what is cached fits (the memory budget lends the cache a prefill's room while no
prefill runs, and takes it back before one).

Probation: an item put with `probation=True` (an expert a long prompt's prefill read once) is
evicted before anything the policy orders, oldest first, until a lookup hits it; then it is an
ordinary item. `free_bytes()` is the room left without evicting anything.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable
from typing import Any

from ...common.errors import MoestreamError
from .policies import CachePolicy, make_policy


class CacheFullError(MoestreamError, RuntimeError):
    """Nothing evictable is left and the new item still does not fit."""


class ExpertCache:
    def __init__(self, capacity_bytes: int | None, policy: str | CachePolicy = "lru"):
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes  # None: unbounded
        self.policy = make_policy(policy)
        self._values: dict[Hashable, Any] = {}
        self._sizes: dict[Hashable, int] = {}
        self._pins: Counter[Hashable] = Counter()
        self._probation: OrderedDict[Hashable, None] = OrderedDict()  # evicted first, oldest first
        self._lock = threading.RLock()  # the reader threads never touch the cache; one lock
        self._bytes = self._pinned_bytes = self._peak = 0
        self._hits = self._misses = self._evictions = 0

    # ---- lookups ----------------------------------------------------------------------------

    def get(self, key: Hashable) -> Any | None:
        """The cached value, or None; counts a hit or a miss."""
        with self._lock:
            if key not in self._values:
                self._misses += 1
                return None
            self._hits += 1
            self._probation.pop(key, None)  # used again: an ordinary item from now on
            self.policy.on_access(key)
            return self._values[key]

    def peek(self, key: Hashable) -> Any | None:
        """The cached value or None, counting nothing and leaving the policy's order alone."""
        with self._lock:
            return self._values.get(key)

    def record_hits(self, n: int) -> None:
        """Count n hits served outside get() (e.g. from a layer held whole)."""
        with self._lock:
            self._hits += n

    def __contains__(self, key: Hashable) -> bool:  # no hit/miss counted
        with self._lock:
            return key in self._values

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    # ---- insertion and eviction -------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """Bytes that fit without evicting anything (None: unbounded)."""
        with self._lock:
            return None if self.capacity_bytes is None else max(0, self.capacity_bytes - self._bytes)

    def put(self, key: Hashable, value: Any, nbytes: int, probation: bool = False) -> None:
        """Insert or replace; evicts (items on probation first, then by policy) until the item
        fits. probation: a new item goes on probation (see the module docstring)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            cap = self.capacity_bytes
            if cap is not None and nbytes > cap:
                raise ValueError(f"item {key!r} of {nbytes} bytes is larger than the whole "
                                 f"cache ({cap} bytes)")
            old = self._sizes.get(key, 0)
            self._make_room(key, nbytes - old)
            if key in self._values:
                self.policy.on_access(key)
            else:
                self.policy.on_insert(key)
                if probation:
                    self._probation[key] = None
            self._values[key], self._sizes[key] = value, nbytes
            self._account(key, nbytes - old)

    def set_capacity(self, capacity_bytes: int | None) -> int:
        """Change the byte bound (None: unbounded). Below what is cached, items are evicted first
        (probation first, then by policy, never a pinned one) until the rest fits; CacheFullError,
        with nothing changed, if the pinned items alone do not. Returns the bytes evicted."""
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        with self._lock:
            before = self._bytes
            if capacity_bytes is not None and self._bytes > capacity_bytes:
                if self._pinned_bytes > capacity_bytes:
                    raise CacheFullError(f"cannot shrink the cache to {capacity_bytes} bytes: {self._pinned_bytes} "
                                         f"bytes of it are pinned")
                self._evict_until(capacity_bytes, None)
            self.capacity_bytes = capacity_bytes
            return before - self._bytes

    def discard(self, key: Hashable) -> None:
        """Drop a key if present (not counted as an eviction)."""
        with self._lock:
            if key in self._values:
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._values):
                self._remove(key)

    def _make_room(self, key: Hashable, extra: int) -> None:
        cap = self.capacity_bytes
        if cap is None or self._bytes + extra <= cap:
            return
        # Check first, so a put that cannot succeed leaves the cache untouched.
        own = self._sizes.get(key, 0) if not self._pins[key] else 0
        evictable = self._bytes - self._pinned_bytes - own
        if self._bytes - evictable + extra > cap:
            raise CacheFullError(
                f"cannot fit {key!r} ({extra} more bytes): capacity {cap}, in use {self._bytes}, "
                f"pinned {self._pinned_bytes}; everything evictable is not enough - the memory "
                f"budget is too small for the pinned experts (unpin or raise the budget)"
            )
        self._evict_until(cap - extra, key)

    def _evict_until(self, limit: int, key: Hashable | None) -> None:
        """Evict (probation first, then by policy; never `key` or a pinned item) until at most
        `limit` bytes are cached. The caller checked that the unpinned items suffice."""
        while self._bytes > limit:
            victim = next((k for k in self._probation if k != key and not self._pins[k]), None)
            if victim is None:
                victim = self.policy.victim(lambda k: k != key and not self._pins[k])
            if victim is None:  # only a policy that lost track of its keys gets here
                raise CacheFullError(f"policy {self.policy!r} found no victim for {key!r}")
            self._remove(victim)
            self._evictions += 1

    def _remove(self, key: Hashable) -> None:
        self._probation.pop(key, None)
        self.policy.on_remove(key)
        del self._values[key]
        self._account(key, -self._sizes.pop(key))

    def _account(self, key: Hashable, delta: int) -> None:
        self._bytes += delta
        if self._pins[key]:
            self._pinned_bytes += delta
        self._peak = max(self._peak, self._bytes)

    # ---- pins -------------------------------------------------------------------------------

    def pin(self, key: Hashable) -> None:
        """Never evict key until unpinned (counted: n pins need n unpins)."""
        with self._lock:
            self._pins[key] += 1
            if self._pins[key] == 1:
                self._pinned_bytes += self._sizes.get(key, 0)

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            if not self._pins[key]:
                del self._pins[key]
                raise KeyError(f"{key!r} is not pinned")
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
                self._pinned_bytes -= self._sizes.get(key, 0)

    # ---- stats ------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero the counters; the peak restarts from what is cached now."""
        with self._lock:
            self._hits = self._misses = self._evictions = 0
            self._peak = self._bytes

    def stats(self) -> dict:
        with self._lock:
            lookups = self._hits + self._misses
            return {
                "cache_hits": self._hits,
                "cache_misses": self._misses,
                "hit_rate": self._hits / lookups if lookups else 0.0,
                "expert_cache_bytes": self._bytes,
                "expert_cache_peak_bytes": self._peak,
                "expert_cache_items": len(self._values),
                "pinned_bytes": self._pinned_bytes,
                "probation_items": len(self._probation),
                "evictions": self._evictions,
                "capacity_bytes": self.capacity_bytes,
            }
