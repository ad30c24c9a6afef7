"""The profile/ folder of a bundle (and of `moestream profile`): the routing trace and the tables
aggregated from it, as Parquet with zstd. This module knows their columns; stages/profile.py computes
them, the cache policies and the seriation read them.

trace.parquet: one row per (seq, token, layer), sorted that way: seq int32, token int32 (position in
the sequence), layer int32 (the model's layer index), experts list<int32> (the router's top-k, in the
router's order), weights list<float32> (aligned with experts; null where unavailable). Schema
metadata b"moestream.trace" holds JSON: num_experts, experts_per_token, layers, weights ("router" |
"unavailable" | "partial").

Aggregates: frequency.parquet (layer, expert, count, share, mass), coactivation.parquet (layer,
expert_a < expert_b, count), reuse.parquet (layer, tokens, pairs, reuse, reuse_if_independent),
transitions.parquet (layer, next_layer, expert, next_expert, count), aggregates.json (layers,
num_experts, experts_per_token, sequences).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..common.files import atomic_path

FREQUENCY_FILE = "frequency.parquet"
TRACE_FILE = "trace.parquet"
SUMMARY_FILE = "summary.json"


def write_table(table: pa.Table, path: Path) -> Path:
    """One Parquet table (zstd), written atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


# ----------------------------------------------------------------------------- the trace


