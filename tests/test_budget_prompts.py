"""The memory budget holds for every prompt: the prompt is prefilled in chunks the plan sizes from
the budget (their activations counted from the config), and the KV cache stays inside the reserve."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest

import moestream
from moestream.runtime.frontends.generate import generate_text
from moestream.runtime.model.budget import DEFAULT_PREFILL_TOKENS, MIN_PREFILL_TOKENS, BudgetError


def ids(n: int, vocab: int = 320) -> list[int]:
    return [(i * 7919) % (vocab - 10) + 5 for i in range(n)]


def held_before() -> int:
    """MLX memory this process holds before a model loads (other tests' arrays not yet freed): the
    report's peak is MLX's, process-wide, and the budget is the model's."""
    gc.collect()
    return mx.get_active_memory()


def test_a_long_prompt_stays_inside_the_minimum_budget(bundle_dir):
    """1024 tokens at the least budget that runs: within it in the plan's chunks; in one chunk (what
    generate did before: mlx-lm's 2048-token default) the scores alone are 4 heads x 1024 x 1024."""
    bundle = bundle_dir("qwen3_moe")
    budget = moestream.plan_memory(bundle).minimum_bytes
    before = held_before()
    with moestream.load(bundle, memory_budget=budget) as (model, tokenizer):
        _, chunked = generate_text(model, tokenizer, ids(1024), max_tokens=4, out=None)
        _, whole = generate_text(model, tokenizer, ids(1024), max_tokens=4, out=None, prefill_step_size=1024)
    assert MIN_PREFILL_TOKENS <= chunked.prefill_step_size < 1024
    assert chunked.peak_memory_bytes - before <= budget, (chunked.peak_memory_bytes, before, budget)
    assert whole.peak_memory_bytes - before > budget, "the prompt is long enough to break the budget in one chunk"


def test_the_cache_counts_what_experts_really_hold(bundle_dir):
    """On the CPU in float32 a cached expert holds its whole extent (+4 KB) and the float32 copies of
    its scales and biases: the plan's held_ratio, measured with MLX's own counter."""
    bundle = bundle_dir("qwen3_moe")
    plan = moestream.plan_memory(bundle, expert_cache_share=0.5)
    with moestream.load(bundle, memory_budget=plan.budget_bytes) as (model, _):
        rt = moestream.runtime_of(model)
        for _ in range(2):  # the reader threads' first reads make a few small arrays of their own
            rt.store.read(1, list(range(16)))
        rt.streamer.acquire(0, list(range(8)))
        mx.clear_cache()  # MLX may hand out a freed buffer up to 2 pages larger than asked: fresh ones here
        before, counted = mx.get_active_memory(), rt.cache.stats()["expert_cache_bytes"]
        rt.streamer.acquire(2, list(range(8)))
        rt.streamer.release(2, list(range(8)))
        held = mx.get_active_memory() - before
        counted = rt.cache.stats()["expert_cache_bytes"] - counted
        assert held == pytest.approx(counted * rt.plan.needs.held_ratio, rel=1e-3), (held, counted)
        assert rt.plan.needs.held_ratio > 1


@pytest.mark.parametrize("tokens,context", [(16, 0), (256, 0), (128, 512)])
def test_the_formula_bounds_what_a_chunk_allocates(bundle_dir, tokens, context):
    from mlx_lm.models.cache import make_prompt_cache

    bundle = bundle_dir("qwen3_moe")
    with moestream.load(bundle, memory_budget=moestream.plan_memory(bundle).minimum_bytes) as (model, _):
        rt = moestream.runtime_of(model)
        cache = make_prompt_cache(model)
        for n, seed in ((context, 1), (tokens, 2)):
            if n:
                mx.clear_cache()
                before = mx.get_active_memory()
                mx.reset_peak_memory()
                model(mx.array(ids(n))[None] + seed, cache=cache)
                mx.eval([c.state for c in cache])
        measured = mx.get_peak_memory() - before
    formula = rt.plan.needs.chunk_bytes(tokens, context + tokens, rt.plan.cache_bytes)
    assert 0.5 * formula <= measured <= formula, (measured, formula)


def test_the_plan_gives_the_chunk_what_the_cache_leaves(bundle_dir):
    bundle = bundle_dir("qwen3_moe")
    least = moestream.plan_memory(bundle, memory_budget=moestream.plan_memory(bundle).minimum_bytes)
    assert least.prefill_tokens == MIN_PREFILL_TOKENS and least.activation_bytes == 0
    assert least.cache_bytes == least.min_layer_bytes
    chunks = []
    for share in (0.1, 0.25, 0.5, 1.0):
        planned = moestream.plan_memory(bundle, expert_cache_share=share)
        again = moestream.plan_memory(bundle, memory_budget=planned.budget_bytes)
        assert again == planned, "a share's budget splits back into that share"
        assert planned.budget_bytes >= (planned.resident_bytes + planned.kv_reserve_bytes + planned.buffer_bytes
                                        + planned.activation_bytes + planned.cache_bytes + planned.held_extra_bytes)
        assert planned.activation_bytes <= planned.cache_bytes + planned.held_extra_bytes + planned.min_layer_bytes * 9
        chunks.append(planned.prefill_tokens)
    assert chunks == sorted(chunks) and chunks[-1] <= DEFAULT_PREFILL_TOKENS
    unbounded = moestream.plan_memory(bundle)
    assert unbounded.prefill_tokens == DEFAULT_PREFILL_TOKENS
    # a short prompt leaves most of the KV reserve unused: its chunk may be larger
    assert least.prefill_tokens_for(12) == 12
    assert least.prefill_tokens_for(300) >= least.prefill_tokens_for(4096) == least.prefill_tokens


def test_a_prompt_longer_than_the_kv_reserve(bundle_dir):
    """As mlx_lm.generate with --max-kv-size: a rotating cache, inside the budget. A model whose
    cache mlx-lm makes itself (gpt-oss: sliding window layers) cannot rotate: refused, naming both."""
    bundle = bundle_dir("qwen3_moe")
    budget = moestream.plan_memory(bundle, max_kv_size=64).minimum_bytes
    before = held_before()
    with moestream.load(bundle, memory_budget=budget, max_kv_size=64) as (model, tokenizer):
        _, report = generate_text(model, tokenizer, ids(100), max_tokens=4, out=None)
    assert report.kv_rotated and report.kv_tokens == 64 and report.generated_tokens == 4
    assert report.peak_memory_bytes - before <= budget, (report.peak_memory_bytes, before, budget)

    budget = moestream.plan_memory(bundle_dir("gpt_oss"), max_kv_size=64).minimum_bytes
    with moestream.load(bundle_dir("gpt_oss"), memory_budget=budget, max_kv_size=64) as (model, tokenizer):
        with pytest.raises(BudgetError, match=r"100 tokens.*holds 64"):
            generate_text(model, tokenizer, ids(100), max_tokens=4, out=None)
        _, report = generate_text(model, tokenizer, ids(60), max_tokens=10, out=None)
    assert report.max_tokens == 4 and report.generated_tokens <= 4


def test_a_conversation_stays_inside_the_kv_reserve(bundle_dir):
    """chat's cache is held to the budget's KV reserve as generate's is: rotating at max_kv_size
    (as mlx_lm.chat --max-kv-size), or, for a model whose cache cannot rotate, the reply capped to
    what is left and a turn past the reserve refused, naming the conversation, with the session kept."""
    from mlx_lm.sample_utils import make_sampler

    from moestream.runtime.frontends.chat import ChatSession

    sampler = make_sampler(0.0)
    bundle = bundle_dir("qwen3_moe")
    budget = moestream.plan_memory(bundle, max_kv_size=64).minimum_bytes
    with moestream.load(bundle, memory_budget=budget, max_kv_size=64) as (model, tokenizer):
        session = ChatSession(model, tokenizer)
        for turn in range(4):
            list(session.reply("tell me more about the weather in " + "Paris " * 12 + str(turn), sampler, 8))
        assert len(session.cached) > 64  # the conversation is longer than the reserve...
        assert all(c.keys.shape[2] <= 64 for c in session.cache)  # ...and the cache holds at most 64 tokens

    budget = moestream.plan_memory(bundle_dir("gpt_oss"), max_kv_size=160).minimum_bytes
    with moestream.load(bundle_dir("gpt_oss"), memory_budget=budget, max_kv_size=160) as (model, tokenizer):
        session = ChatSession(model, tokenizer)
        session.messages.append({"role": "user", "content": "hello " * 20})
        context = len(session.prompt_tokens())  # the template's own tokens and the message's
        session.messages.pop()
        replies = list(session.reply("hello " * 20, sampler, 400))
        assert 0 < len(replies) <= 160 - context  # capped to what the reserve has left
        with pytest.raises(BudgetError, match=r"the conversation has \d+ tokens.*holds 160.*/reset"):
            list(session.reply("and " * 160, sampler, 8))
        assert session.messages[-1]["role"] == "assistant"  # the refused turn is dropped, the session kept
