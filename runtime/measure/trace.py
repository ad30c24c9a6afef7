"""Routing traces: which experts the router picked, with their weights, for every token and MoE layer.

A `TraceRecorder` is installed on a loaded model (moestream's, or mlx-lm's own) by wrapping, at
run time and reversibly, two modules per MoE layer: the expert module (mlx-lm's `SwitchGLU` or
moestream's `StreamingSwitchGLU`), which sees the routed indices, and its parent, the family's MoE
block, which computes the router scores. Nothing in streaming.py or mlx-lm is edited: each wrapped
instance gets a subclass whose `__call__` records and then calls the original.

Router weights, for every family, without re-implementing its gate: every mlx-lm MoE block combines
the expert outputs linearly, `out = sum_j w_j * y_j + rest(x)` (rest: shared experts, or nothing),
where `y = experts(x, indices)` has shape [..., k, H]. After the real call, the block is called twice
more with the expert module answering probes instead of computing: y = 0 gives `rest`, and
y[..., j, :] = e_j (the j-th unit vector) gives `rest + w_j` in coordinate j. So
`w = (out_basis - out_zero)[..., :k]`, exact up to float32 rounding of `rest + w`. The probes read no
expert (the gate and shared experts run again, nothing else). Coordinates >= k must not move between
the two probes; if they do, the block is not linear in y the way assumed, and the weights of that
layer are recorded as unavailable (null) rather than guessed.

The trace table's format (columns, Parquet, reading it back) is manifests/profile.py's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pyarrow as pa

from ...manifests.profile import TRACE_META_KEY, TRACE_SCHEMA, build_trace_table, write_trace
from ..model.load import runtime_of
from ..model.modules import moe_block, resolve_module, switch_modules

# Coordinates >= k may differ between the two probes by at most this (relative to the block's
# output scale); for a linear block they are bit-identical.
LINEARITY_TOL = 1e-5


def _num_experts(model: nn.Module, layers: dict[int, str]) -> int | None:
    rt = runtime_of(model, required=False)
    if rt is not None:
        return rt.num_experts
    module = resolve_module(model, next(iter(layers.values())))
    w = getattr(getattr(module, "gate_proj", None), "weight", None)
    return int(w.shape[0]) if w is not None else None


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _wrap(obj: nn.Module, kind: str, call, recorder: TraceRecorder, layer: int) -> None:
    """Give one module instance a subclass whose __call__ is `call` (reversible: _unwrap)."""
    base = type(obj)
    if getattr(base, "_moestream_trace_base", None) is not None:
        raise RuntimeError(f"a TraceRecorder is already installed on layer {layer}")
    key = (base, kind)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Traced{base.__name__}", (base,), {"__call__": call, "_moestream_trace_base": base})
    obj.__class__ = _SUBCLASSES[key]
    obj._moestream_trace = (recorder, layer)  # a plain attribute: not a parameter, not in the tree


def _unwrap(obj: nn.Module) -> None:
    base = getattr(type(obj), "_moestream_trace_base", None)
    if base is not None:
        obj.__class__ = base
        del obj._moestream_trace


def _switch_call(self, x, indices):
    recorder, layer = self._moestream_trace
    if recorder._probe is not None:  # a weight probe: answer without reading or computing experts
        return recorder._probe_output(indices, x)
    y = type(self)._moestream_trace_base.__call__(self, x, indices)
    recorder._seen.setdefault(layer, []).append(np.array(indices).astype(np.int32, copy=False))
    return y


def _block_call(self, x, *args, **kwargs):
    recorder, layer = self._moestream_trace
    base = type(self)._moestream_trace_base
    recorder._seen[layer] = []
    out = base.__call__(self, x, *args, **kwargs)
    seen = recorder._seen.pop(layer)
    if recorder.enabled and seen:
        recorder._record(self, base, layer, x, args, kwargs, out, seen)
    return out


@dataclass
class _Chunk:
    seq: np.ndarray
    token: np.ndarray
    layer: int
    experts: np.ndarray  # [n, k] int32
    weights: np.ndarray | None  # [n, k] float32


class TraceRecorder:
    """Records routing while a model runs. Use as a context manager (or install()/remove()).

    Token positions count per layer from 0 in each sequence and carry over between calls, so a
    prefill followed by one-token decode steps (with a KV cache) numbers tokens 0, 1, 2, ...;
    call `next_sequence()` before an unrelated input. A batch of B rows is B sequences.
    weights=False skips the two probe calls per layer (indices only).
    """

    def __init__(self, model: nn.Module, *, weights: bool = True, layers: dict[int, str] | None = None):
        self.model = model
        rt = runtime_of(model, required=False)
        self.layers = dict(sorted((layers or (rt.store.layers if rt is not None else switch_modules(model))).items()))
        self.num_experts = _num_experts(model, self.layers)
        self.weights = weights
        self.enabled = True
        self.installed = False
        self._probe: str | None = None
        self._seen: dict[int, list[np.ndarray]] = {}
        self._chunks: list[_Chunk] = []
        self._seq = 0
        self._batch = 0  # rows in the current sequence group
        self._next_token: dict[int, int] = defaultdict(int)
        self.unavailable_layers: set[int] = set()
        self.experts_per_token: int | None = None

    # ---- installing ---------------------------------------------------------------------------

    def install(self) -> TraceRecorder:
        if self.installed:
            return self
        done = []
        try:
            for layer, path in self.layers.items():
                switch = resolve_module(self.model, path)
                block = moe_block(self.model, path)
                _wrap(switch, "switch", _switch_call, self, layer)
                done.append(switch)
                _wrap(block, "block", _block_call, self, layer)
                done.append(block)
        except BaseException:
            for m in done:
                _unwrap(m)
            raise
        self.installed = True
        return self

    def remove(self) -> None:
        if not self.installed:
            return
        for path in self.layers.values():
            _unwrap(resolve_module(self.model, path))
            _unwrap(moe_block(self.model, path))
        self.installed = False

    def __enter__(self) -> TraceRecorder:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- sequences ----------------------------------------------------------------------------

    def next_sequence(self) -> None:
        """The next call starts new sequences at token 0."""
        self._seq += max(self._batch, 1) if self._next_token else 0
        self._batch = 0
        self._next_token.clear()

    # ---- recording ----------------------------------------------------------------------------

    def _probe_output(self, indices, x) -> mx.array:
        k, hidden = indices.shape[-1], x.shape[-1]
        shape = (*indices.shape, hidden)
        if self._probe == "zero":
            return mx.zeros(shape, dtype=mx.float32)
        return mx.broadcast_to(mx.eye(k, hidden, dtype=mx.float32), shape)

    def _router_weights(self, block, base, layer, x, args, kwargs, k: int) -> np.ndarray | None:
        try:
            self._probe = "zero"
            out0 = base.__call__(block, x, *args, **kwargs)
            self._probe = "basis"
            out1 = base.__call__(block, x, *args, **kwargs)
        finally:
            self._probe = None
        d = (out1.astype(mx.float32) - out0.astype(mx.float32)).reshape(-1, out0.shape[-1])
        scale = mx.abs(out0.astype(mx.float32)).max() + 1.0
        rest = mx.abs(d[:, k:]).max() if d.shape[1] > k else mx.array(0.0)
        w = d[:, :k]
        mx.eval(w, rest, scale)
        if float(rest) > LINEARITY_TOL * float(scale):
            self.unavailable_layers.add(layer)
            return None
        return np.array(w, dtype=np.float32)

    def _record(self, block, base, layer, x, args, kwargs, out, seen: list[np.ndarray]) -> None:
        lead = tuple(x.shape[:-1]) or (1,)
        batch, length = (1, lead[0]) if len(lead) == 1 else (int(np.prod(lead[:-1])), lead[-1])
        experts = np.concatenate([s.reshape(-1, s.shape[-1]) for s in seen])
        k = experts.shape[1]
        if experts.shape[0] != batch * length:
            raise RuntimeError(
                f"layer {layer}: the expert module saw {experts.shape[0]} token rows, the block input has "
                f"{batch * length}; cannot attribute routing to tokens"
            )
        if self.experts_per_token is None:
            self.experts_per_token = k
        weights = None
        if self.weights and layer not in self.unavailable_layers:
            weights = self._router_weights(block, base, layer, x, args, kwargs, k)
        start = self._next_token[layer]
        self._next_token[layer] = start + length
        self._batch = max(self._batch, batch)
        seq = np.repeat(np.arange(self._seq, self._seq + batch, dtype=np.int32), length)
        token = np.tile(np.arange(start, start + length, dtype=np.int32), batch)
        self._chunks.append(_Chunk(seq, token, layer, experts, weights))

    # ---- output -------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return sum(len(c.seq) for c in self._chunks)

    def metadata(self) -> dict:
        if not self.weights:
            state = "unavailable"
        elif not self.unavailable_layers:
            state = "router"
        elif self.unavailable_layers >= set(self.layers):
            state = "unavailable"
        else:
            state = "partial"
        return {
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "layers": list(self.layers),
            "weights": state,
            "weights_unavailable_layers": sorted(self.unavailable_layers),
        }

    def table(self) -> pa.Table:
        return trace_table(self._chunks, self.metadata())

    def write(self, path: str | Path) -> Path:
        return write_trace(self.table(), path)


def trace_table(chunks: list[_Chunk], meta: dict) -> pa.Table:
    """Chunks -> one table sorted by (seq, token, layer)."""
    if not chunks:
        return TRACE_SCHEMA.empty_table().replace_schema_metadata({TRACE_META_KEY: json.dumps(meta)})
    k = chunks[0].experts.shape[1]
    seq = np.concatenate([c.seq for c in chunks])
    token = np.concatenate([c.token for c in chunks])
    layer = np.concatenate([np.full(len(c.seq), c.layer, dtype=np.int32) for c in chunks])
    experts = np.concatenate([c.experts for c in chunks]).astype(np.int32)
    have_w = np.concatenate([np.full(len(c.seq), c.weights is not None) for c in chunks])
    weights = np.concatenate([c.weights if c.weights is not None else np.zeros((len(c.seq), k), np.float32)
                              for c in chunks])
    order = np.lexsort((layer, token, seq))
    return build_trace_table(seq[order], token[order], layer[order], experts[order], weights[order], have_w[order], meta)
