"""The streaming MoE layer: a drop-in for mlx-lm's SwitchGLU that fetches routed experts.

mlx-lm builds the model (router, score weighting, shared experts: all its own code); we swap
each `SwitchGLU` for `StreamingSwitchGLU`, whose call `(x, indices) -> [..., k, H]` reads the
distinct routed experts (each once per call, prefill included) through the expert cache and
runs the same `gather_qmm` / `gather_mm` math on just those experts, so the result equals
mlx-lm's with the same weights fully in memory.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

from ..cache.expert_cache import CacheFullError, ExpertCache
from ..io.reader import shared_pool
from ..io.stores import ProjectionQuant


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
        self.calls = 0

    def close(self) -> None:
        """Stop prefetching and drop every cached expert and whole layer."""
        if self._prefetch_pool is not None:
            with self._lock:
                futures = set(self._inflight.values())
            for future in futures:  # this model's prefetches finish before its reader closes
                future.exception()
            self._prefetch_pool = None
        self.whole.clear()
        self.cache.clear()

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
            for e, tensors in self.store.read(layer, experts).items():
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

    def acquire(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """The experts' tensors, read if missing (one batched, coalesced read) and pinned."""
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
        whole = self.streamer.whole.get(self.layer)
        if whole is not None:
            self.streamer.cache.record_hits(len(experts))
            return self._whole_layer(x, indices, *whole)
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
