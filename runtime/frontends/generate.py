"""Text generation on a streaming model with mlx-lm's own `stream_generate`, plus the figures
a user of this tool wants on every run: time to first token, tokens/s, per-token latency
percentiles, bytes read, cache hit rate, peak memory.

Inside the memory budget: the prompt is prefilled in chunks the memory plan sizes
(`MemoryPlan.prefill_tokens_for`), and the KV cache is bounded to the tokens the budget reserves as
mlx_lm.generate bounds it with --max-kv-size: a rotating cache that keeps the first 4 tokens and the
latest ones. A model whose cache mlx-lm makes itself (`make_cache`: sliding-window and hybrid
families) ignores max_kv_size, so there a prompt longer than the reserve is refused and max_tokens
is capped at what the reserve leaves."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from ...common.errors import OptionsError
from ...common.units import fmt_bytes
from ..model.budget import BudgetError
from ..model.load import runtime_of, stats

# mlx-lm's generate_step default, for a model that moestream did not load (no memory plan)
MLX_LM_PREFILL_STEP = 2048


@dataclass
class GenerationReport:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    tokens_per_s: float
    p50_token_ms: float
    p99_token_ms: float
    bytes_read: int
    bytes_read_per_token: float
    hit_rate: float
    peak_memory_bytes: int  # MLX's peak over the run (process-wide, any backend) + the reader's host buffers
    stats: dict
    prefill_step_size: int = 0  # tokens per prefill chunk
    kv_tokens: int | None = None  # the KV cache's bound in tokens (None: unbounded)
    kv_rotated: bool = False  # prompt + generated tokens outgrew the bound: the cache rotated
    max_tokens: int | None = None  # after capping to the KV reserve (make_cache models)
    budget_bytes: int | None = None
    host_buffer_bytes: int = 0  # the part of peak_memory_bytes outside MLX

    def line(self) -> str:
        budget = f" of {fmt_bytes(self.budget_bytes)} budget" if self.budget_bytes else ""
        rotated = f" | KV cache rotated at {self.kv_tokens} tok" if self.kv_rotated else ""
        return (
            f"[moestream] prompt {self.prompt_tokens} tok, generated {self.generated_tokens} tok | "
            f"TTFT {self.ttft_s:.2f}s | {self.tokens_per_s:.2f} tok/s (p50 {self.p50_token_ms:.0f} ms, "
            f"p99 {self.p99_token_ms:.0f} ms) | read {fmt_bytes(self.bytes_read)} "
            f"({fmt_bytes(self.bytes_read_per_token)}/tok) | hit rate {self.hit_rate:.1%} | "
            f"peak mem {fmt_bytes(self.peak_memory_bytes)}{budget} (prefill chunks of {self.prefill_step_size} tok)"
            f"{rotated} | io {self.stats['io_mode']}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def format_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int] | str:
    """Like mlx_lm.generate: wrap the prompt in the chat template when the model has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def prompt_ids(tokenizer, prompt) -> mx.array:
    """The prompt as token ids, exactly as mlx-lm's stream_generate turns it into them."""
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    return mx.array(prompt)


def _cached_tokens(prompt_cache) -> int:
    return max((int(getattr(c, "offset", 0) or 0) for c in prompt_cache or ()), default=0)


def generation_limits(model, n_prompt: int, max_tokens: int, prompt_cache=None,
                      prefill_step_size: int | None = None) -> dict:
    """What generate_text passes to stream_generate to stay inside the memory budget:
    prefill_step_size (given, or the plan's chunk for this prompt), max_kv_size (the reserve, where
    mlx-lm makes the cache and can bound it) and max_tokens (capped where it cannot). A prompt
    longer than the reserve for a model whose cache cannot be bounded: BudgetError naming both."""
    rt = runtime_of(model, required=False)
    cached = _cached_tokens(prompt_cache)
    if prefill_step_size is not None and (not isinstance(prefill_step_size, int) or prefill_step_size < 1):
        raise OptionsError(f"prefill_step_size must be a positive number of tokens, got {prefill_step_size!r}")
    if rt is None:
        return {"prefill_step_size": prefill_step_size or MLX_LM_PREFILL_STEP, "max_tokens": max_tokens}
    plan = rt.plan
    step = prefill_step_size or plan.prefill_tokens_for(cached + n_prompt)
    limits = {"prefill_step_size": step, "max_tokens": max_tokens}
    if prompt_cache is not None or plan.budget_bytes is None:
        return limits  # the caller's cache, bounded (or not) as the caller made it; no budget to hold
    if not hasattr(model, "make_cache"):
        limits["max_kv_size"] = plan.kv_tokens  # mlx-lm's RotatingKVCache, as mlx_lm.generate --max-kv-size
        return limits
    limits["max_tokens"] = _kv_room(plan, n_prompt, max_tokens, "the prompt", "or a shorter prompt")
    return limits


