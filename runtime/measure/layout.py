"""What an expert order in the layer files costs in reads, without writing a bundle: a routing trace
replayed token by token through the runtime's own streamer and expert cache, with a store that reads
nothing but hands each batch of missed experts to the reader's own read planning (`plan_reads`) on
the layout the bundle writer would produce (`extent_offsets`). So the figures are what the runtime
would issue on such a bundle: reads, bytes (alignment and coalesced padding included), mean read
size, cache hit rate.
"""

from __future__ import annotations

import numpy as np

from ...manifests.bundle import extent_offsets
from ...manifests.profile import trace_arrays
from ..cache.expert_cache import ExpertCache
from ..io.reader import DEFAULT_MAX_READ_BYTES, align_down, align_up, plan_reads
from ..model.load import COALESCE_GAP
from ..model.streaming import ExpertStreamer
from .replay import routing_steps


class PlannedReads:
    """An expert store over a planned layout: `read` counts the reads the reader would issue."""

    def __init__(self, offsets: dict[int, list[int]], sizes: dict[int, np.ndarray], coalesce_gap: int,
                 max_read_bytes: int, direct: bool = True):
        self.offsets, self.sizes = offsets, sizes
        self.coalesce_gap, self.max_read_bytes, self.direct = coalesce_gap, max_read_bytes, direct
        self.reads = self.bytes_read = self.experts_read = 0

    @property
    def layers(self) -> dict[int, str]:
        return {layer: f"layer {layer}" for layer in self.offsets}

    def nbytes(self, layer: int, expert: int) -> int:
        return int(self.sizes[layer][expert])

    def quant(self, layer: int, expert: int) -> dict:
        return {}  # one quantization everywhere: the streamer never splits a batch by it

    def read(self, layer: int, experts: list[int]) -> dict[int, bool]:
        spans = []
        for e in experts:
            start, end = self.offsets[layer][e], self.offsets[layer][e] + self.nbytes(layer, e)
            spans.append((str(layer), align_down(start), align_up(end)) if self.direct else (str(layer), start, end))
        for _, start, end, _ in plan_reads(spans, self.coalesce_gap, self.max_read_bytes):
            self.reads += 1
            self.bytes_read += end - start
        self.experts_read += len(experts)
        return {e: True for e in experts}


def _layer_sizes(extent_bytes, layers: list[int], num_experts: int) -> dict[int, np.ndarray]:
    """extent_bytes: one size for every extent, [E], or {layer: [E]}."""
    if isinstance(extent_bytes, dict):
        return {layer: np.broadcast_to(np.asarray(extent_bytes[layer], np.int64), (num_experts,)) for layer in layers}
    return {layer: np.broadcast_to(np.asarray(extent_bytes, np.int64), (num_experts,)) for layer in layers}


def measure_layout(trace, orders: dict[int, list[int]] | None, extent_bytes, *, cache_fraction: float = 0.0,
                   coalesce_gap: int = COALESCE_GAP, max_read_bytes: int = DEFAULT_MAX_READ_BYTES) -> dict:
    """Reads per token under a file order per layer (None: identity), replaying `trace`.

    extent_bytes: one size for every extent, [E], or {layer: [E]}; each layer is its own file.
    cache_fraction: an LRU expert cache of that share of the expert bytes (0: none, every routed
    expert is read). coalesce_gap and max_read_bytes: the reader's (default: what `load` uses)."""
    t = trace_arrays(trace)
    num_experts = t.num_experts
    layers = sorted(set(np.unique(t.layer).tolist()))
    sizes = _layer_sizes(extent_bytes, layers, num_experts)
    offsets = {}
    for layer in layers:
        order = list((orders or {}).get(layer, range(num_experts)))
        starts = extent_offsets([sizes[layer][e] for e in order])
        offsets[layer] = [0] * num_experts
        for e, start in zip(order, starts, strict=True):
            offsets[layer][e] = start
    store = PlannedReads(offsets, sizes, coalesce_gap, max_read_bytes)
    capacity = int(cache_fraction * sum(int(s.sum()) for s in sizes.values()))
    cache = ExpertCache(capacity if capacity > 0 else None, "lru")
    streamer = ExpertStreamer(store, cache)
    for layer, experts in routing_steps(t):
        for group in streamer.groups(layer, np.asarray(experts)):
            streamer.acquire(layer, group)
            streamer.release(layer, group)
        if capacity <= 0:
            cache.clear()  # no cache: nothing survives the step that read it
    tokens = t.tokens
    c = cache.stats()
    reads, nbytes, experts_read = store.reads, store.bytes_read, store.experts_read
    return {
        "tokens": tokens,
        "layer_steps": len(t),
        "experts_read": experts_read,
        "reads": reads,
        "bytes_read": nbytes,
        "reads_per_token": reads / tokens if tokens else 0.0,
        "experts_read_per_token": experts_read / tokens if tokens else 0.0,
        "experts_per_read": experts_read / reads if reads else 0.0,
        "mean_read_bytes": nbytes / reads if reads else 0.0,
        "bytes_per_token": nbytes / tokens if tokens else 0.0,
        "hit_rate": c["hit_rate"] if capacity > 0 else 0.0,
    }


def compare_layouts(trace, layouts: dict[str, dict[int, list[int]] | None], extent_bytes, **kw) -> dict[str, dict]:
    """measure_layout for several named orders (e.g. {"identity": None, "profile": orders})."""
    t = trace_arrays(trace)
    return {name: measure_layout(t, orders, extent_bytes, **kw) for name, orders in layouts.items()}


def bundle_extent_bytes(bundle) -> dict[int, np.ndarray]:
    """{layer: [E] on-disk bytes of each expert's extent} of an opened bundle."""
    out = {layer: np.zeros(bundle.num_experts, np.int64) for layer in bundle.layers}
    for (layer, e), x in bundle.extents.items():
        out[layer][e] = x.nbytes
    return out

