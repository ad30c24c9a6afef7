"""Text generation on a streaming model with mlx-lm's own `stream_generate`, plus the figures
a user of this tool wants on every run: time to first token, tokens/s, per-token latency
percentiles, bytes read, cache hit rate, peak memory."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from ...common.units import fmt_bytes
from ..model.load import stats


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
    peak_memory_bytes: int
    stats: dict

    def line(self) -> str:
        return (
            f"[moestream] prompt {self.prompt_tokens} tok, generated {self.generated_tokens} tok | "
            f"TTFT {self.ttft_s:.2f}s | {self.tokens_per_s:.2f} tok/s (p50 {self.p50_token_ms:.0f} ms, "
            f"p99 {self.p99_token_ms:.0f} ms) | read {fmt_bytes(self.bytes_read)} "
            f"({fmt_bytes(self.bytes_read_per_token)}/tok) | hit rate {self.hit_rate:.1%} | "
            f"peak mem {fmt_bytes(self.peak_memory_bytes)} | io {self.stats['io_mode']}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def format_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int] | str:
    """Like mlx_lm.generate: wrap the prompt in the chat template when the model has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def generate_text(model, tokenizer, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=None, out=sys.stdout,
                  prompt_cache=None) -> tuple[str, GenerationReport]:
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    mx.reset_peak_memory()  # the peak of this run, not of the process so far
    before = stats(model)
    start = time.perf_counter()
    times, text, last = [], [], None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler,
                                    prompt_cache=prompt_cache):
        times.append(time.perf_counter())
        if out is not None:
            out.write(response.text)
            out.flush()
        text.append(response.text)
        last = response
    after = stats(model)
    n = len(times)
    gaps = np.diff(np.array(times)) * 1000 if n > 1 else np.array([0.0])
    decode_s = times[-1] - times[0] if n > 1 else 0.0
    read = after["bytes_read"] - before["bytes_read"]
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    report = GenerationReport(
        prompt_tokens=last.prompt_tokens if last else 0,
        generated_tokens=n,
        ttft_s=(times[0] - start) if n else 0.0,
        tokens_per_s=(n - 1) / decode_s if decode_s > 0 else 0.0,
        p50_token_ms=float(np.percentile(gaps, 50)),
        p99_token_ms=float(np.percentile(gaps, 99)),
        bytes_read=read,
        bytes_read_per_token=read / n if n else 0.0,
        hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        peak_memory_bytes=mx.get_peak_memory(),
        stats=after,
    )
    return "".join(text), report
