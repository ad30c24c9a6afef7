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
from ..model.budget import layer_bytes, prefill_path
from ..model.streaming import PREFILL_ADMISSION, ExpertStreamer

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


# ---- prefill admission: what a long prompt leaves of the decode's hit rate


def decode_call(streamer: ExpertStreamer, layer: int, experts) -> None:
    """One decode call's distinct experts, as the streaming layer fetches them (no compute)."""
    for group in streamer.groups(layer, np.asarray(sorted(experts))):
        streamer.acquire(layer, group)
        streamer.release(layer, group)


def prefill_call(streamer: ExpertStreamer, layer: int, experts, last_use: dict[int, int] | None = None) -> None:
    """One prefill call's distinct experts through the streamer's prefill path: groups in layout
    order, what misses read, admitted by the streamer's prefill_admission rule (no compute);
    last_use (expert -> the last token position routing to it) for the "recent" rule."""
    if streamer.prefill_admission == "recent":
        streamer.admit_recent(layer, last_use)
    try:
        for group in streamer.prefill_groups(layer, streamer.layout_order(layer, experts)):
            r = streamer.prefill_start(layer, group)
            try:
                streamer.prefill_wait(r)
            finally:
                streamer.prefill_release(r)
    finally:
        streamer.admit_recent(layer, None)


def token_steps(t: TraceArrays) -> list[list[tuple[int, list[int]]]]:
    """Per token (in trace order, sequences one after another): (layer, distinct experts) per layer."""
    keys = t.token_keys()
    out: list[list[tuple[int, list[int]]]] = []
    last = None
    for key, layer, row in zip(keys.tolist(), t.layer.tolist(), t.experts.tolist(), strict=True):
        if key != last:
            out.append([])
            last = key
        out[-1].append((layer, sorted(set(row))))
    return out


def _prefill_tokens(streamer: ExpertStreamer, tokens: list[list[tuple[int, list[int]]]], chunk: int) -> None:
    """A prompt prefilled in chunks: per chunk, layer by layer, the union of its tokens' experts."""
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        last: dict[int, dict[int, int]] = {}  # layer -> expert -> the last position routing to it
        pairs: dict[int, int] = {}  # (token, expert) pairs per layer, as the layer routes them
        for t, token in enumerate(part):
            for layer, experts in token:
                last.setdefault(layer, {}).update((e, t) for e in experts)
                pairs[layer] = pairs.get(layer, 0) + len(experts)
        for layer in sorted(last):
            experts = sorted(last[layer])  # the layer's distinct experts in this chunk
            if prefill_path(len(part), pairs[layer]):  # where the layer takes its prefill path
                prefill_call(streamer, layer, experts, last[layer])
            else:
                decode_call(streamer, layer, experts)


def prefill_admission_replay(
    bundle: str | Path | Bundle,
    trace,
    rules: Iterable[str] = PREFILL_ADMISSION,
    budgets: Iterable[float] = (0.10, 0.25),
    policies: Iterable[str] = ("lru",),
    prompt_tokens: Iterable[int] = (16, 512),
    decode_tokens: int = 32,
    requests: int = 8,
    chunk: int = 2048,
    io_mode: str = "buffered",
    *,
    profile=None,
) -> list[dict]:
    """Decode hit rate after a prompt, per admission rule, policy, budget and prompt length.

    The trace's tokens are one stream. Each of `requests` windows decodes the same `decode_tokens`
    tokens after a prompt of each length (the tokens just before them), from a "cold" cache (empty)
    and a "warm" one (after the same request once: as `moestream bench` runs cold, then warm, and as
    a conversation's next turn finds the experts of the last). The hit rate counts the decode's
    lookups only; a rule that keeps the decode's experts gives the same after a long prompt as after
    a short one."""
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    steps = token_steps(trace_arrays(trace))
    lengths = sorted(prompt_tokens)
    short, longest = lengths[0], lengths[-1]
    span = short + decode_tokens + longest + decode_tokens  # warm request, prompt, decode
    if len(steps) < span:
        raise ValueError(f"the trace has {len(steps)} tokens; a request window needs {span}")
    starts = np.linspace(0, len(steps) - span, num=max(1, requests)).astype(int).tolist()
    sizer = BundleStore(b, None)
    sizes = {key: sizer.nbytes(*key) for key in b.extents}
    total, min_layer = sum(sizes.values()), layer_bytes(sizes, b.experts_per_token)
    rows = []
    with ExtentReader(io_mode=io_mode) as reader:
        store = ReplayStore(b, reader)
        for budget in budgets:
            capacity = max(int(budget * total), min_layer)
            for policy_name in policies:
                for rule in rules:
                    for warm in (False, True):
                        for n in lengths:
                            hits = lookups = 0
                            for s0 in starts:
                                policy = make_policy(policy_name, profile)
                                configure_policy(policy, capacity, lambda key: sizes[key], min_layer)
                                streamer = ExpertStreamer(store, ExpertCache(capacity, policy))
                                streamer.prefill_admission, streamer.prefill_room = rule, capacity
                                streamer.prefill_min_group_bytes = 0
                                decode_at = s0 + short + decode_tokens + longest
                                if warm:  # the same request before (as `moestream bench` runs cold, then warm)
                                    _prefill_tokens(streamer, steps[decode_at - n : decode_at], chunk)
                                    for token in steps[decode_at : decode_at + decode_tokens]:
                                        _prefill_tokens(streamer, [token], 1)
                                _prefill_tokens(streamer, steps[decode_at - n : decode_at], chunk)
                                c0 = streamer.cache.stats()
                                for token in steps[decode_at : decode_at + decode_tokens]:
                                    _prefill_tokens(streamer, [token], 1)
                                c1 = streamer.cache.stats()
                                hits += c1["cache_hits"] - c0["cache_hits"]
                                lookups += c1["cache_hits"] + c1["cache_misses"] - c0["cache_hits"] - c0["cache_misses"]
                            rows.append({"budget": budget, "policy": policy_name, "rule": rule,
                                         "start": "warm" if warm else "cold", "prompt_tokens": n,
                                         "decode_tokens": decode_tokens, "requests": len(starts),
                                         "capacity_bytes": capacity, "decode_hit_rate": hits / max(lookups, 1)})
    return rows


def format_admission_table(rows: list[dict]) -> str:
    """Decode hit rate per rule: after each prompt length, cold and warm, and long minus short."""
    lengths = sorted({r["prompt_tokens"] for r in rows})
    short, longest = lengths[0], lengths[-1]
    by = {(r["budget"], r["policy"], r["rule"], r["start"], r["prompt_tokens"]): r["decode_hit_rate"] for r in rows}
    head = f"{'budget':>6} {'policy':>6} {'rule':>5} " + " ".join(
        f"{start + ' ' + str(n):>10}" for start in ("cold", "warm") for n in lengths) + f" {'cold diff':>9} {'warm diff':>9}"
    lines = [head]
    for budget, policy, rule in dict.fromkeys((r["budget"], r["policy"], r["rule"]) for r in rows):
        cells = [by[(budget, policy, rule, start, n)] for start in ("cold", "warm") for n in lengths]
        diffs = [(by[(budget, policy, rule, start, longest)] - by[(budget, policy, rule, start, short)]) * 100
                 for start in ("cold", "warm")]
        lines.append(f"{budget:>6.0%} {policy:>6} {rule:>5} " + " ".join(f"{c:>10.3f}" for c in cells)
                     + "".join(f" {d:>+7.1f}pt" for d in diffs))
    return "\n".join(lines)
