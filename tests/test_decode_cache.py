"""The expert cache borrows the room the budget keeps for a prefill chunk while no prefill runs:
while decoding it holds MemoryPlan.decode_cache_bytes; a prefill chunk takes its room back first
(evicting by the policy), so the budget holds for a long prompt after a full cache, the logits are
those of the cache that never borrowed, and the cache refills as the decode reads."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest

import moestream
from moestream.runtime.cache.expert_cache import CacheFullError, ExpertCache
from moestream.runtime.frontends.generate import generate_text


def ids(n: int, vocab: int = 320, seed: int = 0) -> list[int]:
    return [(i * 7919 + seed * 104729) % (vocab - 10) + 5 for i in range(n)]


def test_set_capacity_evicts_by_policy_and_keeps_pins():
    cache = ExpertCache(100, "lru")
    for k in "abcd":
        cache.put(k, k, 25)
    cache.get("a")  # most recent now: b is the least valuable
    cache.pin("c")
    assert cache.set_capacity(50) == 50
    assert set(cache._values) == {"a", "c"} and cache.capacity_bytes == 50
    with pytest.raises(CacheFullError):
        cache.set_capacity(10)  # c is pinned
    assert cache.capacity_bytes == 50 and len(cache) == 2
    assert cache.set_capacity(200) == 0
    cache.put("e", "e", 150)
    assert cache.stats()["expert_cache_bytes"] == 200


def test_the_decode_cache_takes_the_prefill_room(bundle_dir):
    """decode_cache_bytes: the largest cache whose held bytes fit all the budget has beyond its
    minimum; a chunk gets back what it needs (the plan's own chunk: cache_bytes); the least budget
    has no room to lend."""
    bundle = bundle_dir("qwen3_moe")
    least = moestream.plan_memory(bundle)
    assert moestream.plan_memory(bundle, memory_budget=least.minimum_bytes).decode_cache_bytes == least.min_layer_bytes
    for share in (0.1, 0.25, 0.5):
        plan = moestream.plan_memory(bundle, expert_cache_share=share)
        needs, spare = plan.needs, plan.budget_bytes - plan.minimum_bytes
        dec = plan.decode_cache_bytes
        assert plan.cache_bytes < dec <= plan.expert_bytes
        assert needs._cache_cost(dec) <= spare, "the decode's cache fits the budget"
        if dec < plan.expert_bytes:
            assert needs._cache_cost(dec + 1) > spare, "and takes all of it"
        # about the plan's cache plus the prefill room, counted as the cache counts
        assert dec == pytest.approx(plan.cache_bytes + plan.activation_bytes / needs.held_ratio, rel=0.02, abs=4096)
        assert plan.cache_bytes_for(plan.prefill_tokens) == plan.cache_bytes == plan.cache_bytes_for(None)
        assert plan.cache_bytes_for(plan.prefill_tokens * 4) == plan.cache_bytes
        sizes = [plan.cache_bytes_for(n) for n in (1, 2, 8, 16, 64, plan.prefill_tokens)]
        assert sizes == sorted(sizes, reverse=True)
        for n in (2, 16, 64, plan.prefill_tokens - 1):
            cache = plan.cache_bytes_for(n)
            if n < plan.prefill_tokens and cache < plan.expert_bytes:
                assert (needs._cache_cost(cache) + max(0, needs._extra(n)) + needs._stacked(n, cache)) <= spare


@pytest.mark.parametrize("lend", [True, False])
def test_a_long_prompt_after_a_full_cache(bundle_dir, lend):
    """The cache filled to its decode size; then a prompt of several plan chunks: the peak stays
    inside the budget, the first chunk shrank the cache, and the decode after it refills the cache
    past what a prefill leaves. lend=False: the cache never grows (the A/B variant)."""
    bundle = bundle_dir("qwen3_moe")
    plan = moestream.plan_memory(bundle, expert_cache_share=0.25)
    budget = plan.budget_bytes
    gc.collect()
    before = mx.get_active_memory()
    with moestream.load(bundle, memory_budget=budget) as (model, tokenizer):
        rt = moestream.runtime_of(model)
        rt.streamer.lend_prefill_room = lend
        generate_text(model, tokenizer, ids(4), max_tokens=2, out=None)  # a decode step sized the cache
        assert rt.cache.capacity_bytes == (plan.decode_cache_bytes if lend else plan.cache_bytes)
        for layer in rt.store.layers:  # every expert once: the cache full at its decode size
            for e in range(0, rt.num_experts, 8):
                experts = list(range(e, min(e + 8, rt.num_experts)))
                rt.streamer.acquire(layer, experts)
                rt.streamer.release(layer, experts)
        full = rt.cache.stats()["expert_cache_bytes"]
        assert full > plan.cache_bytes if lend else full <= plan.cache_bytes
        shrinks = rt.streamer.cache_shrinks
        seen = []  # (tokens, bytes cached) as each MoE layer starts: after the cache was sized for the pass

        def observe(layer, x, indices):
            seen.append((indices.size // indices.shape[-1], rt.cache.stats()["expert_cache_bytes"]))

        rt.streamer.observers.append(observe)
        n = plan.prefill_tokens * 3 + 5
        # in the plan's chunks, then in the larger one a prompt that leaves KV reserve unused gets
        for step in (plan.prefill_tokens, None):
            _, r = generate_text(model, tokenizer, ids(n, seed=1), max_tokens=12, out=None, prefill_step_size=step)
            assert r.prefill_step_size == (step or plan.prefill_tokens_for(n))
            assert r.peak_memory_bytes - before <= budget, (step, r.peak_memory_bytes, before, budget)
        assert r.prefill_step_size > plan.prefill_tokens
        limit = plan.cache_bytes_for if lend else (lambda tokens: plan.cache_bytes)
        assert all(cached <= limit(tokens) for tokens, cached in seen), seen
        assert {1, plan.prefill_tokens} <= {t for t, _ in seen} and max(t for t, _ in seen) > plan.prefill_tokens
        assert rt.streamer.cache_shrinks > shrinks if lend else rt.streamer.cache_shrinks == shrinks
        after = rt.cache.stats()["expert_cache_bytes"]
        if lend:
            assert rt.cache.capacity_bytes == plan.decode_cache_bytes
            assert after > plan.cache_bytes, "the decode refilled the cache past what a prefill leaves"
        else:
            assert after <= plan.cache_bytes and rt.cache.capacity_bytes == plan.cache_bytes


def test_borrowing_leaves_the_logits_alone(bundle_dir):
    """The same prompt (a warm, full cache, then a prompt of several chunks), with the room lent
    and without: the same log-probabilities of every generated token."""
    from mlx_lm.generate import generate_step

    bundle = bundle_dir("qwen3_moe")
    plan = moestream.plan_memory(bundle, expert_cache_share=0.25)
    out = {}
    for lend in (True, False):
        with moestream.load(bundle, memory_budget=plan.budget_bytes) as (model, _):
            rt = moestream.runtime_of(model)
            rt.streamer.lend_prefill_room = lend
            runs = []
            for seed, n in ((2, 8), (3, plan.prefill_tokens * 2 + 3)):
                steps = generate_step(mx.array(ids(n, seed=seed)), model, max_tokens=6,
                                      prefill_step_size=plan.prefill_tokens)
                runs.append([(int(t), lp) for t, lp in steps])
            out[lend] = runs
    for a, b in zip(out[True], out[False], strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        for (_, x), (_, y) in zip(a, b, strict=True):
            assert mx.array_equal(x, y).item()