TRACE_META_KEY = b"moestream.trace"
TRACE_SCHEMA = pa.schema(
    [
        ("seq", pa.int32()),
        ("token", pa.int32()),
        ("layer", pa.int32()),
        ("experts", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
    ]
)


def build_trace_table(seq, token, layer, experts, weights, have_w, meta: dict) -> pa.Table:
    n, k = experts.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    experts_col = pa.ListArray.from_arrays(offsets, pa.array(experts.reshape(-1), pa.int32()))
    if have_w is not None and have_w.all():
        weights_col = pa.ListArray.from_arrays(offsets, pa.array(weights.reshape(-1), pa.float32()))
    elif have_w is None or not have_w.any():
        weights_col = pa.nulls(n, pa.list_(pa.float32()))
    else:
        mask = pa.array(~have_w)
        weights_col = pa.ListArray.from_arrays(offsets, pa.array(weights.reshape(-1), pa.float32()), mask=mask)
    table = pa.table(
        [pa.array(seq, pa.int32()), pa.array(token, pa.int32()), pa.array(layer, pa.int32()), experts_col, weights_col],
        schema=TRACE_SCHEMA,
    )
    return table.replace_schema_metadata({TRACE_META_KEY: json.dumps(meta)})


def write_trace(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_table(table, path)


def read_trace(source: str | Path | pa.Table) -> pa.Table:
    """A trace table from a Parquet path (or a table, returned as is), checked against TRACE_SCHEMA."""
    if isinstance(source, pa.Table):
        table = source
    else:
        table = pq.read_table(source)
    missing = [n for n in ("seq", "token", "layer", "experts") if n not in table.column_names]
    if missing:
        raise ValueError(f"{source if not isinstance(source, pa.Table) else 'trace'}: not a routing trace "
                         f"(missing columns {missing})")
    return table


def trace_meta(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(TRACE_META_KEY)
    return json.loads(raw) if raw else {}


@dataclass
class TraceArrays:
    """A trace as numpy arrays, rows sorted by (seq, token, layer)."""

    seq: np.ndarray  # [n] int64
    token: np.ndarray  # [n]
    layer: np.ndarray  # [n]
    experts: np.ndarray  # [n, k] int64
    weights: np.ndarray | None  # [n, k] float32; None when no row has weights
    weights_valid: np.ndarray | None  # [n] bool
    num_experts: int
    layers: list[int]

    @property
    def k(self) -> int:
        return self.experts.shape[1]

    def token_keys(self) -> np.ndarray:
        """[n] one integer per (seq, token) of each row, equal for the rows of one token."""
        return self.seq * (int(self.token.max()) + 2 if len(self) else 1) + self.token

    @property
    def tokens(self) -> int:
        """Distinct (seq, token) pairs."""
        return len(np.unique(self.token_keys()))

    def __len__(self) -> int:
        return len(self.seq)


def trace_arrays(source: str | Path | pa.Table | TraceArrays) -> TraceArrays:
    if isinstance(source, TraceArrays):
        return source
    table = read_trace(source)
    meta = trace_meta(table)
    seq = table.column("seq").to_numpy().astype(np.int64)
    token = table.column("token").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    experts_col = table.column("experts").combine_chunks()
    n = len(seq)
    sizes = np.diff(experts_col.offsets.to_numpy()) if n else np.zeros(0, np.int64)
    if n and (sizes != sizes[0]).any():
        raise ValueError("trace rows have different numbers of experts; a trace has one top-k")
    k = int(sizes[0]) if n else int(meta.get("experts_per_token") or 0)
    experts = experts_col.flatten().to_numpy().astype(np.int64).reshape(n, k)
    weights = valid = None
    if "weights" in table.column_names:
        wcol = table.column("weights").combine_chunks()
        valid = np.asarray(wcol.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if valid.any():
            weights = np.zeros((n, k), np.float32)
            weights[valid] = wcol.filter(pa.array(valid)).flatten().to_numpy().astype(np.float32).reshape(-1, k)
        else:
            valid = None
    order = np.lexsort((layer, token, seq))
    if (order != np.arange(n)).any():
        seq, token, layer, experts = seq[order], token[order], layer[order], experts[order]
        if weights is not None:
            weights, valid = weights[order], valid[order]
    num_experts = int(meta.get("num_experts") or (experts.max() + 1 if n else 0))
    layers = [int(x) for x in meta.get("layers") or np.unique(layer).tolist()]
    return TraceArrays(seq, token, layer, experts, weights, valid, num_experts, layers)


def arrays_to_table(t: TraceArrays, meta: dict | None = None) -> pa.Table:
    """The inverse of trace_arrays (used to split and subset traces)."""
    meta = dict(meta or {})
    meta.setdefault("num_experts", t.num_experts)
    meta.setdefault("experts_per_token", t.k)
    meta.setdefault("layers", t.layers)
    w = t.weights if t.weights is not None else np.zeros(t.experts.shape, np.float32)
    have = t.weights_valid if t.weights is not None else None
    return build_trace_table(t.seq, t.token, t.layer, t.experts, w, have, meta)


# ----------------------------------------------------------------------------- aggregates


@dataclass
class Aggregates:
    """Dense per-layer routing statistics; layer i here is `layers[i]` of the model."""

    layers: list[int]
    num_experts: int
    k: int
    tokens: np.ndarray  # [L] tokens routed in each layer
    frequency: np.ndarray  # [L, E] tokens routed to each expert
    mass: np.ndarray | None  # [L, E] sum of router weights (None: weights unavailable)
    coactivation: np.ndarray  # [L, E, E] tokens routed to both; symmetric, diagonal = frequency
    reuse_pairs: np.ndarray  # [L] tokens that have a previous token in their sequence
    reuse_sum: np.ndarray  # [L] sum over those of |S_t & S_{t-1}| / k
    transitions: np.ndarray  # [L-1, E, E] layer i expert -> layer i+1 expert, same token
    sequences: int = 0

    @property
    def reuse(self) -> np.ndarray:
        return np.divide(self.reuse_sum, self.reuse_pairs, out=np.zeros(len(self.layers)), where=self.reuse_pairs > 0)

    @property
    def share(self) -> np.ndarray:
        """[L, E] fraction of tokens routed to each expert (sums to k per layer)."""
        return self.frequency / np.maximum(self.tokens, 1)[:, None]

    def reuse_if_independent(self) -> np.ndarray:
        """[L] the reuse routing with these frequencies would show with no temporal correlation."""
        return (self.share**2).sum(axis=1) / max(self.k, 1)


def write_aggregates(agg: Aggregates, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    E, L = agg.num_experts, len(agg.layers)
    layer_col = np.repeat(np.array(agg.layers, np.int32), E)
    expert_col = np.tile(np.arange(E, dtype=np.int32), L)
    freq = {
        "layer": layer_col, "expert": expert_col, "count": agg.frequency.reshape(-1),
        "share": agg.share.reshape(-1),
    }
    freq["mass"] = pa.array(agg.mass.reshape(-1)) if agg.mass is not None else pa.nulls(L * E, pa.float64())
    files = {"frequency": write_table(pa.table(freq), out / "frequency.parquet")}

    li, a, b = np.nonzero(np.triu(agg.coactivation, 1)) if L else (np.zeros(0, int),) * 3
    files["coactivation"] = write_table(pa.table({
        "layer": np.array(agg.layers, np.int32)[li], "expert_a": a.astype(np.int32), "expert_b": b.astype(np.int32),
        "count": agg.coactivation[li, a, b].astype(np.int64),
    }), out / "coactivation.parquet")

    files["reuse"] = write_table(pa.table({
        "layer": np.array(agg.layers, np.int32), "tokens": agg.tokens, "pairs": agg.reuse_pairs,
        "reuse": agg.reuse, "reuse_if_independent": agg.reuse_if_independent(),
    }), out / "reuse.parquet")

    li, a, b = np.nonzero(agg.transitions) if L > 1 else (np.zeros(0, int),) * 3
    lay = np.array(agg.layers, np.int32)
    files["transitions"] = write_table(pa.table({
        "layer": lay[li] if L > 1 else np.zeros(0, np.int32), "next_layer": lay[li + 1] if L > 1 else np.zeros(0, np.int32),
        "expert": a.astype(np.int32), "next_expert": b.astype(np.int32),
        "count": agg.transitions[li, a, b].astype(np.int64) if L > 1 else np.zeros(0, np.int64),
    }), out / "transitions.parquet")
    meta = {"layers": agg.layers, "num_experts": E, "experts_per_token": agg.k, "sequences": agg.sequences}
    (out / "aggregates.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files


def read_aggregates(profile_dir: str | Path) -> Aggregates:
    """Aggregates back from a profile folder's Parquet files (the inverse of write_aggregates)."""
    d = Path(profile_dir)
    meta = json.loads((d / "aggregates.json").read_text())
    layers, E, k = [int(x) for x in meta["layers"]], int(meta["num_experts"]), int(meta["experts_per_token"])
    pos = {layer: i for i, layer in enumerate(layers)}
    L = len(layers)
    f = pq.read_table(d / "frequency.parquet").to_pydict()
    freq = np.zeros((L, E), np.int64)
    li = np.array([pos[x] for x in f["layer"]], dtype=np.int64)
    freq[li, f["expert"]] = f["count"]
    mass = None
    if f["mass"] and f["mass"][0] is not None:
        mass = np.zeros((L, E))
        mass[li, f["expert"]] = f["mass"]
    c = pq.read_table(d / "coactivation.parquet").to_pydict()
    coact = np.zeros((L, E, E), np.int32)
    ci = np.array([pos[x] for x in c["layer"]], dtype=np.int64)
    coact[ci, c["expert_a"], c["expert_b"]] = c["count"]
    coact = coact + coact.transpose(0, 2, 1)
    for i in range(L):
        coact[i][np.diag_indices(E)] = freq[i]
    r = pq.read_table(d / "reuse.parquet").to_pydict()
    tokens = np.zeros(L, np.int64)
    pairs = np.zeros(L, np.int64)
    rsum = np.zeros(L)
    for layer, n, p, x in zip(r["layer"], r["tokens"], r["pairs"], r["reuse"], strict=True):
        tokens[pos[layer]], pairs[pos[layer]], rsum[pos[layer]] = n, p, x * p
    tr = pq.read_table(d / "transitions.parquet").to_pydict()
    trans = np.zeros((max(L - 1, 0), E, E), np.int32)
    if tr["layer"]:
        ti = np.array([pos[x] for x in tr["layer"]], dtype=np.int64)
        trans[ti, tr["expert"], tr["next_expert"]] = tr["count"]
    return Aggregates(layers, E, k, tokens, freq, mass, coact, pairs, rsum, trans, int(meta.get("sequences", 0)))


def read_frequency(profile) -> dict[int, np.ndarray]:
    """{layer: [E] share of tokens routed to each expert} from a profile folder's frequency.parquet
    (or that file itself)."""
    path = Path(profile)
    if path.is_dir():
        path = path / FREQUENCY_FILE
    d = pq.read_table(path, columns=["layer", "expert", "share"]).to_pydict()
    share: dict[int, np.ndarray] = {}
    num_experts = max(d["expert"]) + 1 if d["expert"] else 0
    for layer, e, s in zip(d["layer"], d["expert"], d["share"], strict=True):
        share.setdefault(int(layer), np.zeros(num_experts))[int(e)] = s
    return share
