"""Routing traces, profile aggregates, calibration text, and the seriated layout."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pytest
from mlx_lm.models.switch_layers import SwitchGLU
from oracle import reference_model

import moestream
from moestream.manifests.profile import (
    arrays_to_table,
    read_aggregates,
    read_trace,
    trace_arrays,
    write_aggregates,
    write_trace,
)
from moestream.runtime.measure.layout import measure_layout
from moestream.runtime.measure.trace import TraceRecorder
from moestream.stages.profile import (
    CalibrationError,
    aggregate,
    calibration_sequences,
    load_calibration,
    profile_model,
    summarize,
)
from moestream.stages.seriate import (
    adjacency_score,
    order_experts,
    profile_orders,
    split_trace,
)

PROMPT = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8, 250, 17, 42, 7]


def _reference_routing(model, prompt, monkeypatch):
    """mlx-lm's own model: the indices its SwitchGLU modules receive (in call order = layer order)
    and the inputs of its MoE blocks, captured by patching the classes (not by moestream code)."""
    seen, inputs = [], []
    orig_switch = SwitchGLU.__call__

    def switch(self, x, indices):
        seen.append(np.array(indices))
        return orig_switch(self, x, indices)

    monkeypatch.setattr(SwitchGLU, "__call__", switch)
    blocks = [m for _, m in model.named_modules() if hasattr(m, "switch_mlp") or hasattr(m, "experts")]
    block_cls = {type(b) for b in blocks}
    for cls in block_cls:
        orig = cls.__call__

        def block(self, x, _orig=orig):
            inputs.append((self, x))
            return _orig(self, x)

        monkeypatch.setattr(cls, "__call__", block)
    mx.eval(model(mx.array([prompt])))
    monkeypatch.undo()
    return seen, inputs


def test_trace_matches_mlx_lm_router_indices_and_weights(synth_dir, monkeypatch):
    ck = synth_dir("qwen3_moe")
    ref = reference_model(ck, bits=None)
    ref_idx, ref_in = _reference_routing(ref, PROMPT, monkeypatch)

    model, _ = moestream.load(ck)
    with TraceRecorder(model) as rec:
        mx.eval(model(mx.array([PROMPT])))
    table = rec.table()
    t = trace_arrays(table)
    layers = sorted(moestream.runtime_of(model).store.layers)
    k = json.loads((ck / "config.json").read_text())["num_experts_per_tok"]
    assert len(t) == len(PROMPT) * len(layers) and t.k == k
    assert set(zip(t.token.tolist(), t.layer.tolist(), strict=True)) == {(i, la) for i in range(len(PROMPT)) for la in layers}
    assert rec.metadata()["weights"] == "router"
    for i, layer in enumerate(layers):
        rows = t.layer == layer
        assert (t.experts[rows] == ref_idx[i].reshape(-1, k)).all()
        # the weights qwen3_moe's block computes: softmax over all experts, top-k, renormalised
        block, x = ref_in[i]
        gates = mx.softmax(block.gate(x), axis=-1, precise=True)
        w = mx.take_along_axis(gates, mx.array(ref_idx[i]), axis=-1)
        w = np.array(w / w.sum(axis=-1, keepdims=True)).reshape(-1, k)
        np.testing.assert_allclose(t.weights[rows], w, rtol=1e-4, atol=1e-6)
    # the recorder is gone after the with block: the model's classes are its own again
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_trace_indices_match_mlx_lm_other_families(family, synth_dir, monkeypatch):
    ck = synth_dir(family)
    ref_idx, _ = _reference_routing(reference_model(ck, bits=None), PROMPT, monkeypatch)
    model, _ = moestream.load(ck)
    with TraceRecorder(model) as rec:
        mx.eval(model(mx.array([PROMPT])))
    t = trace_arrays(rec.table())
    layers = sorted(moestream.runtime_of(model).store.layers)
    assert len(t) == len(PROMPT) * len(layers)
    for i, layer in enumerate(layers):
        assert (t.experts[t.layer == layer] == ref_idx[i].reshape(-1, t.k)).all()
    assert t.weights is not None and np.isfinite(t.weights).all() and (t.weights > 0).all()
    if family in ("mixtral", "gpt_oss"):  # softmax over the top-k: the weights sum to 1
        np.testing.assert_allclose(t.weights.sum(axis=1), 1.0, rtol=1e-5)


def test_trace_numbers_decode_tokens_after_prefill(bundle_dir, tmp_path):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = moestream.load(bundle_dir("qwen3_moe"))
    with TraceRecorder(model, weights=False) as rec:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([PROMPT[:6]]), cache=cache))
        for tok in PROMPT[6:9]:
            mx.eval(model(mx.array([[tok]]), cache=cache))
        rec.next_sequence()
        mx.eval(model(mx.array([PROMPT[:4], PROMPT[4:8]])))  # a batch: two more sequences
    table = read_trace(write_trace(rec.table(), tmp_path / "t.parquet"))
    t = trace_arrays(table)
    n_layers = len(moestream.runtime_of(model).store.layers)
    assert sorted(set(t.token[t.seq == 0].tolist())) == list(range(9))
    assert (np.unique(t.seq) == [0, 1, 2]).all() and (t.seq == 2).sum() == 4 * n_layers
    assert t.weights is None and table.column("weights").null_count == len(t)


def _random_trace(rng, seqs=6, length=40, layers=(0, 1, 2), E=16, k=4) -> pa.Table:
    rows = []
    for s in range(seqs):
        for tok in range(length):
            for layer in layers:
                p = np.linspace(2, 0.2, E)
                p /= p.sum()
                rows.append((s, tok, layer, rng.choice(E, k, replace=False, p=p)))
    from moestream.manifests.profile import TraceArrays

    ex = np.array([r[3] for r in rows])
    w = rng.random(ex.shape).astype(np.float32)
    t = TraceArrays(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                    ex, w, np.ones(len(rows), bool), E, list(layers))
    return arrays_to_table(t)


def test_aggregates_are_consistent(tmp_path):
    rng = np.random.default_rng(0)
    table = _random_trace(rng)
    t = trace_arrays(table)
    agg = aggregate(table)
    tokens, k = 6 * 40, 4
    assert (agg.tokens == tokens).all()
    assert (agg.frequency.sum(axis=1) == tokens * k).all()
    for i in range(3):
        c = agg.coactivation[i]
        assert (c == c.T).all() and (np.diag(c) == agg.frequency[i]).all()
        assert ((c.sum(axis=1) - np.diag(c)) == agg.frequency[i] * (k - 1)).all()
        np.testing.assert_allclose(agg.mass[i].sum(), t.weights[t.layer == i].sum(), rtol=1e-5)
    assert (agg.transitions.sum(axis=(1, 2)) == tokens * k * k).all()
    assert (agg.reuse_pairs == 6 * 39).all() and ((agg.reuse >= 0) & (agg.reuse <= 1)).all()
    # reuse by brute force for one layer
    ex = t.experts[t.layer == 1].reshape(6, 40, k)
    brute = np.mean([len(set(ex[s, i]) & set(ex[s, i - 1])) / k for s in range(6) for i in range(1, 40)])
    assert agg.reuse[1] == pytest.approx(brute)
    s = summarize(agg)
    assert s["tokens"] == tokens and 0 < s["hot_mass_share"] <= 1 and 0 <= s["next_token_reuse"] <= 1
    write_aggregates(agg, tmp_path)
    back = read_aggregates(tmp_path)
    for name in ("frequency", "coactivation", "transitions", "tokens", "reuse_pairs"):
        assert (getattr(back, name) == getattr(agg, name)).all(), name
    np.testing.assert_allclose(back.mass, agg.mass)
    np.testing.assert_allclose(back.reuse, agg.reuse)


def test_profile_model_writes_trace_aggregates_and_summary(synth_dir, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(load_calibration()[0][:4000])
    r = profile_model(synth_dir("qwen3_moe"), text, tmp_path / "profile", max_tokens=192, seq_len=64)
    for name in ("trace", "frequency", "coactivation", "reuse", "transitions"):
        assert r.files[name].is_file()
    assert r.summary["tokens"] == 192 and r.summary["weights"] == "router" and r.run["bytes_read"] > 0
    t = trace_arrays(r.trace)
    assert len(t) == 192 * 3 and len(np.unique(t.seq)) == 3
    assert json.loads((tmp_path / "profile" / "summary.json").read_text())["tokens"] == 192
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.figures == []
    else:
        assert {p.name for p in r.figures} >= {"frequency.png", "coactivation.png"}
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in r.figures)


def test_calibration_sources(tmp_path):
    docs = load_calibration()
    assert len(docs) >= 2 and 100_000 < sum(len(d) for d in docs) < 500_000
    (tmp_path / "a.txt").write_text("hello world " * 50)
    assert load_calibration(tmp_path / "a.txt") == ["hello world " * 50]
    assert load_calibration(tmp_path) == ["hello world " * 50]
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CalibrationError, match="datasets"):
            load_calibration("someone/some-dataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no \\*.txt"):
        load_calibration(tmp_path / "empty")

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return list(text.encode())

    seqs = calibration_sequences(Tok(), ["a" * 100, "b" * 30], seq_len=16, max_tokens=64)
    assert sum(map(len, seqs)) == 64 and seqs[1][0] == ord("b")  # round-robin across documents


def _planted(rng, E=32, k=4, tokens=3000, noise=0.15):
    """Experts in hidden groups of k that fire together (plus noise), under a random labelling."""
    groups = rng.permutation(E).reshape(E // k, k)
    rows = [groups[rng.integers(len(groups))] if rng.random() > noise else rng.choice(E, k, replace=False)
            for _ in range(tokens)]
    return groups, np.array(rows)


def test_seriation_puts_planted_groups_side_by_side():
    rng = np.random.default_rng(1)
    groups, ex = _planted(rng)
    E = 32
    C = np.zeros((E, E))
    for row in ex:
        C[np.ix_(row, row)] += 1
    for method in ("auto", "greedy", "chain", "spectral"):
        order = order_experts(C, np.diag(C), method=method)
        assert sorted(order) == list(range(E))
        pos = np.empty(E, int)
        pos[order] = np.arange(E)
        contiguous = sum(int(np.ptp(pos[g]) == len(g) - 1) for g in groups)
        assert contiguous == len(groups), method
        assert adjacency_score(order, C) > 3 * adjacency_score(range(E), C)


def test_profile_order_reads_less_than_identity_on_held_out_trace():
    rng = np.random.default_rng(2)
    E, k = 32, 4
    groups, ex = _planted(rng, E, k, tokens=4000)
    n = len(ex)
    from moestream.manifests.profile import TraceArrays

    t = TraceArrays(np.arange(n) // 100, np.arange(n) % 100, np.zeros(n, int), ex, None, None, E, [0])
    cal, held = split_trace(arrays_to_table(t), holdout=0.25)
    assert len(trace_arrays(cal)) + len(trace_arrays(held)) == n
    orders = profile_orders(cal)
    size = 3 * 16384 + 1000  # extents not a multiple of the alignment: padding between them
    ident = measure_layout(held, None, size)
    prof = measure_layout(held, orders, size)
    assert ident["experts_read"] == prof["experts_read"] == len(trace_arrays(held)) * k
    assert prof["reads"] < 0.6 * ident["reads"]
    assert prof["mean_read_bytes"] > ident["mean_read_bytes"]
    # with no coalescing across padding each extent is its own read, whatever the order
    assert measure_layout(held, orders, size, coalesce_gap=0)["reads"] == prof["experts_read"]


def test_measure_layout_counts_runs_exactly():
    from moestream.manifests.profile import TraceArrays

    ex = np.array([[0, 1, 2, 3], [0, 2, 4, 6], [5, 4, 7, 6]])
    t = TraceArrays(np.zeros(3, int), np.arange(3), np.zeros(3, int), ex, None, None, 8, [0])
    # extents exactly one alignment unit: touching; with no coalescing gap only touching ones merge
    m = measure_layout(t, None, 16384, coalesce_gap=0)
    assert m["reads"] == 1 + 4 + 1 and m["bytes_read"] == 12 * 16384
    m = measure_layout(t, {0: [0, 2, 4, 6, 1, 3, 5, 7]}, 16384, coalesce_gap=0)
    assert m["reads"] == 2 + 1 + 2
    # the runtime's gap (one alignment unit) also reads across one skipped extent: 0,2,4,6 in one read
    m = measure_layout(t, None, 16384)
    assert m["reads"] == 1 + 1 + 1 and m["bytes_read"] == (4 + 7 + 4) * 16384