def _kv_room(plan, context: int, max_tokens: int | None, what: str, remedy: str) -> int | None:
    """max_tokens capped to what a KV cache that cannot rotate has left of the plan's reserve after
    `context` tokens; BudgetError when nothing is left."""
    left = plan.kv_tokens - context
    if left < 1:
        raise BudgetError(
            f"{what} has {context} tokens, and the KV cache the memory budget reserves holds {plan.kv_tokens} "
            f"(max_kv_size): this model's cache cannot rotate, so it needs a larger max_kv_size (and budget) {remedy}")
    if max_tokens is not None and (max_tokens < 0 or max_tokens > left):
        return left
    return max_tokens


def conversation_cache(model) -> list:
    """The prompt cache of a conversation held to the memory budget's KV reserve: rotating at the
    plan's kv_tokens where mlx-lm can bound the model's cache (as mlx_lm.chat --max-kv-size), else
    mlx-lm's own, whose growth conversation_limits stops at the reserve."""
    from mlx_lm.models.cache import make_prompt_cache

    rt = runtime_of(model, required=False)
    if rt is None or rt.plan.budget_bytes is None or hasattr(model, "make_cache"):
        return make_prompt_cache(model)
    return make_prompt_cache(model, max_kv_size=rt.plan.kv_tokens)


def conversation_limits(model, context_tokens: int, max_tokens: int | None) -> int | None:
    """max_tokens for the next reply of a conversation whose cache conversation_cache made, with
    `context_tokens` in it once the new turn is added: capped, or BudgetError, where the cache
    cannot rotate and the reserve runs out."""
    rt = runtime_of(model, required=False)
    if rt is None or rt.plan.budget_bytes is None or not hasattr(model, "make_cache"):
        return max_tokens
    return _kv_room(rt.plan, context_tokens, max_tokens, "the conversation", "or a new conversation (/reset)")


def generate_text(model, tokenizer, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=None, out=sys.stdout,
                  prompt_cache=None, prefill_step_size: int | None = None) -> tuple[str, GenerationReport]:
    """Generate with mlx-lm's stream_generate inside the model's memory budget; (text, report).

    prefill_step_size: tokens per prefill chunk (None: the memory plan's chunk for this prompt,
    the largest whose activations the budget holds). A larger one than the plan's can exceed the
    budget. Without a prompt_cache the KV cache is bounded to the budget's reserve (see the module
    docstring); a given prompt_cache is used as it is."""
    if seed is not None:
        mx.random.seed(seed)
    ids = prompt_ids(tokenizer, prompt)
    limits = generation_limits(model, int(ids.size), max_tokens, prompt_cache, prefill_step_size)
    rt = runtime_of(model, required=False)
    sampler = make_sampler(temp=temp, top_p=top_p)
    mx.reset_peak_memory()  # the peak of this run, not of the process so far
    before = stats(model)
    start = time.perf_counter()
    times, text, last = [], [], None
    for response in stream_generate(model, tokenizer, ids, sampler=sampler, prompt_cache=prompt_cache, **limits):
        times.append(time.perf_counter())
        if out is not None:
            out.write(response.text)
            out.flush()
        text.append(response.text)
        last = response
    peak, host = mx.get_peak_memory(), host_buffer_bytes(model)
    after = stats(model)
    n = len(times)
    gaps = np.diff(np.array(times)) * 1000 if n > 1 else np.array([0.0])
    decode_s = times[-1] - times[0] if n > 1 else 0.0
    read = after["bytes_read"] - before["bytes_read"]
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    kv_tokens = limits.get("max_kv_size") or (rt.plan.kv_tokens if rt is not None and prompt_cache is None
                                              and rt.plan.budget_bytes is not None else None)
    report = GenerationReport(
        prompt_tokens=last.prompt_tokens if last else int(ids.size),
        generated_tokens=n,
        ttft_s=(times[0] - start) if n else 0.0,
        tokens_per_s=(n - 1) / decode_s if decode_s > 0 else 0.0,
        p50_token_ms=float(np.percentile(gaps, 50)),
        p99_token_ms=float(np.percentile(gaps, 99)),
        bytes_read=read,
        bytes_read_per_token=read / n if n else 0.0,
        hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        peak_memory_bytes=peak + host,
        stats=after,
        prefill_step_size=limits["prefill_step_size"],
        kv_tokens=kv_tokens,
        kv_rotated="max_kv_size" in limits and int(ids.size) + n > limits["max_kv_size"],
        max_tokens=limits["max_tokens"],
        budget_bytes=rt.plan.budget_bytes if rt is not None else None,
        host_buffer_bytes=host,
    )
    return "".join(text), report


def host_buffer_bytes(model) -> int:
    """Memory the runtime holds outside MLX: the reader's idle host read buffers (anonymous mmaps;
    staging slots are MLX arrays, which MLX's peak counts)."""
    rt = runtime_of(model, required=False)
    return int(rt.reader.stats()["buffer_pool_idle_bytes"]) if rt is not None else 0
