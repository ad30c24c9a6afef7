"""`moestream chat`'s REPL, driven by a scripted input on a tiny random qwen3_moe bundle."""

from __future__ import annotations

import io
import re

import pytest

STATS_LINE = re.compile(r"^\[\d+ tok, [\d.]+ tok/s \| read [\d.]+ [KMG]?B \| expert cache hit rate ([\d.]+%|n/a)\]$",
                        re.MULTILINE)


@pytest.fixture(scope="module")
def loaded(bundle_dir):
    import moestream

    return moestream.load(bundle_dir("qwen3_moe"), dtype="float32")


def scripted(*lines):
    it = iter(lines)

    def input_fn(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return input_fn


def test_chat_loop_keeps_history_reuses_the_cache_and_resets(loaded, monkeypatch):
    from moestream.runtime.frontends import chat

    model, tokenizer = loaded
    rendered, fed = [], []
    real_template, real_generate = tokenizer.apply_chat_template, chat.stream_generate

    def spy_template(messages, **kwargs):
        rendered.append([dict(m) for m in messages])
        return real_template(messages, **kwargs)

    def spy_generate(model, tokenizer, prompt, **kwargs):
        fed.append((len(prompt), kwargs["prompt_cache"][0].offset))
        yield from real_generate(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy_template)
    monkeypatch.setattr(chat, "stream_generate", spy_generate)
    out = io.StringIO()
    chat.chat_loop(model, tokenizer, max_tokens=6, temp=0.0, top_p=1.0, seed=0,
                   input_fn=scripted("Hello there", "What is the weather in Paris?", "/stats", "/reset", "Hi again"),
                   out=out)
    text = out.getvalue()

    # three replies, each followed by one stats line; /stats printed the runtime's figures
    assert len(STATS_LINE.findall(text)) == 3, text
    assert "bytes_read:" in text and "cache_capacity_bytes:" in text
    assert "[new conversation]" in text

    # the second turn's prompt carries the first turn (question and the reply), /reset drops it
    assert [m["role"] for m in rendered[1]] == ["user", "assistant", "user"]
    assert rendered[1][0]["content"] == "Hello there"
    assert rendered[1][1]["content"]  # the streamed reply
    assert rendered[1][1]["content"] in text
    assert [m["content"] for m in rendered[2]] == ["Hi again"]
    second_prompt = tokenizer.decode(real_template(rendered[1], add_generation_prompt=True))
    assert "Hello there" in second_prompt and "What is the weather in Paris?" in second_prompt

    # the prompt cache is reused across turns: the second turn prefills only what is new
    full_second = len(real_template(rendered[1], add_generation_prompt=True))
    (n1, off1), (n2, off2), (n3, off3) = fed
    assert off1 == 0 and off3 == 0  # fresh cache at the start and after /reset
    assert off2 > 0 and n2 < full_second and off2 + n2 == full_second


def test_eof_and_quit_end_the_loop(loaded):
    from moestream.runtime.frontends.chat import chat_loop

    model, tokenizer = loaded
    for script in (scripted(), scripted("/quit", "never read")):
        out = io.StringIO()
        chat_loop(model, tokenizer, max_tokens=4, temp=0.0, top_p=1.0, seed=None, input_fn=script, out=out)
        assert "/reset" in out.getvalue() and not STATS_LINE.search(out.getvalue())


def test_cached_turn_matches_a_fresh_run_of_the_whole_conversation(loaded):
    """The reused (and trimmed) cache gives the same greedy reply as prefilling the rendered
    conversation from scratch."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from moestream.runtime.frontends.chat import ChatSession

    model, tokenizer = loaded
    greedy = make_sampler(0.0)
    session = ChatSession(model, tokenizer, system_prompt="You are a helpful assistant.")
    list(session.reply("Hello there", greedy, 5))
    held = list(session.cached)
    # a history that differs from what the cache holds (as when a template drops reasoning)
    session.messages[-1]["content"] = "It is sunny."
    session.messages.append({"role": "user", "content": "And tomorrow?"})
    prompt = session.prompt_tokens()
    session.messages.pop()
    assert prompt[: len(held)] != held  # so the cache has to be trimmed
    cached = [r.token for r in session.reply("And tomorrow?", greedy, 5)]
    fresh = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=5, sampler=greedy)]
    assert cached == fresh
    assert session.cached == prompt + cached[: len(session.cached) - len(prompt)]
