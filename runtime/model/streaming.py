"""The streaming MoE layer: a drop-in for mlx-lm's SwitchGLU that fetches routed experts.

mlx-lm builds the model (router, score weighting, shared experts: all its own code); we swap
each `SwitchGLU` for `StreamingSwitchGLU`, whose call `(x, indices) -> [..., k, H]` reads the
distinct routed experts (each once per call, prefill included) through the expert cache and
runs the same `gather_qmm` / `gather_mm` math on just those experts, so the result equals
mlx-lm's with the same weights fully in memory.

A prefill (a call over many tokens of a sequence) takes another path: its distinct experts are
split into groups in layout order (file, offset: experts that fire together sit side by side, so
a group's reads coalesce), and groups i+1 and i+2 are read on background threads while group i
computes (the second read queued behind the first, so the disk goes on from one to the next).
Its experts are held outside the expert cache, in the room the memory plan keeps for them
(`MemoryPlan.prefill_room_bytes`): groups of `budget.prefill_group_bytes`, the rule by which the plan
counts PREFILL_GROUPS_HELD of them, never more than that share of the room each; and admitted into
the cache by a rule (`PREFILL_ADMISSION`): by default only into free room, the experts the prompt's
latest tokens used first, so that a long prompt does not evict the experts the decode keeps hot.
A long call's first group is read before its routing is known, while the computation before the
routing (the layer's attention) runs (`prefill_speculate`).

The expert cache borrows the room a prefill chunk would use while none runs: before a forward pass
computes anything (at its first MoE layer, before the host sync that evaluates it), the streamer
sizes the cache and the prefill room for that pass's tokens and the path it takes (the pipeline
or not: `MemoryPlan.cache_bytes_for`, `prefill_room_for`). A decode step lets the cache grow to
`MemoryPlan.decode_cache_bytes`; a prefill chunk shrinks it to what the chunk leaves, evicting the
least valuable experts by the policy, and returns MLX's freed buffers, so that the chunk's
activations and the experts it holds find their room.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

from ..cache.expert_cache import CacheFullError, ExpertCache
from ..io.stores import ProjectionQuant
from ..io.workers import shared_pool

# the pipeline's rules: the plan counts by them
from .budget import PREFILL_GROUPS_HELD, prefill_group_bytes, prefill_path

# What becomes of the experts a prefill reads (experts it finds cached are used and stay):
# "recent" cached only where the cache has free room (never evicting anything), and of a call that
#         routes to more than its layer's share of that room (the free room over the MoE layers from
#         this one on), only the experts its latest tokens routed to: the decode continues from the
#         prompt's end. The default. A long prompt after a decode leaves the decode's experts cached
#         (the cache is full); at a cold start it caches what the prompt's end used.
#         bench/prefill_admission.py (a real routing trace, small preset, budgets 25/50%, LRU and
#         LFU): decode hit rate after a 512- or 2048-token prompt minus after a 4-token one, from an
#         empty cache +0.2 to +1.5 points ("free" -0.8 to -2.3, "all" -1.4 to -3.3); the request run
#         again +0.1 to +2.5 ("free" +0.1 to +1.6, "all" -0.3 to -3.7). bench/results/prefill_admission.json.
# "free"  cached only where the cache has free room, whatever the call reads first (layout order).
# "all"   cached like a decode's experts (evicting by policy): what the runtime did before; a long
#         prompt flushes the decode's hot set.
# "tail"  cached on probation: evicted before anything else until a lookup hits it.
# "none"  never cached.
PREFILL_ADMISSION = ("recent", "free", "all", "tail", "none")

# A prefill call reads its first group before its routing is known (prefill_speculate) only where
# uniform routing would reach at least this share of the layer's experts (a 512-token prompt on the
# 397B's shapes reaches 91% of them, a 2,048-token one 98%): the experts read but not routed to are
# dropped, so a call that routes to few of them would read for nothing.
SPECULATE_COVERAGE = 0.8


class _PrefillRead:
    """One prefill group: its experts found cached (pinned), the rest being read."""

    __slots__ = ("layer", "group", "got", "missing", "miss_bytes", "future", "pinned", "span")

    def __init__(self, layer: int, group: list[int], got: dict, missing: list[int], miss_bytes: int):
        self.layer, self.group, self.got, self.missing, self.miss_bytes = layer, group, got, missing, miss_bytes
        self.future = None
        self.pinned = list(got)  # released once the group is stacked
        self.span = None  # (start, end) of its read on the perf_counter clock, once read


class ExpertStreamer:
    """Store + cache: hands out one layer's experts, pinned while that layer computes."""

    def __init__(self, store, cache: ExpertCache, num_experts: int | None = None):
        self.store, self.cache, self.num_experts = store, cache, num_experts
        # layers held whole (unbounded cache, every expert loaded): one stacked tensor per name,
        # used with the router's own indices like mlx-lm's SwitchGLU, with no per-call stacking
        self.whole: dict[int, tuple[dict[str, mx.array], dict[str, ProjectionQuant]]] = {}
        # wall time per phase, summed over layers and calls (host clocks: each phase ends in a sync)
        self.sync_s = 0.0  # waiting for the router's indices (the host sync; includes attention compute)
        # split_phases: sync on the MoE input first, so attention (everything before the block's
        # input) and routing are timed apart; a second host sync per layer, for benchmarks only
        self.split_phases = False
        self.attention_s = 0.0
        self.fetch_s = 0.0  # cache lookups + reading missed experts + turning bytes into arrays
        self.compute_s = 0.0  # the expert matmuls of the routed experts
        self.calls = 0
        # callables (layer, x [..., H], indices [..., k]) told of every call: profiling, calibration
        self.observers: list = []
        # prefetch (router lookahead): reads of the next layer's predicted experts, issued once this
        # layer's own reads are done so that they use the disk while this layer computes
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._inflight: dict = {}
        self._prefetched: set = set()
        self._lock = threading.Lock()
        self.prefetch_issued = self.prefetch_used = 0
        # prefill: read the next groups while one computes (False: every call takes the decode's path)
        self.prefill_pipeline = True
        self.prefill_admission = PREFILL_ADMISSION[0]
        # group reads in flight at once beside the group computing (1: one at a time, as before the
        # pipeline queued the next read; for A/B runs, with the same groups)
        self.prefill_reads_ahead = PREFILL_GROUPS_HELD - 1
        # read a long prefill call's first group (layout order, of every expert of the layer) while
        # the computation before its routing runs (the layer's attention over every token), which
        # otherwise leaves the disk idle before a prompt's first read (False: for A/B runs)
        self.prefill_speculate = True
        self.speculated = self.speculated_unused = 0  # experts read before the routing; of them, not routed to
        self._admit: set | None = None  # "recent": the experts of the current prefill call it may cache
        # bytes of experts (as the cache counts them) a prefill may hold outside the cache at once:
        # the group being computed (stacked) and the next ones' reads (None: unbounded)
        self.prefill_room: int | None = None
        # the least bytes of a group (None: budget.PREFILL_MIN_GROUP_BYTES, as the plan counts them)
        self.prefill_min_group_bytes: int | None = None
        self._prefill_pool: ThreadPoolExecutor | None = None
        # a set to collect every (layer, expert) that prefill calls route to (benchmarks); None: off
        self.prefill_routed: set | None = None
        # a list to collect every prefill read as (layer, start, end) on the perf_counter clock
        # (benchmarks: when the disk was busy for the prefill, and when not); None: off
        self.prefill_spans: list | None = None
        self.prefill_calls = self.prefill_groups_run = self.prefill_overlapped = 0
        # prefill reads: the seconds the disk was busy for them (reads overlap: the union of their
        # spans), their bytes, and the seconds the layer waited for them
        self.prefill_read_s = self.prefill_wait_s = 0.0
        self.prefill_read_bytes = 0
        # (capacity, prefill room) for a forward pass of n tokens (None: the plan's own prefill
        # chunk) that takes the prefill pipeline or not (MemoryPlan.cache_bytes_for,
        # prefill_room_for): set by load; None: both stay as set
        self.sizes = None
        # lend the prefill's room to the cache while no prefill runs (False: the cache keeps the
        # plan's cache_bytes whatever runs, as before the room was lent; for A/B runs)
        self.lend_prefill_room = True
        self._sized_for: object = ()
        self._sizes_memo: dict = {}
        self.cache_shrinks = 0  # forward passes that took room back from the cache

    def size_for(self, tokens: int, pipelined: bool = False) -> None:
        """Size the cache and the prefill room for a forward pass of `tokens` tokens (every
        sequence's) that takes the prefill pipeline or not, before it computes anything. Where the
        cache holds more than the pass leaves it, the least valuable experts go and MLX's freed
        buffers are returned to the system. Without lending, every pass is sized as the plan's own
        chunk, run on this streamer's path."""
        if self.sizes is None:
            return
        key = (int(tokens), bool(pipelined)) if self.lend_prefill_room else (None, self.prefill_pipeline)
        if key == self._sized_for:
            return
        if key not in self._sizes_memo:
            self._sizes_memo[key] = self.sizes(*key)
        capacity, room = self._sizes_memo[key]
        if self.cache.set_capacity(capacity):
            mx.clear_cache()
            self.cache_shrinks += 1
        self.prefill_room = room
        if room is not None:
            # the pass's largest reads at once (a prefill's groups in flight: all of the room but the
            # stacked group's share; else every expert it routes to) reuse the staging slots the
            # reads before them gave back
            self.store.keep_buffers_for(room - room // PREFILL_GROUPS_HELD if key[1] else room)
        self._sized_for = key

    def groups(self, layer: int, experts: np.ndarray) -> list[list[int]]:
        """Split sorted experts into runs that fit the cache together and share a quantization
        (gather_qmm takes one bit width), in expert order."""
        cap = self.cache.capacity_bytes
        groups: list[list[int]] = []
        used, key = 0, None
        for e in experts.tolist():
            size = self.store.nbytes(layer, e)
            q = tuple(sorted(self.store.quant(layer, e).items()))
            if not groups or q != key or (cap is not None and used + size > cap):
                groups.append([])
                used, key = 0, q
            groups[-1].append(e)
            used += size
        return groups

    def enable_prefetch(self) -> None:
        self._prefetch_pool = shared_pool(1, "moestream-prefetch")

    @property
    def prefetching(self) -> bool:
        return self._prefetch_pool is not None

    def reset_stats(self) -> None:
        self.sync_s = self.fetch_s = self.compute_s = self.attention_s = 0.0
        self.calls = self.prefill_calls = self.prefill_groups_run = self.prefill_overlapped = self.cache_shrinks = 0
        self.prefill_read_s = self.prefill_wait_s = 0.0
        self.prefill_read_bytes = 0
        self.speculated = self.speculated_unused = 0

    def forget(self) -> None:
        """Drop every cached expert and whole layer: the next call starts cold, as after loading."""
        self.whole.clear()
        self.cache.clear()

    def close(self) -> None:
        """Stop prefetching and drop every cached expert and whole layer."""
        if self._prefetch_pool is not None:
            with self._lock:
                futures = set(self._inflight.values())
            for future in futures:  # this model's prefetches finish before its reader closes
                future.exception()
            self._prefetch_pool = None
        self.forget()

    def prefetch(self, layer: int, experts) -> None:
        """Start reading experts of `layer` into the cache in the background (not pinned)."""
        if self._prefetch_pool is None:
            return
        with self._lock:
            want = [e for e in experts if (layer, e) not in self._inflight and (layer, e) not in self.cache]
            if not want:
                return
            future = self._prefetch_pool.submit(self._prefetch_read, layer, want)
            for e in want:
                self._inflight[(layer, e)] = future
            self.prefetch_issued += len(want)

    def _prefetch_read(self, layer: int, experts: list[int]) -> None:
        try:
            for e, tensors in self._read_evaluated(layer, experts).items():
                try:
                    self.cache.put((layer, e), tensors, self.store.nbytes(layer, e))
                except (CacheFullError, ValueError):
                    continue  # the cache is full of pinned experts: a prefetch is only a hint
                with self._lock:
                    self._prefetched.add((layer, e))
        finally:
            with self._lock:
                for e in experts:
                    self._inflight.pop((layer, e), None)

    def _wait_prefetch(self, layer: int, experts: list[int]) -> None:
        with self._lock:
            futures = {self._inflight[(layer, e)] for e in experts if (layer, e) in self._inflight}
        for future in futures:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a failed prefetch is retried by the normal read, which reports it
                pass

    def prefetch_stats(self) -> dict:
        with self._lock:
            return {"prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
                    "prefetch_wasted": self.prefetch_issued - self.prefetch_used - len(self._prefetched)
                    - len(self._inflight)}

    def _lookup(self, layer: int, experts: list[int]) -> tuple[dict, list[int]]:
        """The cached experts (pinned) and the missing ones, once this layer's prefetches are in."""
        if self._prefetch_pool is not None:
            self._wait_prefetch(layer, experts)
        got, missing = {}, []
        for e in experts:
            if self._prefetch_pool is not None:
                with self._lock:
                    if (layer, e) in self._prefetched:
                        self._prefetched.discard((layer, e))
                        self.prefetch_used += 1
            value = self.cache.get((layer, e))
            if value is None:
                missing.append(e)
            else:
                got[e] = value
                self.cache.pin((layer, e))
        return got, missing

    def acquire(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """The experts' tensors, read if missing (one batched, coalesced read) and pinned."""
        got, missing = self._lookup(layer, experts)
        if missing:
            for e, tensors in self.store.read(layer, missing).items():
                self.cache.put((layer, e), tensors, self.store.nbytes(layer, e))
                self.cache.pin((layer, e))
                got[e] = tensors
        return got

    def consolidate(self, layer: int) -> None:
        """With no budget, once every expert of `layer` is cached and they share a quantization,
        hold the layer as stacked tensors (mlx-lm's own layout) instead of per expert."""
        n = self.num_experts
        if self.cache.capacity_bytes is not None or n is None or layer in self.whole:
            return
        keys = [(layer, e) for e in range(n)]
        if not all(k in self.cache for k in keys):
            return
        quants = {tuple(sorted(self.store.quant(layer, e).items())) for e in range(n)}
        if len(quants) != 1:
            return
        experts = [self.cache.peek(k) for k in keys]
        stacked = {name: mx.stack([t[name] for t in experts]) for name in experts[0]}
        mx.eval(stacked)
        for k in keys:
            self.cache.discard(k)
        self.cache.put((layer, "whole"), stacked, sum(self.store.nbytes(layer, e) for e in range(n)))
        self.whole[layer] = (stacked, self.store.quant(layer, 0))

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.cache.unpin((layer, e))

    # ---- prefill: groups in layout order, the next group read while one computes

    def layout_order(self, layer: int, experts) -> list[int]:
        """The experts in the order their extents lie on disk (file, offset); expert order for a
        store without extents (a source checkpoint)."""
        bundle = getattr(self.store, "bundle", None)
        experts = [int(e) for e in experts]
        if bundle is None:
            return sorted(experts)

        def where(e: int):
            x = bundle.extent(layer, e)
            return (x.file, x.offset, e)

        return sorted(experts, key=where)

    def prefill_groups(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Cut experts (in layout order) into runs that share a quantization, of at most
        budget.prefill_group_bytes of their bytes (the rule the memory plan counts) and at most
        1/PREFILL_GROUPS_HELD of the prefill room, so that one group stacked and the next ones read
        fit in it together."""
        sizes = [self.store.nbytes(layer, e) for e in experts]
        limit = prefill_group_bytes(sum(sizes), self.prefill_min_group_bytes)
        if self.prefill_room is not None:
            limit = min(limit, self.prefill_room // PREFILL_GROUPS_HELD)
        cap = self.cache.capacity_bytes
        if cap is not None and self.prefill_admission in ("all", "tail"):
            limit = min(limit, cap // PREFILL_GROUPS_HELD)  # these admit every read: the groups held must fit the cache
        groups: list[list[int]] = []
        used, key = 0, None
        for e, size in zip(experts, sizes, strict=True):
            q = tuple(sorted(self.store.quant(layer, e).items()))
            if not groups or q != key or used + size > limit:
                groups.append([])
                used, key = 0, q
            groups[-1].append(e)
            used += size
        return groups

    def prefill_start(self, layer: int, group: list[int]) -> _PrefillRead:
        """Look the group up (hits pinned); its misses are read by prefill_submit or prefill_wait."""
        got, missing = self._lookup(layer, group)
        return _PrefillRead(layer, group, got, missing, sum(self.store.nbytes(layer, e) for e in missing))

    def prefill_submit(self, r: _PrefillRead) -> None:
        """Start reading the group's misses on a prefill thread (one per group read at once; their
        reads share the reader's I/O threads, the later one's queued behind the earlier one's)."""
        if r.missing and r.future is None:
            if self._prefill_pool is None:
                self._prefill_pool = shared_pool(PREFILL_GROUPS_HELD - 1, "moestream-prefill")
            r.future = self._prefill_pool.submit(self._prefill_read, r)

    def _prefill_read(self, r: _PrefillRead) -> dict:
        t0 = time.perf_counter()
        out = self._read_evaluated(r.layer, r.missing)
        r.span = (t0, time.perf_counter())
        with self._lock:
            self.prefill_read_bytes += r.miss_bytes
            if self.prefill_spans is not None:
                self.prefill_spans.append((r.layer, *r.span))
        return out

    def _read_evaluated(self, layer: int, experts: list[int]) -> dict:
        """store.read, its arrays evaluated here: MLX streams belong to the thread that made them,
        and a store may hand out arrays with work left (a checkpoint's casts and slices)."""
        out = self.store.read(layer, experts)
        mx.eval([a for tensors in out.values() if isinstance(tensors, dict) for a in tensors.values()])
        return out

    def prefill_wait(self, r: _PrefillRead) -> dict[int, dict[str, mx.array]]:
        """Every expert of the group: the misses once read (read here if never submitted),
        admitted into the cache by the prefill_admission rule."""
        t0 = time.perf_counter()
        if r.future is not None:
            read = r.future.result()
        else:
            read = self._prefill_read(r) if r.missing else {}
        if len(read) != len(r.missing):  # a read started before the routing: what it routed to, the rest read now
            wanted = set(r.missing)
            read = {e: t for e, t in read.items() if e in wanted}
            rest = [e for e in r.missing if e not in read]
            if rest:
                read.update(self._read_evaluated(r.layer, rest))
        got, r.got, r.future = r.got, {}, None  # r keeps no reference to the arrays: the caller frees them
        self.prefill_wait_s += time.perf_counter() - t0
        rule = self.prefill_admission
        for e, tensors in read.items():
            n = self.store.nbytes(r.layer, e)
            if rule == "none":
                continue
            if rule == "recent" and self._admit is not None and e not in self._admit:
                continue
            if rule in ("free", "recent"):
                free = self.cache.free_bytes()
                if free is not None and free < n:
                    continue
            try:
                self.cache.put((r.layer, e), tensors, n, probation=rule == "tail")
            except (CacheFullError, ValueError):
                continue  # every evictable byte is pinned: used from outside the cache this once
            self.cache.pin((r.layer, e))
            r.pinned.append(e)
        return {**got, **read}

    def speculate(self, layer: int, tokens: int, k: int) -> _PrefillRead | None:
        """Start reading the first group (layout order) of a prefill call of `tokens` tokens routing
        k experts each, before its routing is known, where it would reach most experts
        (SPECULATE_COVERAGE); its call takes those it routes to as its first group (_prefill)."""
        n = self.num_experts
        if not self.prefill_speculate or not n or layer in self.whole or 1 - (1 - k / n) ** tokens < SPECULATE_COVERAGE:
            return None
        first = self.prefill_groups(layer, self.layout_order(layer, range(n)))[0]
        missing = [e for e in first if (layer, e) not in self.cache]
        r = _PrefillRead(layer, first, {}, missing, sum(self.store.nbytes(layer, e) for e in missing))
        self.prefill_submit(r)
        self.speculated += len(missing)
        return r

    def admit_recent(self, layer: int, last_use: dict[int, int] | None) -> None:
        """For the "recent" rule, before a prefill call of `layer` (None: after it): of the experts
        it routes to (expert -> the last token position that routed to it), those it may cache: the
        latest first, as many as this layer's share of the cache's free room holds."""
        free = self.cache.free_bytes()
        if last_use is None or free is None:
            self._admit = None
            return
        share = free // max(1, sum(1 for other in self.store.layers if other >= layer))
        self._admit, used = set(), 0
        for e in sorted(last_use, key=lambda e: -last_use[e]):
            used += self.store.nbytes(layer, e)
            if used > share:
                break
            self._admit.add(e)

    def prefill_release(self, r: _PrefillRead) -> None:
        """Unpin the group's cached experts (once stacked, nothing needs them) and let its read
        finish if it never was waited for (an error on the way)."""
        if r.future is not None and not r.future.done():
            try:
                r.future.result()
            except Exception:  # noqa: BLE001 - the error being handled is the caller's
                pass
        self.release(r.layer, r.pinned)
        r.pinned = []


class _ReadAhead:
    """One prefill call's groups, looked up and their reads started in order, up to
    prefill_reads_ahead (PREFILL_GROUPS_HELD - 1) ahead of the group computing, while the prefill
    room holds them beside it; a group whose read does not fit yet is read when its turn comes
    (prefill_wait)."""

    def __init__(self, streamer: ExpertStreamer, layer: int, groups: list[list[int]],
                 early: _PrefillRead | None = None):
        """early: a read started before the routing (ExpertStreamer.speculate). Where groups[0] is
        made of its experts (the call routes to some of them), that group takes it as its own;
        the experts it read that no group takes count as unused, and a read no group takes is let
        finish and dropped before the groups' reads take the room."""
        self.s, self.layer, self.groups = streamer, layer, groups
        self.started: deque[_PrefillRead] = deque()
        self.reads: list[_PrefillRead] = []
        self._next = 0
        if early is None:
            return
        self.reads.append(early)  # the disk was busy with it, used or not
        head = None
        if groups and set(groups[0]) <= set(early.group):
            head = streamer.prefill_start(layer, groups[0])
            self.started.append(head)
            self._next = 1
        used = set(head.missing) if head is not None else set()
        streamer.speculated_unused += len(set(early.missing) - used)
        if used:
            head.future, head.miss_bytes = early.future, early.miss_bytes  # in flight: all it reads
        else:
            streamer.prefill_release(early)

    def fill(self, held: int) -> None:
        """Start what fits beside `held` bytes of a stacked group and the reads in flight, in
        order: a later group's read never takes the room of an earlier one's."""
        s, room = self.s, self.s.prefill_room
        flight = sum(r.miss_bytes for r in self.started if r.future is not None)

        def submitted(r: _PrefillRead) -> bool:  # False: it does not fit yet
            nonlocal flight
            if r.future is None and r.missing:
                if room is not None and held + flight + r.miss_bytes > room:
                    return False
                s.prefill_submit(r)
                flight += r.miss_bytes
                s.prefill_overlapped += held > 0
            return True

        if not all(submitted(r) for r in self.started):
            return
        while self._next < len(self.groups) and len(self.started) < s.prefill_reads_ahead:
            r = s.prefill_start(self.layer, self.groups[self._next])
            self._next += 1
            self.started.append(r)
            self.reads.append(r)
            if not submitted(r):
                return

    def next(self) -> _PrefillRead:
        return self.started.popleft()

    def close(self) -> None:
        """Let reads still in flight finish and unpin their hits (an error on the way), and count
        the time the disk was busy for this call's reads: the union of their spans."""
        while self.started:
            self.s.prefill_release(self.started.popleft())
        self.s.prefill_read_s += busy_seconds([r.span for r in self.reads if r.span is not None])


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _projection(x, w: dict[str, mx.array], name: str, q: ProjectionQuant, idx, sorted_indices: bool):
    if q.bits is not None:
        y = mx.gather_qmm(
            x, w[f"{name}.weight"], w[f"{name}.scales"], w.get(f"{name}.biases"), rhs_indices=idx,
            transpose=True, group_size=q.group_size, bits=q.bits, mode=q.mode, sorted_indices=sorted_indices,
        )
    else:
        y = mx.gather_mm(x, w[f"{name}.weight"].swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
    if f"{name}.bias" in w:
        y = y + mx.expand_dims(w[f"{name}.bias"][idx], -2)
    return y


def _experts_out(x, w, q, idx, sorted_indices: bool, activation, glu: bool):
    """The routed experts' outputs, as mlx-lm's SwitchGLU (down(act(up, gate))) or SwitchMLP
    (fc2(act(fc1))) compute them."""
    if glu:
        x_up = _projection(x, w, "up_proj", q["up_proj"], idx, sorted_indices)
        x_gate = _projection(x, w, "gate_proj", q["gate_proj"], idx, sorted_indices)
        return _projection(activation(x_up, x_gate), w, "down_proj", q["down_proj"], idx, sorted_indices)
    h = activation(_projection(x, w, "fc1", q["fc1"], idx, sorted_indices))
    return _projection(h, w, "fc2", q["fc2"], idx, sorted_indices)


def last_use(routed: np.ndarray) -> dict[int, int]:
    """Routed experts ([..., tokens, k]) -> the last token position that routed to each."""
    r = routed.reshape(-1, routed.shape[-2], routed.shape[-1])
    last = np.full(int(r.max()) + 1, -1)
    np.maximum.at(last, r.ravel(), np.broadcast_to(np.arange(r.shape[1])[None, :, None], r.shape).ravel())
    return {int(e): int(last[e]) for e in np.unique(r)}


def _is_prefill(routed) -> bool:
    """More than one token of a sequence ([..., tokens, k]; [tokens, k] for a flattened call),
    and enough (token, expert) pairs that the rows are sorted by expert (budget.prefill_path).
    From the shape alone: an array not yet evaluated will do."""
    return prefill_path(routed.shape[-2] if routed.ndim >= 2 else 1, routed.size)


class StreamingSwitchGLU(nn.Module):
    """Streams the experts of a SwitchGLU (glu=True) or a SwitchMLP (glu=False)."""

    def __init__(self, streamer: ExpertStreamer, layer: int, activation: nn.Module, glu: bool = True):
        super().__init__()
        self.streamer = streamer
        self.layer = layer
        self.activation = activation
        self.glu = glu
        # plain attributes, not module state (nn.Module would treat arrays and tuples as parameters)
        object.__setattr__(self, "lookahead", None)  # (next MoE layer, its router x -> top-k), to prefetch
        object.__setattr__(self, "_x_in", None)

    def _mlp(self, x, experts: list[int], idx, sorted_indices: bool):
        t0 = time.perf_counter()
        fetched = self.streamer.acquire(self.layer, experts)
        if self.lookahead is not None and self._x_in is not None:
            next_layer, route = self.lookahead
            self.streamer.prefetch(next_layer, np.unique(np.array(route(self._x_in))).tolist())
        t1 = time.perf_counter()
        self.streamer.fetch_s += t1 - t0
        try:
            names = fetched[experts[0]].keys()
            w = {n: mx.stack([fetched[e][n] for e in experts]) for n in names}
            q = self.streamer.store.quant(self.layer, experts[0])
            y = _experts_out(x, w, q, idx, sorted_indices, self.activation, self.glu)
            # Evaluate before unpinning: until then the graph holds the expert arrays, and the
            # memory budget must count them.
            mx.eval(y)
            self.streamer.compute_s += time.perf_counter() - t1
            return y
        finally:
            self.streamer.release(self.layer, experts)

    def _prefill(self, x, indices, routed: np.ndarray, experts: np.ndarray, early: _PrefillRead | None = None):
        """A prefill's experts in groups in layout order; groups i+1 and i+2 read while group i
        computes, where the prefill room holds group i's stacked weights and their reads together.
        The rows are sorted by expert (as mlx-lm's SwitchGLU sorts them), so each group's rows
        are one contiguous range and its output is what one call over every expert gives."""
        s, layer = self.streamer, self.layer
        order = s.layout_order(layer, experts)
        rank = np.zeros(int(experts[-1]) + 1, np.uint32)
        rank[order] = np.arange(len(order), dtype=np.uint32)
        local = rank[routed]
        x, _, inv_order = _gather_sort(x, mx.array(local))
        flat = np.sort(local.reshape(-1))
        if early is not None:  # its first group: the experts read early that it routes to (a layout-order prefix)
            ahead_set = set(early.group)
            head = [e for e in order if e in ahead_set]
            groups = ([head] if head else []) + s.prefill_groups(layer, [e for e in order if e not in ahead_set])
        else:
            groups = s.prefill_groups(layer, order)
        s.prefill_calls += 1
        s.prefill_groups_run += len(groups)
        if s.prefill_admission == "recent":
            s.admit_recent(layer, last_use(routed))
        ahead = _ReadAhead(s, layer, groups, early)
        parts, first, pending = [], 0, None
        try:
            ahead.fill(0)
            for group in groups:
                t0 = time.perf_counter()
                pending = ahead.next()
                fetched = s.prefill_wait(pending)
                names = fetched[group[0]].keys()
                w = {n: mx.stack([fetched[e][n] for e in group]) for n in names}
                mx.eval(w)
                del fetched  # what the cache did not take is freed here: only the stacked copy stays
                s.prefill_release(pending)
                pending = None
                ahead.fill(sum(s.store.nbytes(layer, e) for e in group))
                t1 = time.perf_counter()
                s.fetch_s += t1 - t0
                lo = int(np.searchsorted(flat, first, side="left"))
                hi = int(np.searchsorted(flat, first + len(group), side="left"))
                idx = mx.array((flat[lo:hi] - first).astype(np.uint32))
                q = s.store.quant(layer, group[0])
                y = _experts_out(x[lo:hi], w, q, idx, True, self.activation, self.glu)
                mx.eval(y)  # before the stacked weights go: the next groups' reads need their room
                del w
                s.compute_s += time.perf_counter() - t1
                parts.append(y)
                first += len(group)
        finally:
            if pending is not None:
                s.prefill_release(pending)
            ahead.close()
            s._admit = None
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        return _scatter_unsort(y, inv_order, indices.shape)

    def _whole_layer(self, x, indices, w, q):
        """Exactly mlx-lm's SwitchGLU / SwitchMLP path, on the layer's stacked tensors."""
        t0 = time.perf_counter()
        do_sort = indices.size >= 64
        idx, inv_order = indices, None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        y = _experts_out(x, w, q, idx, do_sort, self.activation, self.glu)
        if do_sort:
            y = _scatter_unsort(y, inv_order, indices.shape)
        self.streamer.compute_s += time.perf_counter() - t0  # graph building only: nothing to wait for
        return y.squeeze(-2)

    def __call__(self, x, indices) -> mx.array:
        # nothing of this forward pass is evaluated yet (the host sync below is its first): the
        # cache gives back the room this pass's activations and routed experts need before they are made
        pipelined = self.streamer.prefill_pipeline and _is_prefill(indices)
        self.streamer.size_for(indices.size // max(indices.shape[-1], 1) if indices.ndim else 1, pipelined)
        early = None
        if pipelined and indices.ndim >= 2:  # read while the sync below computes what comes before the routing
            early = self.streamer.speculate(self.layer, indices.shape[-2], indices.shape[-1])
        for observe in self.streamer.observers:
            observe(self.layer, x, indices)
        object.__setattr__(self, "_x_in", x if self.lookahead is not None else None)
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        t0 = time.perf_counter()
        if self.streamer.split_phases:
            mx.eval(x)
            t1 = time.perf_counter()
            self.streamer.attention_s += t1 - t0
            t0 = t1
        routed = np.array(indices)  # the one host sync per layer: which experts to fetch
        self.streamer.sync_s += time.perf_counter() - t0
        self.streamer.calls += 1
        experts = np.unique(routed)
        if self.streamer.prefill_routed is not None and routed.ndim >= 2 and routed.shape[-2] > 1:
            self.streamer.prefill_routed.update((self.layer, e) for e in experts.tolist())
        whole = self.streamer.whole.get(self.layer)
        if whole is not None:
            self.streamer.cache.record_hits(len(experts))
            return self._whole_layer(x, indices, *whole)
        if pipelined:
            y = self._prefill(x, indices, routed, experts, early)
            self.streamer.consolidate(self.layer)
            return y.squeeze(-2)
        groups = self.streamer.groups(self.layer, experts)
        if len(groups) == 1:
            # Same path as mlx-lm's SwitchGLU, on just the routed experts (renumbered 0..n-1).
            do_sort = indices.size >= 64
            local = mx.array(np.searchsorted(experts, routed).astype(np.uint32))
            idx, inv_order = local, None
            if do_sort:
                x, idx, inv_order = _gather_sort(x, local)
            y = self._mlp(x, groups[0], idx, do_sort)
            if do_sort:
                y = _scatter_unsort(y, inv_order, indices.shape)
            self.streamer.consolidate(self.layer)
        else:
            # More experts than fit at once (long prefill, small budget) or mixed bit widths:
            # sort the rows by expert so each group is one contiguous range of rows.
            x, _, inv_order = _gather_sort(x, indices)
            flat = np.sort(routed.reshape(-1), kind="stable")
            parts, row = [], 0
            for group in groups:
                n = int(np.searchsorted(flat, group[-1], side="right")) - row
                local = mx.array(np.searchsorted(np.array(group), flat[row : row + n]).astype(np.uint32))
                parts.append(self._mlp(x[row : row + n], group, local, True))
                row += n
            y = _scatter_unsort(mx.concatenate(parts, axis=0), inv_order, indices.shape)
        return y.squeeze(-2)
