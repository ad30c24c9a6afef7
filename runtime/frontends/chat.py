"""`moestream chat`: a multi-turn REPL on a streaming model, with mlx-lm's `stream_generate`.

Like `mlx_lm.chat`, one prompt (KV) cache lives across turns, so each turn only prefills what is
new. Unlike it, the whole conversation is kept and rendered with the chat template every turn
(with the system prompt and the tools, `tools=` as mlx-lm's server passes them); the cache is
trimmed back to where the rendering first differs from what it holds (templates that drop earlier
reasoning, say) or rebuilt when it cannot be trimmed, so the model always sees exactly the
template's rendering of the history.

Stopping an answer (Ctrl-C while it streams) keeps the cache consistent with the conversation:

- At a token boundary (the first Ctrl-C: a flag the generation loop reads after each token and
  after each prefill chunk), the answer so far stays in the conversation as the assistant's
  message, and the cache holds exactly the tokens that produced it: the next turn renders the
  cut answer with the template's end-of-turn and prefills only from there.
- Stopped before the first token, or interrupted anywhere (a second Ctrl-C raises
  KeyboardInterrupt inside the model's step, where a layer's cache may already count a token it
  has not stored), the turn is rolled back: the user's message is dropped and every layer's
  cache is trimmed to what it held before the turn (rebuilt empty if it cannot be trimmed).

At the prompt, line editing and history come from readline when stdin is a terminal
(`enable_line_editing`); Ctrl-C or Ctrl-D there ends the chat.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import closing

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from ...common.errors import MoestreamError
from ...common.units import fmt_bytes
from ..model.load import stats
from .generate import conversation_cache, conversation_limits, generation_limits
from .prompt import apply_template, check_template_use, describe_tool_calls, find_tool_calls

HELP = ("commands: q or /quit (or Ctrl-D) to exit, r or /reset for a new conversation, h or /help for this, "
        "/stats for I/O and cache figures; Ctrl-C stops an answer")
QUIT, RESET, HELP_COMMANDS = ("q", "/quit", "/exit"), ("r", "/reset"), ("h", "/help")

# how a reply ended (ChatSession.outcome)
COMPLETE = "complete"  # the model ended its turn, or max_tokens
STOPPED = "stopped"  # stopped at a token boundary: the answer so far is kept
DROPPED = "dropped"  # stopped before any token, or interrupted inside a step: the turn is rolled back


class StopAnswer(Exception):
    """Raised from the prefill's progress callback when the answer is to stop before its first token."""


