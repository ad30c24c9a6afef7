"""A long prompt's prefill: its expert groups read in layout order while the previous group computes
(the same logits as the plain path and mlx-lm), inside the plan's prefill room, and an admission rule
that keeps the decode's hot set cached through it."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from oracle import reference_model

import moestream
from moestream.manifests.profile import TraceArrays
from moestream.runtime.measure.replay import prefill_admission_replay
from moestream.runtime.model.streaming import busy_seconds


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
    """The groups held at once (one stacked, the next ones' reads) fit the room the plan keeps for a
    prefill, even at the least budget, where that room is one layer's k experts."""
    bundle = bundle_dir("qwen3_moe")
    from moestream.runtime.model import budget

    for limit in (moestream.plan_memory(bundle).minimum_bytes, moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes):
        with moestream.load(bundle, memory_budget=limit) as (model, _):
            rt = moestream.runtime_of(model)
            s = rt.streamer
            s.prefill_min_group_bytes = 0
            assert s.prefill_room == rt.plan.prefill_room_bytes >= rt.plan.min_layer_bytes
            for layer in rt.store.layers:
                groups = s.prefill_groups(layer, s.layout_order(layer, range(rt.num_experts)))
                sizes = [sum(rt.store.nbytes(layer, e) for e in g) for g in groups]
                assert sum(len(g) for g in groups) == rt.num_experts
                assert max(sizes) <= s.prefill_room // budget.PREFILL_GROUPS_HELD
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
    cache: within 2 points with the default rule ("recent") and with "free", from an empty cache and
    when the request runs again; caching the prompt's reads like the decode's ("all") flushes the hot set."""
    from moestream.manifests.open import open_bundle
    from moestream.runtime.model.streaming import PREFILL_ADMISSION

    bundle = bundle_dir("qwen3_moe")
    b = open_bundle(bundle)
    trace = _hot_and_cold_trace(sorted(b.layers), b.num_experts, b.experts_per_token, 1, 64, 8)
    rows = prefill_admission_replay(bundle, trace, rules=PREFILL_ADMISSION, budgets=[0.5], prompt_tokens=(1, 64),
                                    decode_tokens=8, requests=1)
    hit = {(r["rule"], r["start"], r["prompt_tokens"]): r["decode_hit_rate"] for r in rows}
    assert PREFILL_ADMISSION[0] == "recent"
    for rule in ("recent", "free"):
        for start in ("cold", "warm"):
            assert hit[(rule, start, 64)] >= hit[(rule, start, 1)] - 0.02, (rule, start)
        assert hit[(rule, "warm", 64)] == pytest.approx(1.0)
    assert hit[("all", "warm", 64)] < hit[("all", "warm", 1)] - 0.05, "the old rule flushes the hot set"


def test_the_plan_counts_the_groups_a_prefill_holds(bundle_dir, monkeypatch):
    """What the plan counts for a prefill chunk's routed experts outside the cache is what the
    pipeline holds: PREFILL_GROUPS_HELD groups cut by budget.prefill_group_bytes (one rule for both).
    With its floor lowered to three experts, the tiny bundle's layers split as a 397B layer's do (a
    short prompt's 160 experts in groups of ~95 MB): every group fits its share of the room the plan
    gave that pass, which the groups held nearly fill, and a short prompt's cache is larger than the plan gives a pass that
    stacks every routed expert at once (what it counted for a prefill before). The budget holds."""
    from moestream.runtime.frontends.generate import generate_text
    from moestream.runtime.model import budget

    bundle = bundle_dir("qwen3_moe")
    expert = moestream.plan_memory(bundle).needs.routed_bytes[0]
    monkeypatch.setattr(budget, "PREFILL_MIN_GROUP_BYTES", 3 * expert)
    plan = moestream.plan_memory(bundle, expert_cache_share=0.5)
    assert plan.cache_bytes_for(16) > plan.cache_bytes_for(16, pipelined=False) + 4 * expert
    assert plan.prefill_room_for(16) < plan.prefill_room_for(16, pipelined=False)
    gc.collect()
    before = mx.get_active_memory()
    with moestream.load(bundle, memory_budget=plan.budget_bytes) as (model, tokenizer):
        rt = moestream.runtime_of(model)
        s = rt.streamer
        seen, cut = [], s.prefill_groups

        def prefill_groups(layer, experts):
            groups = cut(layer, experts)
            sizes = [sum(rt.store.nbytes(layer, e) for e in g) for g in groups]
            total = sum(rt.store.nbytes(layer, e) for e in experts)
            seen.append((s._sized_for, s.cache.capacity_bytes, s.prefill_room, total, sizes))
            return groups

        s.prefill_groups = prefill_groups
        for speculate in (False, True):  # with a long call's first group read before its routing too
            s.prefill_speculate = speculate
            generate_text(model, tokenizer, ids(4), max_tokens=8, out=None)  # the cache at its decode size
            for n in (17, plan.prefill_tokens * 2 + 5):  # a short prompt; one of several chunks
                _, r = generate_text(model, tokenizer, ids(n), max_tokens=4, out=None, prefill_step_size=plan.prefill_tokens)
                assert r.peak_memory_bytes - before <= plan.budget_bytes, (speculate, n, r.peak_memory_bytes, before)
        assert s.speculated > 0
    assert {key for key, *_ in seen} >= {(16, True), (plan.prefill_tokens, True)}
    for (tokens, pipelined), capacity, room, total, sizes in seen:
        assert pipelined and capacity == plan.cache_bytes_for(tokens) and room == plan.prefill_room_for(tokens)
        held = budget.PREFILL_GROUPS_HELD
        assert budget.prefill_group_bytes(total) <= room // held, "the plan counted the rule's groups"
        assert held * max(sizes) <= room < held * (max(sizes) + expert), "and about no more than those held"


def test_a_397b_shaped_short_prompt_holds_three_groups():
    """Qwen3.5-397B's shapes (512 experts of 7.08 MB a layer, top-10; from the synth preset, no
    weights): a 16-token chunk routes up to 160 experts (1.13 GB) and its pipeline holds three groups
    of ~1/12 of them; the plan keeps that room, not all 160, so at the budget whose cache holds 25%
    a short prompt leaves the cache ~0.85 GB more than a plan that counted all of them."""
    from moestream.runtime.model.budget import memory_needs, prefill_group_bytes
    from moestream.stages.synth import plan_checkpoint

    p = plan_checkpoint("qwen3_5_moe", "a397b", layers=2)
    d = p.dims
    expert = 3 * (d.hidden * d.moe_intermediate // 2 + 2 * 2 * (d.hidden * d.moe_intermediate // 64))  # 4-bit, g64
    assert expert == 7_077_888
    sizes = {(layer, e): expert for layer in range(d.layers) for e in range(d.experts)}
    needs = memory_needs(sizes, d.top_k, sum(t.nbytes for t in p.tensors if not t.expert), p.config, 2)
    plan = needs.plan(needs.budget_for_share(0.25))
    routed = 16 * d.top_k * expert
    assert plan.prefill_room_for(16) == 3 * prefill_group_bytes(routed) == 3 * -(-routed // 12)
    assert plan.prefill_room_for(16, pipelined=False) == routed
    gained = plan.cache_bytes_for(16) - plan.cache_bytes_for(16, pipelined=False)
    assert gained == pytest.approx(routed - plan.prefill_room_for(16), rel=0.01)
    assert gained > 0.8e9


def test_a_prefill_reuses_its_staging_slots_group_after_group(bundle_dir):
    """Staged reads (MLX's CUDA path; here on the CPU, without the CUDA advice): while a prefill
    runs, each group's reads take the slots the groups before gave back instead of making new ones,
    and a decode step keeps no more than one layer's k experts' slots. (The budget's own limit for
    idle read buffers is set to nothing here: this tiny model's groups would fit in it.)"""
    from moestream.runtime.model import budget
    from moestream.runtime.model.load import IOOptions

    bundle = bundle_dir("qwen3_moe")
    limit = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    with moestream.load(bundle, memory_budget=limit, io=IOOptions(stage_on_device=True)) as (model, _):
        rt = moestream.runtime_of(model)
        s, staging = rt.streamer, rt.store.staging
        rt.store.limit_idle_buffers(0)
        s.prefill_min_group_bytes = 0
        mx.eval(model(mx.array([ids(96)])))
        sizes = [rt.store.nbytes(layer, e) for layer in rt.store.layers for e in range(rt.num_experts)]
        group_slots = (s.prefill_room - s.prefill_room // budget.PREFILL_GROUPS_HELD) // min(sizes)
        read = rt.stats()["cache_misses"]
        assert s.prefill_groups_run >= 4 * s.prefill_calls > 0 and read >= 3 * group_slots
        # the slots of the groups read at once, made once (the first groups); every later group reuses them
        assert 0 < staging.allocations <= group_slots, (staging.allocations, group_slots, read)
        mx.eval(model(mx.array([[7]])))  # a decode step: its largest read is one layer's k experts
        assert 0 < staging._idle <= rt.plan.min_layer_bytes


def test_the_recent_rule_caches_what_the_prompts_last_tokens_routed_to(bundle_dir):
    """From an empty cache, "recent" caches of each layer's prefill the experts its latest tokens
    routed to (within the layer's share of the free room), where "free" caches whatever it reads
    first; the logits are the same either way."""
    from moestream.runtime.model.streaming import last_use

    bundle = bundle_dir("qwen3_moe")
    budget = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    prompt = ids(96)
    outs = {}
    for rule in ("free", "recent"):
        with moestream.load(bundle, memory_budget=budget) as (model, _):
            rt = moestream.runtime_of(model)
            s = rt.streamer
            s.prefill_admission, s.prefill_min_group_bytes = rule, 0
            routed = {}
            s.observers.append(lambda layer, x, indices, routed=routed: routed.__setitem__(layer, last_use(np.array(indices))))
            outs[rule] = model(mx.array([prompt]))
            mx.eval(outs[rule])
            ordered = 0
            for layer, last in routed.items():
                cached = {e for e in last if (layer, e) in rt.cache}
                rest = [last[e] for e in last if e not in cached]
                ordered += bool(cached and rest) and min(last[e] for e in cached) >= max(rest)
            if rule == "recent":  # each layer its share of the room: its latest experts, not all of them
                assert ordered == len(routed) == 3, "every layer cached its latest experts"
            else:  # the first layers fill the room with what they read first
                assert ordered < len(routed), "free caches in layout order, not by recency"
    assert mx.array_equal(outs["free"], outs["recent"]).item()


def test_busy_seconds_is_the_union_of_overlapping_reads():
    assert busy_seconds([]) == 0
    assert busy_seconds([(2.0, 3.0), (0.0, 1.0)]) == 2.0
    assert busy_seconds([(0.0, 2.0), (0.5, 1.0), (1.5, 3.0), (4.0, 4.5)]) == 3.5


def test_the_next_groups_read_is_queued_before_the_one_in_flight_ends(bundle_dir):
    """Two groups' reads in flight while a group computes: the disk goes on from one read to the
    next instead of waiting for a group's stacking (a store slowed to 30 ms a read makes the
    overlap certain); the time it was busy is the union of the reads' spans, not their sum."""
    import time

    bundle = bundle_dir("qwen3_moe")
    limit = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    with moestream.load(bundle, memory_budget=limit) as (model, _):
        rt = moestream.runtime_of(model)
        s, read = rt.streamer, rt.store.read

        def slow_read(layer, experts):
            time.sleep(0.03)
            return read(layer, experts)

        rt.store.read = slow_read
        s.prefill_min_group_bytes = 0
        s.prefill_spans = spans = []
        mx.eval(model(mx.array([ids(96)])))
    assert s.prefill_groups_run >= 4 * s.prefill_calls > 0
    by_layer = {}
    for layer, start, end in spans:
        by_layer.setdefault(layer, []).append((start, end))
    overlaps = sum(b[0] < a[1] for reads in by_layer.values() for a, b in zip(reads, reads[1:], strict=False))
    assert overlaps >= len(by_layer), "each layer starts a read before the one before it ends"
    assert s.prefill_read_s < sum(end - start for _, start, end in spans)
    assert s.prefill_read_s == pytest.approx(sum(busy_seconds(r) for r in by_layer.values()), rel=1e-6)

    with moestream.load(bundle, memory_budget=limit) as (model, _):  # one read at a time (an A/B's other side)
        s = moestream.runtime_of(model).streamer
        s.prefill_min_group_bytes, s.prefill_reads_ahead = 0, 1
        s.prefill_spans = spans = []
        mx.eval(model(mx.array([ids(96)])))
    assert s.prefill_groups_run >= 4 * s.prefill_calls > 0
    spans.sort(key=lambda r: r[1])
    assert all(b[1] >= a[2] for a, b in zip(spans, spans[1:], strict=False))


def test_a_long_calls_first_group_is_read_before_its_routing(bundle_dir):
    """prefill_speculate: each layer's first group (layout order) is submitted before the call's
    routing is computed (the observers run just before that host sync), the experts it routes to
    among them are its first group, and the logits are those of the path without the early read."""
    bundle = bundle_dir("qwen3_moe")
    limit = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    prompt = ids(96)
    want, off, _ = _logits(bundle, limit, prompt, prefill_min_group_bytes=0, prefill_speculate=False)
    assert off.speculated == 0
    with moestream.load(bundle, memory_budget=limit) as (model, _):
        s = moestream.runtime_of(model).streamer
        s.prefill_min_group_bytes, s.prefill_speculate = 0, True
        events, submit = [], s.prefill_submit

        def logged_submit(r):
            events.append(("read", r.layer))
            submit(r)

        s.prefill_submit = logged_submit
        s.observers.append(lambda layer, x, indices: events.append(("routing", layer)))
        got = model(mx.array([prompt]))
        mx.eval(got)
    layers = sorted({layer for _, layer in events})
    for layer in layers:
        assert events.index(("read", layer)) < events.index(("routing", layer)), (layer, events)
    assert s.speculated > 0 and 0 <= s.speculated_unused < s.speculated
    assert s.prefill_groups_run >= 4 * s.prefill_calls > 0
    assert float(mx.abs(want - got).max()) <= 1e-5 * float(mx.abs(want).max())


def test_an_early_read_is_taken_by_the_first_group_or_dropped_and_counted_unused(bundle_dir):
    """The read started before the routing: where the call's first group is made of its experts,
    that group's misses come from it (the same read, not a second one) and the rest count as
    unused; where the call routes to none of them, it is let finish, all of it counts as unused,
    and no group takes it. Either way the disk's busy time for it is counted."""
    from moestream.runtime.model.streaming import _ReadAhead

    bundle = bundle_dir("qwen3_moe")
    k = moestream.inspect(bundle)["experts_per_token"]
    limit = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    with moestream.load(bundle, memory_budget=limit) as (model, _):
        s = moestream.runtime_of(model).streamer
        s.prefill_min_group_bytes, s.prefill_speculate = 0, True
        layer = min(layer for layer, _ in s.store.bundle.extents)  # the first MoE layer's index
        order = s.layout_order(layer, range(s.num_experts))
        for takes in (False, True):  # dropped first: a taken read caches its experts
            s.reset_stats()
            early = s.speculate(layer, tokens=10_000, k=k)
            assert early is not None and early.missing and s.speculated == len(early.missing)
            rest = [e for e in order if e not in early.group]
            head = early.group[: max(1, len(early.group) // 2)] if takes else []
            groups = ([head] if head else []) + s.prefill_groups(layer, rest)
            ahead = _ReadAhead(s, layer, groups, early)
            if takes:
                first = ahead.next()
                assert first.group == head and first.future is early.future
                assert s.speculated_unused == len(set(early.missing) - set(head))
                s.prefill_wait(first)
                s.prefill_release(first)
            else:
                assert early.future.done() and ahead._next == 0
                assert s.speculated_unused == len(early.missing)
            ahead.close()
            assert s.prefill_read_s > 0 and early.span is not None
