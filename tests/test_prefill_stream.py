"""A long prompt's prefill: its expert groups read in layout order while the previous group computes
(the same logits as the plain path and mlx-lm), inside the plan's prefill room, and an admission rule
that keeps the decode's hot set cached through it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from oracle import reference_model

import moestream
from moestream.manifests.profile import TraceArrays
from moestream.runtime.measure.replay import prefill_admission_replay


def ids(n: int) -> list[int]:
    return [(i * 7919) % 300 + 5 for i in range(n)]


def _logits(source, budget, prompt, **streamer):
    with moestream.load(source, memory_budget=budget) as (model, _):
        rt = moestream.runtime_of(model)
        for key, value in streamer.items():
            setattr(rt.streamer, key, value)
        out = model(mx.array([prompt]))
        mx.eval(out)
        return out, rt.streamer, rt.cache.stats()


def test_overlapped_prefill_gives_the_plain_paths_logits_in_several_groups(bundle_dir, synth_dir, monkeypatch):
    bundle = bundle_dir("qwen3_moe")
    budget = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    prompt = ids(96)
    plain, s, _ = _logits(bundle, budget, prompt, prefill_pipeline=False)
    assert s.prefill_calls == 0
    piped, s, _ = _logits(bundle, budget, prompt, prefill_min_group_bytes=0)
    assert s.prefill_groups_run >= 4 * s.prefill_calls > 0 and s.prefill_overlapped > 0, "several groups, overlapped"
    assert mx.array_equal(plain, piped).item()
    # the groups follow the layout order, whatever it is: reversed here, the same logits
    from moestream.runtime.model.streaming import ExpertStreamer

    order = ExpertStreamer.layout_order
    monkeypatch.setattr(ExpertStreamer, "layout_order", lambda self, layer, e: order(self, layer, e)[::-1])
    backwards, _, _ = _logits(bundle, budget, prompt, prefill_min_group_bytes=0)
    assert mx.array_equal(plain, backwards).item()
    want = reference_model(synth_dir("qwen3_moe"), bits=4)(mx.array([prompt]))
    assert float(mx.abs(want - piped).max()) <= 1e-5 * float(mx.abs(want).max())


def test_prefill_groups_fit_the_prefill_room(bundle_dir):
    """Two groups (one stacked, the next one's reads) fit the room the plan keeps for a prefill, even
    at the least budget, where that room is one layer's k experts."""
    bundle = bundle_dir("qwen3_moe")
    for budget in (moestream.plan_memory(bundle).minimum_bytes, moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes):
        with moestream.load(bundle, memory_budget=budget) as (model, _):
            rt = moestream.runtime_of(model)
            s = rt.streamer
            s.prefill_min_group_bytes = 0
            assert s.prefill_room == rt.plan.prefill_room_bytes >= rt.plan.min_layer_bytes
            for layer in rt.store.layers:
                groups = s.prefill_groups(layer, s.layout_order(layer, range(rt.num_experts)))
                sizes = [sum(rt.store.nbytes(layer, e) for e in g) for g in groups]
                assert sum(len(g) for g in groups) == rt.num_experts
                assert max(sizes) <= s.prefill_room // 2
            model(mx.array([ids(64)]))


def test_a_checkpoint_stores_reads_come_back_evaluated_from_the_prefill_thread(synth_dir):
    """A source checkpoint's experts are casts and slices with work left; read on the prefill thread,
    they are evaluated there (MLX streams belong to the thread that made them)."""
    source = synth_dir("qwen3_moe")
    plain, _, _ = _logits(source, None, ids(40), prefill_pipeline=False)
    piped, s, _ = _logits(source, None, ids(40), prefill_min_group_bytes=0)
    assert s.prefill_calls > 0 and mx.array_equal(plain, piped).item()


def _hot_and_cold_trace(layers: list[int], num_experts: int, k: int, short: int, long: int, decode: int) -> TraceArrays:
    """One stream: a long prompt on some experts, then a decode on a hot set of the others."""
    rng = np.random.default_rng(0)
    hot, cold = np.arange(6), np.arange(6, num_experts)
    kinds = ["cold"] * (short + decode + long) + ["hot"] * decode
    seq, token, layer, experts = [], [], [], []
    for t, kind in enumerate(kinds):
        for ly in layers:
            seq.append(0)
            token.append(t)
            layer.append(ly)
            experts.append(rng.choice(hot if kind == "hot" else cold, k, replace=False))
    return TraceArrays(np.array(seq), np.array(token), np.array(layer), np.array(experts), None, None, num_experts, layers)


def test_the_default_admission_keeps_the_decodes_hot_set_through_a_long_prompt(bundle_dir):
    """Decode hit rate after a 64-token prompt vs after a 1-token one, through the real streamer and
    cache: within 2 points with the default rule ("free"), from an empty cache and when the request
    runs again; caching the prompt's reads like the decode's ("all") flushes the hot set."""
    from moestream.manifests.open import open_bundle
    from moestream.runtime.model.streaming import PREFILL_ADMISSION

    bundle = bundle_dir("qwen3_moe")
    b = open_bundle(bundle)
    trace = _hot_and_cold_trace(sorted(b.layers), b.num_experts, b.experts_per_token, 1, 64, 8)
    rows = prefill_admission_replay(bundle, trace, rules=PREFILL_ADMISSION, budgets=[0.5], prompt_tokens=(1, 64),
                                    decode_tokens=8, requests=1)
    hit = {(r["rule"], r["start"], r["prompt_tokens"]): r["decode_hit_rate"] for r in rows}
    assert PREFILL_ADMISSION[0] == "free"
    for start in ("cold", "warm"):
        assert hit[("free", start, 64)] >= hit[("free", start, 1)] - 0.02, start
    assert hit[("free", "warm", 64)] == pytest.approx(1.0)
    assert hit[("all", "warm", 64)] < hit[("all", "warm", 1)] - 0.05, "the old rule flushes the hot set"