class ChatSession:
    """The conversation, and a prompt cache holding the tokens in `cached`."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, tools: list | None = None,
                 chat_template_args: dict | None = None):
        check_template_use(tokenizer, True, None, tools)
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.tools, self.chat_template_args = tools, chat_template_args
        self.outcome: str | None = None
        self.reply_text = ""
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = conversation_cache(self.model)
        self.cached: list[int] = []

    def prompt_tokens(self) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            return apply_template(self.tokenizer, self.messages, self.tools, self.chat_template_args)
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
            self._truncate(common)
        return prompt[len(self.cached):]

    def _offsets(self) -> list[int] | None:
        offsets = [getattr(c, "offset", None) for c in self.cache]
        return offsets if all(isinstance(o, int) for o in offsets) else None

    def _truncate(self, length: int) -> None:
        """Every layer's cache cut to the first `length` tokens of `cached` (each layer by its own
        count), or a new empty cache where that cannot be done."""
        offsets = self._offsets()
        if offsets is not None and can_trim_prompt_cache(self.cache) and min(offsets) >= length:
            for c, offset in zip(self.cache, offsets, strict=True):
                c.trim(offset - length)
            self.cached = self.cached[:length]
        else:
            self.cache, self.cached = conversation_cache(self.model), []

    def reply(self, text: str, sampler, max_tokens: int, should_stop=None, prefill_step_size: int | None = None):
        """Yields mlx-lm's GenerationResponse for each token of the reply to `text`. `should_stop()`
        is asked after every token and every prefill chunk; how the reply ended is `outcome`, its
        text `reply_text` (see the module docstring for what each ending keeps).
        `prefill_step_size`: tokens per prefill chunk (None: the memory plan's chunk for this
        context where the plan sizes one, else mlx-lm's default)."""
        should_stop = should_stop or (lambda: False)
        self.messages.append({"role": "user", "content": text})
        try:
            new = self._new_tokens(self.prompt_tokens())
            start = len(self.cached)
            limits = generation_limits(self.model, len(new), max_tokens, self.cache, prefill_step_size)
            limits["max_tokens"] = conversation_limits(self.model, start + len(new), limits["max_tokens"])
        except BaseException:
            self.messages.pop()
            raise
        tokens, parts = [], []
        self.outcome, self.reply_text = DROPPED, ""

        def progress(done, total):
            if done < total and should_stop():
                raise StopAnswer()

        generation = stream_generate(self.model, self.tokenizer, new, sampler=sampler, prompt_cache=self.cache,
                                     prompt_progress_callback=progress, **limits)
        try:
            for response in generation:
                tokens.append(response.token)
                parts.append(response.text)
                # from here on the cache holds every yielded token (a consumer that leaves at the
                # yield leaves at a token boundary too)
                self.outcome = COMPLETE if response.finish_reason is not None else STOPPED
                yield response
                if self.outcome == STOPPED and should_stop():
                    break
        except GeneratorExit:  # the consumer left at the yield: a token boundary, outcome as set
            raise
        except BaseException:  # StopAnswer, KeyboardInterrupt inside a step, a failure: roll the turn back
            self.outcome = DROPPED
            raise
        finally:
            generation.close()
            self._settle(start, new, tokens, parts)

    def _settle(self, start: int, new: list[int], tokens: list[int], parts: list[str]) -> None:
        if self.outcome == DROPPED:
            self.messages.pop()
            self._truncate(start)
            return
        # stream_generate has run every yielded token (the end-of-turn one too) through the model,
        # but the last one when max_tokens ended the reply.
        fed = self.cached + new + tokens
        offsets = [o for o in (getattr(c, "offset", None) for c in self.cache) if isinstance(o, int)]
        length = min([len(fed), *offsets])
        self.cached = fed
        if any(o != length for o in offsets):  # a layer ahead of the others (not seen at a token boundary)
            self._truncate(length)
        else:
            self.cached = fed[:length]
        if self.outcome == COMPLETE:
            self.reply_text = "".join(parts)
        else:  # the detokenizer may still hold the end of the last word
            self.reply_text = self.tokenizer.decode(tokens)
        self.messages.append({"role": "assistant", "content": self.reply_text})


def _stats_line(n: int, tps: float, before: dict, after: dict) -> str:
    hits = after["cache_hits"] - before["cache_hits"]
    lookups = hits + after["cache_misses"] - before["cache_misses"]
    rate = f"{hits / lookups:.1%}" if lookups else "n/a"
    return (f"[{n} tok, {tps:.1f} tok/s | read {fmt_bytes(after['bytes_read'] - before['bytes_read'])} | "
            f"expert cache hit rate {rate}]")


class AnswerInterrupts:
    """While an answer streams: the first SIGINT (Ctrl-C) asks it to stop at the next token, a
    second raises KeyboardInterrupt at once. Only in the main thread (where Python delivers
    signals); elsewhere it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def enable_line_editing() -> bool:
    """Line editing and an in-session history for `input()` (readline), as Python's own REPL has;
    False where readline is not available."""
    try:
        import readline
    except ImportError:
        return False
    readline.set_history_length(1000)
    return True


def chat_loop(model, tokenizer, max_tokens=256, temp=0.0, top_p=1.0, seed=None, input_fn=input, out=None,
              system_prompt=None, tools=None, chat_template_args=None, prefill_step_size=None) -> None:
    """The REPL: `input_fn` reads a line, `out` (default: sys.stdout as it is when called) shows the answers."""
    out = out if out is not None else sys.stdout
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp, top_p)
    session = ChatSession(model, tokenizer, system_prompt, tools, chat_template_args)
    out.write(f"moestream chat. {HELP}\n")
    while True:
        try:
            text = input_fn(">> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
            out.write("\n")
            break
        if text in QUIT:
            break
        if text in RESET:
            session.reset()
            out.write("[new conversation]\n")
        elif text in HELP_COMMANDS:
            out.write(HELP + "\n")
        elif text == "/stats":
            for key, value in stats(model).items():
                shown = fmt_bytes(value) if key.endswith("bytes") or key == "bytes_read" else value
                out.write(f"  {key}: {shown}\n")
        elif text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
        elif text:
            _answer(session, text, sampler, max_tokens, prefill_step_size, model, out)
        out.flush()


def _answer(session: ChatSession, text: str, sampler, max_tokens: int, prefill_step_size, model, out) -> None:
    before, last, shown = stats(model), None, []
    try:
        with AnswerInterrupts() as interrupts, closing(session.reply(text, sampler, max_tokens, interrupts,
                                                                     prefill_step_size)) as replies:
            for last in replies:
                out.write(last.text)
                out.flush()
                shown.append(last.text)
    except (KeyboardInterrupt, StopAnswer):
        pass  # the session has settled: STOPPED or DROPPED
    except MoestreamError as e:  # a template that cannot render this conversation: the turn is dropped
        out.write(f"[error: {e}]\n")
        return
    if session.outcome == DROPPED:
        out.write("\n[interrupted: this question and its answer were dropped from the conversation]\n")
        return
    printed = "".join(shown)
    if session.reply_text.startswith(printed):
        out.write(session.reply_text[len(printed):])
    if session.outcome == STOPPED:
        out.write("\n[stopped: the answer so far stays in the conversation]")
    if session.tools:
        for line in describe_tool_calls(find_tool_calls(session.tokenizer, session.reply_text, session.tools)):
            out.write(f"\n[{line}]")
    out.write("\n" + _stats_line(last.generation_tokens, last.generation_tps, before, stats(model)) + "\n")
