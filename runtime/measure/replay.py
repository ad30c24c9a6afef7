"""Replay a routing trace through the real cache and reader, without computing anything.

For every token (in trace order) and MoE layer, the distinct routed experts go through the same
`ExpertStreamer.acquire`/`release` the streaming layer uses: cache lookups (hits, misses, pins), one
batched read of the missed experts' extents through `ExtentReader` (sorted, coalesced, O_DIRECT or
buffered), inserts and evictions by the policy under test. Only decoding and matmuls are skipped:
the bytes are read and dropped, so the figures are the I/O a generation with that routing would do.

Budgets are fractions of the bundle's expert bytes (the decoded sizes the cache accounts, in the
bundle's own dtypes). A budget below one layer's k largest experts is raised to that (as the
runtime's budget planner would refuse it) and the row says `clamped`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

import numpy as np

from ...manifests.open import Bundle, open_bundle
from ...manifests.profile import TraceArrays, trace_arrays
from ..cache.expert_cache import ExpertCache
from ..cache.policies import configure_policy, make_policy
from ..io.pagecache import evict_page_cache
from ..io.reader import ExtentReader, ReadRequest
from ..io.stores import BundleStore
from ..model.budget import layer_bytes
from ..model.streaming import ExpertStreamer

DEFAULT_BUDGETS = (0.05, 0.10, 0.25, 0.50)
DEFAULT_POLICIES = ("lru", "lfu", "hot", "prior", "lrfu")
_PRESENT = True  # what the replay cache holds instead of tensors


class ReplayStore(BundleStore):
    """A BundleStore whose read() does the I/O exactly as BundleStore.read does (same requests, one
    reader call per batch) but does not decode: it returns a placeholder per expert."""

    def read(self, layer: int, experts: list[int]) -> dict[int, object]:
        extents = sorted((self.bundle.extent(layer, e) for e in experts), key=lambda x: (x.file, x.offset))
        requests = [ReadRequest(str(self.bundle.path(x.file)), x.offset, x.nbytes, x.label) for x in extents]
        views = self.reader.read(requests)
        del views  # the buffers go back to the reader's pool
        return {x.expert: _PRESENT for x in extents}


class BeladyPolicy:
    """Offline reference ("opt"): evict the cached expert whose next use is farthest in the future.
    Needs the whole trace; the replay advances `now` (the step index) before each layer step."""

    def __init__(self, uses: dict[Hashable, list[int]]):
        self.uses = uses
        self.now = 0
        self._cached: set[Hashable] = set()

    def next_use(self, key: Hashable) -> float:
        steps = self.uses.get(key, ())
        i = bisect.bisect_right(steps, self.now)
        return steps[i] if i < len(steps) else float("inf")

    def on_insert(self, key: Hashable) -> None:
        self._cached.add(key)

    def on_access(self, key: Hashable) -> None:
        pass

    def on_remove(self, key: Hashable) -> None:
        self._cached.discard(key)

    def victim(self, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        best, best_t = None, -1.0
        for key in self._cached:
            if evictable(key):
                t = self.next_use(key)
                if t > best_t or (t == best_t and key < best):
                    best, best_t = key, t
        return best


def routing_steps(t: TraceArrays) -> list[tuple[int, list[int]]]:
    """(layer, distinct routed experts sorted) per row, in trace order (token-major)."""
    ex = np.sort(t.experts, axis=1)
    out = []
    for layer, row in zip(t.layer.tolist(), ex.tolist(), strict=True):
        out.append((layer, sorted(set(row))))
    return out


def _uses(steps: list[tuple[int, list[int]]]) -> dict[Hashable, list[int]]:
    uses: dict[Hashable, list[int]] = {}
    for i, (layer, experts) in enumerate(steps):
        for e in experts:
            uses.setdefault((layer, e), []).append(i)
    return uses


def replay(
    bundle: str | Path | Bundle,
    trace,
    budgets: Iterable[float] = DEFAULT_BUDGETS,
    policies: Iterable[str] = DEFAULT_POLICIES,
    io_mode: str = "direct",
    *,
    profile=None,
    policy_options: dict[str, dict] | None = None,
    io_threads: int | None = None,
    coalesce_gap: int = 0,
    max_tokens: int | None = None,
    drop_page_cache: bool = True,
) -> list[dict]:
    """One dict per (budget, policy): hit rate, bytes read, reads, mean read size, GB/s, time.

    trace: a routing trace (table, Parquet path or TraceArrays), replayed token by token.
    policies: names for cache.policies.make_policy ("lru", "lfu", "hot", "prior", "lrfu") and
    "opt" (Belady's offline optimum, a reference only). The profile policies need `profile`: the
    calibration profile (folder, frequency table or trace), not the trace being replayed.
    coalesce_gap: as ExtentReader's (load() uses 0). drop_page_cache: in buffered mode, evict the
    layer files from the page cache before each run so reads are cold."""
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    t = trace_arrays(trace)
    if max_tokens is not None:
        keys = t.token_keys()
        keep = np.isin(keys, np.unique(keys)[:max_tokens])
        t = TraceArrays(t.seq[keep], t.token[keep], t.layer[keep], t.experts[keep], None, None, t.num_experts, t.layers)
    bad_layers = sorted(set(np.unique(t.layer).tolist()) - set(b.layers))
    if bad_layers:
        raise ValueError(f"the trace has MoE layers {bad_layers[:8]} that the bundle does not ({sorted(b.layers)[:8]}...)")
    if len(t) and t.experts.max() >= b.num_experts:
        raise ValueError(f"the trace routes to expert {int(t.experts.max())}; the bundle has {b.num_experts}")
    steps = routing_steps(t)
    tokens = t.tokens
    sizer = BundleStore(b, None)
    sizes = {key: sizer.nbytes(*key) for key in b.extents}
    total = sum(sizes.values())
    k = t.k or b.experts_per_token
    min_layer = layer_bytes(sizes, k)
    uses = _uses(steps) if "opt" in policies else None
    results = []
    for budget in budgets:
        capacity = int(budget * total)
        clamped = capacity < min_layer
        capacity = max(capacity, min_layer)
        for name in policies:
            opts = (policy_options or {}).get(name, {})
            policy = BeladyPolicy(uses) if name == "opt" else make_policy(name, profile, **opts)
            configure_policy(policy, capacity, lambda key: sizes[key], min_layer)
            results.append(_run(b, steps, tokens, policy, name, budget, capacity, clamped, io_mode, io_threads,
                                coalesce_gap, drop_page_cache))
    return results


def _run(b: Bundle, steps, tokens, policy, name, budget, capacity, clamped, io_mode, io_threads, coalesce_gap,
         drop_page_cache) -> dict:
    if io_mode == "buffered" and drop_page_cache:
        evict_page_cache(sorted({b.path(x.file) for x in b.extents.values()}))
    with ExtentReader(io_mode=io_mode, threads=io_threads, coalesce_gap=coalesce_gap) as reader:
        cache = ExpertCache(capacity, policy)
        streamer = ExpertStreamer(ReplayStore(b, reader), cache)
        opt = isinstance(policy, BeladyPolicy)
        start = time.perf_counter()
        for i, (layer, experts) in enumerate(steps):
            if opt:
                policy.now = i
            for group in streamer.groups(layer, np.asarray(experts)):
                streamer.acquire(layer, group)
                streamer.release(layer, group)
        elapsed = time.perf_counter() - start
        r, c = reader.stats(), cache.stats()
    lookups = c["cache_hits"] + c["cache_misses"]
    return {
        "budget": budget,
        "policy": name,
        "capacity_bytes": capacity,
        "clamped": clamped,
        "tokens": tokens,
        "layer_steps": len(steps),
        "lookups": lookups,
        "hits": c["cache_hits"],
        "misses": c["cache_misses"],
        "hit_rate": c["hit_rate"],
        "evictions": c["evictions"],
        "bytes_read": r["bytes_read"],
        "requested_bytes": r["requested_bytes"],
        "reads": r["reads"],
        "mean_read_bytes": r["mean_read_bytes"],
        "reads_per_token": r["reads"] / tokens if tokens else 0.0,
        "bytes_per_token": r["bytes_read"] / tokens if tokens else 0.0,
        "io_wait_s": r["io_wait_s"],
        "time_s": elapsed,
        "read_gbps": r["bytes_read"] / r["io_wait_s"] / 1e9 if r["io_wait_s"] > 0 else 0.0,
        "io_mode": r["io_mode"],
    }


def format_table(rows: list[dict]) -> str:
    """A plain-text table of replay results, one line per (budget, policy)."""
    head = f"{'budget':>6} {'policy':>6} {'hit rate':>8} {'vs lru':>7} {'MB read':>9} {'reads/tok':>9} " \
           f"{'MB/read':>8} {'GB/s':>6} {'time s':>7}"
    lines = [head]
    lru = {r["budget"]: r["hit_rate"] for r in rows if r["policy"] == "lru"}
    for r in rows:
        base = lru.get(r["budget"])
        delta = f"{(r['hit_rate'] - base) * 100:+.1f}pt" if base is not None else ""
        lines.append(
            f"{r['budget']:>6.0%} {r['policy']:>6} {r['hit_rate']:>8.3f} {delta:>7} {r['bytes_read'] / 1e6:>9.1f} "
            f"{r['reads_per_token']:>9.2f} {r['mean_read_bytes'] / 1e6:>8.3f} {r['read_gbps']:>6.2f} {r['time_s']:>7.2f}"
            + (" (clamped)" if r["clamped"] else "")
        )
    return "\n".join(lines)
