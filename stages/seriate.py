"""Seriation: an order of each layer's experts in its file such that experts that fire together sit
next to each other, so one token's missed experts coalesce into fewer, larger reads.

With no cache, a token whose k routed experts occupy file positions P needs `k - #(adjacent pairs
in P)` reads. Summed over tokens, the reads saved by an order are exactly the co-activation counts of
the pairs it places side by side: sum_i C[o_i, o_(i+1)]. So the order is a maximum-weight
Hamiltonian path on the co-activation graph (a TSP). `order_experts` builds candidates (greedy
edge matching, a nearest-neighbour chain from the hottest expert, spectral seriation by the Fiedler
vector), improves each with 2-opt on that objective, and keeps the best.

What an order costs in reads on a (held-out) trace is measured by runtime/measure/layout.py, with the
runtime's own cache and read planning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..manifests.profile import TraceArrays, arrays_to_table, trace_arrays, trace_meta

METHODS = ("greedy", "chain", "spectral")


# ----------------------------------------------------------------------------- ordering


def adjacency_score(order, coactivation: np.ndarray) -> float:
    """Sum of co-activation over neighbouring positions: the reads an order saves with no cache."""
    o = np.asarray(order)
    return float(np.asarray(coactivation, dtype=np.float64)[o[:-1], o[1:]].sum()) if len(o) > 1 else 0.0


def _weights(coactivation: np.ndarray) -> np.ndarray:
    W = np.asarray(coactivation, dtype=np.float64).copy()
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"co-activation must be a square [E, E] matrix, got {W.shape}")
    W = (W + W.T) / 2
    np.fill_diagonal(W, 0.0)
    return W


def _join(fragments: list[list[int]], W: np.ndarray, freq: np.ndarray) -> list[int]:
    """Concatenate path fragments: hottest fragment first, then repeatedly the fragment (either
    way round) whose end joins the path's end most strongly (ties: the hotter fragment)."""
    frags = sorted(fragments, key=lambda f: (-freq[f].sum(), f[0]))
    path = list(frags.pop(0))
    while frags:
        best, best_key = None, None
        for i, f in enumerate(frags):
            for rev in (False, True):
                g = f[::-1] if rev else f
                key = (W[path[-1], g[0]], freq[f].sum())
                if best_key is None or key > best_key:
                    best, best_key = (i, g), key
        i, g = best
        frags.pop(i)
        path += g
    return path


def _greedy_edges(W: np.ndarray, freq: np.ndarray) -> list[int]:
    """Greedy matching: take pairs by decreasing weight when both ends have degree < 2 and no cycle forms."""
    n = len(W)
    iu, ju = np.triu_indices(n, 1)
    w = W[iu, ju]
    keep = w > 0
    iu, ju, w = iu[keep], ju[keep], w[keep]
    order = np.lexsort((ju, iu, -w))
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    deg = np.zeros(n, int)
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for e in order:
        a, b = int(iu[e]), int(ju[e])
        if deg[a] < 2 and deg[b] < 2 and find(a) != find(b):
            parent[find(a)] = find(b)
            deg[a] += 1
            deg[b] += 1
            nbrs[a].append(b)
            nbrs[b].append(a)
    seen = np.zeros(n, bool)
    fragments = []
    for start in range(n):
        if seen[start] or deg[start] == 2:
            continue
        frag, prev, cur = [], -1, start
        while cur != -1:
            frag.append(cur)
            seen[cur] = True
            nxt = [x for x in nbrs[cur] if x != prev]
            prev, cur = cur, (nxt[0] if nxt else -1)
        fragments.append(frag)
    return _join(fragments, W, freq)


def _chain(W: np.ndarray, freq: np.ndarray) -> list[int]:
    """Nearest-neighbour chain from the hottest expert, growing at whichever end joins more strongly."""
    n = len(W)
    start = int(np.argmax(freq))
    path = [start]
    free = np.ones(n, bool)
    free[start] = False
    tie = freq / (freq.max() + 1.0) * 1e-9  # prefer hotter experts among equal weights
    while free.any():
        cand_tail = np.where(free, W[path[-1]] + tie, -np.inf)
        cand_head = np.where(free, W[path[0]] + tie, -np.inf)
        t, h = int(np.argmax(cand_tail)), int(np.argmax(cand_head))
        if cand_tail[t] >= cand_head[h]:
            path.append(t)
            free[t] = False
        else:
            path.insert(0, h)
            free[h] = False
    return path


def _spectral(W: np.ndarray, freq: np.ndarray) -> list[int]:
    """Order by the Fiedler vector of the normalised Laplacian (a tiny uniform weight keeps the graph connected)."""
    n = len(W)
    A = W / (W.max() if W.max() > 0 else 1.0) + 1e-6
    np.fill_diagonal(A, 0.0)
    d = A.sum(axis=1)
    dinv = 1.0 / np.sqrt(d)
    Lsym = np.eye(n) - dinv[:, None] * A * dinv[None, :]
    vals, vecs = np.linalg.eigh(Lsym)
    fiedler = vecs[:, 1] * dinv if n > 1 else np.zeros(n)
    if n > 1 and fiedler[int(np.argmax(freq))] > np.median(fiedler):
        fiedler = -fiedler  # deterministic orientation: the hottest expert towards the front
    return [int(x) for x in np.lexsort((np.arange(n), fiedler))]


