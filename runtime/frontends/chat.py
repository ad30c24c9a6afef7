"""`moestream chat`: a multi-turn REPL on a streaming model, with mlx-lm's `stream_generate`.

Like `mlx_lm.chat`, one prompt (KV) cache lives across turns, so each turn only prefills what is
new. Unlike it, the whole conversation is kept and rendered with the chat template every turn;
the cache is trimmed back to where the rendering first differs from what it holds (templates
that drop earlier reasoning, say) or rebuilt when it cannot be trimmed, so the model always sees
exactly the template's rendering of the history.
"""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from ...common.units import fmt_bytes
from ..model.load import stats

HELP = "commands: /reset (new conversation), /stats (I/O and cache figures), /quit (or Ctrl-D)"


class ChatSession:
    """The conversation, and a prompt cache holding the tokens in `cached`."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = make_prompt_cache(self.model)
        self.cached: list[int] = []

    def prompt_tokens(self) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant: "
        return self.tokenizer.encode(text)

    def _new_tokens(self, prompt: list[int]) -> list[int]:
        """The part of `prompt` the cache does not hold yet (at least one token)."""
        common = 0
        for a, b in zip(self.cached, prompt[:-1], strict=False):
            if a != b:
                break
            common += 1
        if common < len(self.cached):
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(self.cached) - common)
            else:
                self.cache, common = make_prompt_cache(self.model), 0
            self.cached = self.cached[:common]
        return prompt[common:]

    def reply(self, text: str, sampler, max_tokens: int):
        """Yields mlx-lm's GenerationResponse for each token of the reply to `text`."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.prompt_tokens()
        new = self._new_tokens(prompt)
        tokens, parts = [], []
        for response in stream_generate(self.model, self.tokenizer, new, max_tokens=max_tokens, sampler=sampler,
                                        prompt_cache=self.cache):
            tokens.append(response.token)
            parts.append(response.text)
            yield response
        # stream_generate has run every yielded token (the end-of-turn one too) through the model.
        fed = self.cached + new + tokens
        offset = next((c.offset for c in self.cache if isinstance(getattr(c, "offset", None), int)), len(fed))
        self.cached = fed[:offset]
        self.messages.append({"role": "assistant", "content": "".join(parts)})


def _stats_line(n: int, tps: float, before: dict, after: dict) -> str:
    hits = after["cache_hits"] - before["cache_hits"]
    lookups = hits + after["cache_misses"] - before["cache_misses"]
    rate = f"{hits / lookups:.1%}" if lookups else "n/a"
    return (f"[{n} tok, {tps:.1f} tok/s | read {fmt_bytes(after['bytes_read'] - before['bytes_read'])} | "
            f"expert cache hit rate {rate}]")


def chat_loop(model, tokenizer, max_tokens=256, temp=0.0, top_p=1.0, seed=None, input_fn=input, out=sys.stdout,
              system_prompt=None) -> None:
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp, top_p)
    session = ChatSession(model, tokenizer, system_prompt)
    out.write(f"moestream chat. {HELP}\n")
    while True:
        try:
            text = input_fn(">> ").strip()
        except EOFError:
            out.write("\n")
            break
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            out.write("[new conversation]\n")
        elif text == "/stats":
            for key, value in stats(model).items():
                shown = fmt_bytes(value) if key.endswith("bytes") or key == "bytes_read" else value
                out.write(f"  {key}: {shown}\n")
        elif text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
        elif text:
            before, last = stats(model), None
            for last in session.reply(text, sampler, max_tokens):
                out.write(last.text)
                out.flush()
            out.write("\n" + _stats_line(last.generation_tokens, last.generation_tps, before, stats(model)) + "\n")
        out.flush()