def two_opt(order: list[int], W: np.ndarray, max_moves: int | None = None) -> list[int]:
    """Best-improvement 2-opt (segment reversal) on the path objective sum W[o_i, o_(i+1)]."""
    n = len(order)
    if n < 3:
        return list(order)
    Wv = np.zeros((n + 1, n + 1))
    Wv[:n, :n] = W  # node n: a virtual end with zero weight, so reversals may touch either end
    P = np.array([n, *order, n])
    moves = 0
    limit = max_moves if max_moves is not None else 20 * n
    jj, ii = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1))
    upper = jj > ii
    while moves < limit:
        Wp = Wv[np.ix_(P, P)]
        d = Wp[np.arange(n + 1), np.arange(1, n + 2)]  # d[m] = W[P[m], P[m+1]]
        gain = Wp[0:n, 1 : n + 1] + Wp[1 : n + 1, 2 : n + 2] - d[0:n, None] - d[None, 1 : n + 1]
        gain = np.where(upper, gain, -np.inf)
        best = int(np.argmax(gain))
        i, j = divmod(best, n)
        if gain[i, j] <= 1e-9:
            break
        i, j = i + 1, j + 1
        P[i : j + 1] = P[i : j + 1][::-1].copy()
        moves += 1
    return [int(x) for x in P[1:-1]]


def order_experts(coactivation: np.ndarray, frequency=None, *, method: str = "auto") -> list[int]:
    """A file order of one layer's experts placing strongly co-activated experts side by side.

    coactivation: [E, E] tokens routed to both (the diagonal is ignored). frequency: [E] tokens
    routed to each (defaults to the diagonal); breaks ties and puts hot experts first.
    method: "auto" (the candidates below after 2-opt, keep the best score; spectral only up to 128
    experts), "greedy", "chain", "spectral".
    Experts that never fire go last, in index order."""
    C = np.asarray(coactivation)
    W = _weights(C)
    n = len(W)
    freq = np.asarray(frequency if frequency is not None else np.diag(C), dtype=np.float64)
    if freq.shape != (n,):
        raise ValueError(f"frequency must have {n} entries, got {freq.shape}")
    live = np.flatnonzero((freq > 0) | (W.sum(axis=1) > 0))
    dead = [int(x) for x in np.setdiff1d(np.arange(n), live)]
    if len(live) == 0:
        return list(range(n))
    Wl, fl = W[np.ix_(live, live)], freq[live]
    # auto: every method for small layers; above 128 experts spectral's 2-opt is slow (12 s at
    # 512 experts against ~2 s for greedy) and was never better by more than ~0.5%: skip it there
    methods = (METHODS if len(live) <= 128 else ("greedy", "chain")) if method == "auto" else (method,)
    best, best_score = None, -1.0
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown seriation method {m!r}; known: auto, {', '.join(METHODS)}")
        cand = two_opt({"greedy": _greedy_edges, "chain": _chain, "spectral": _spectral}[m](Wl, fl), Wl)
        score = adjacency_score(cand, Wl)
        if score > best_score + 1e-9:
            best, best_score = cand, score
    return [int(live[i]) for i in best] + dead


def profile_orders(profile, *, method: str = "auto") -> dict[int, list[int]]:
    """Per-layer file orders from a profile: a profile folder, an Aggregates, or a trace."""
    from ..manifests.profile import Aggregates, read_aggregates
    from .profile import aggregate

    if isinstance(profile, Aggregates):
        agg = profile
    elif isinstance(profile, (str, Path)) and Path(profile).is_dir():
        agg = read_aggregates(profile)
    else:
        agg = aggregate(profile)
    return {layer: order_experts(agg.coactivation[i], agg.frequency[i], method=method)
            for i, layer in enumerate(agg.layers)}


# ----------------------------------------------------------------------------- held-out traces


def split_trace(trace, holdout: float = 0.25) -> tuple[pa.Table, pa.Table]:
    """(calibration, held-out) by whole sequences: every round(1/holdout)-th sequence is held out."""
    if not 0 < holdout < 1:
        raise ValueError("holdout must be between 0 and 1")
    table = trace if isinstance(trace, pa.Table) else None
    t = trace_arrays(trace)
    seqs = np.unique(t.seq)
    step = max(2, round(1 / holdout))
    held = np.isin(t.seq, seqs[step - 1 :: step])
    meta = trace_meta(table) if table is not None else {}
    return _subset(t, ~held, meta), _subset(t, held, meta)


def _subset(t: TraceArrays, mask: np.ndarray, meta: dict) -> pa.Table:
    sub = TraceArrays(
        t.seq[mask], t.token[mask], t.layer[mask], t.experts[mask],
        t.weights[mask] if t.weights is not None else None,
        t.weights_valid[mask] if t.weights_valid is not None else None, t.num_experts, t.layers,
    )
    return arrays_to_table(sub, meta)
