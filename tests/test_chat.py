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


# --- stopping an answer: the cache stays what the conversation renders -----------------------------


def _offsets(session):
    return [c.offset for c in session.cache]


def _matches_a_fresh_run(session, text, n=5):
    """The session's next greedy reply to `text` equals prefilling its whole rendered conversation
    from scratch: whatever the cache holds is exactly what the template renders."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    greedy = make_sampler(0.0)
    session.messages.append({"role": "user", "content": text})
    prompt = session.prompt_tokens()
    session.messages.pop()
    fresh = [r.token for r in stream_generate(session.model, session.tokenizer, prompt, max_tokens=n, sampler=greedy)]
    cached = [r.token for r in session.reply(text, greedy, n)]
    assert cached == fresh
    assert _offsets(session) == [len(session.cached)] * len(session.cache)


def test_stopping_at_a_token_keeps_the_answer_so_far(loaded):
    from mlx_lm.sample_utils import make_sampler

    from moestream.runtime.frontends.chat import STOPPED, ChatSession

    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    list(session.reply("Hello there", make_sampler(0.0), 4))
    tokens = []
    for r in session.reply("Tell me more", make_sampler(0.0), 50, should_stop=lambda: len(tokens) >= 3):
        tokens.append(r.token)
    assert len(tokens) == 3 and session.outcome == STOPPED
    # the cut answer is the assistant's message; the cache holds the turn's prompt and the 3 tokens
    assert session.messages[-1] == {"role": "assistant", "content": tokenizer.decode(tokens)}
    answer = session.messages.pop()
    prompt = session.prompt_tokens()  # the conversation up to the question, as the template renders it
    session.messages.append(answer)
    assert session.cached == prompt + tokens
    assert _offsets(session) == [len(session.cached)] * len(session.cache)
    _matches_a_fresh_run(session, "And then?")


def test_stopping_before_the_first_token_drops_the_turn(loaded):
    from mlx_lm.sample_utils import make_sampler

    from moestream.runtime.frontends.chat import DROPPED, ChatSession, StopAnswer

    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system_prompt="Be brief.")
    list(session.reply("Hello there", make_sampler(0.0), 4))
    messages, cached = [dict(m) for m in session.messages], list(session.cached)
    chunks = []

    def stop():  # asked after each prefill chunk: stop after the second one
        chunks.append(1)
        return len(chunks) >= 2

    with pytest.raises(StopAnswer):
        list(session.reply("a long question " * 20, make_sampler(0.0), 8, should_stop=stop, prefill_step_size=8))
    assert session.outcome == DROPPED and len(chunks) == 2
    # the question is gone; the cache holds what it held when the turn started (what the previous
    # turn left, less the tail the new rendering did not share), the chunks prefilled trimmed away
    assert session.messages == messages and session.cached == cached[: len(session.cached)]
    assert _offsets(session) == [len(session.cached)] * len(session.cache)
    _matches_a_fresh_run(session, "Something else")


def test_an_interrupt_inside_a_step_rolls_the_turn_back(loaded):
    """A second Ctrl-C raises KeyboardInterrupt wherever Python is: here in the middle of a decode
    step, after the first layers have stored the new token and before the last has. Every layer's
    cache goes back to the turn's start."""
    from mlx_lm.sample_utils import make_sampler

    from moestream.runtime.frontends.chat import DROPPED, ChatSession

    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    list(session.reply("Hello there", make_sampler(0.0), 4))
    messages, cached = [dict(m) for m in session.messages], list(session.cached)
    layers = model.model.layers
    last = layers[-1]

    class Interrupted:
        calls = 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 4:  # prefill, two decode steps, then mid-way through the third
                raise KeyboardInterrupt
            return last(*args, **kwargs)

    layers[-1] = Interrupted()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in session.reply("Tell me more", make_sampler(0.0), 50):
                pass
        seen = _offsets(session)
    finally:
        layers[-1] = last
    assert session.outcome == DROPPED
    assert session.messages == messages and session.cached == cached[: len(session.cached)]
    assert seen == [len(session.cached)] * len(session.cache)
    _matches_a_fresh_run(session, "Something else")


class _InterruptOnce(io.StringIO):
    """Terminal output where the user's Ctrl-C lands in a write of the answer (KeyboardInterrupt)."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.writes = after, 0

    def write(self, text):
        self.writes += 1
        if self.writes == self.after:
            raise KeyboardInterrupt
        return super().write(text)


def test_chat_loop_stops_an_answer_and_goes_on(loaded):
    from moestream.runtime.frontends import chat

    model, tokenizer = loaded
    out = _InterruptOnce(after=5)  # the banner, the first 3 tokens, then Ctrl-C
    chat.chat_loop(model, tokenizer, max_tokens=40, input_fn=scripted("Tell me a story", "h", "Hi"), out=out)
    text = out.getvalue()
    assert "[stopped: the answer so far stays in the conversation]" in text
    assert len(STATS_LINE.findall(text)) == 2  # the stopped answer, then the next one
    assert text.count("commands: q or /quit") == 2  # the banner, then h


def test_ctrl_c_and_q_at_the_prompt_end_the_chat(loaded):
    from moestream.runtime.frontends.chat import chat_loop

    model, tokenizer = loaded

    def ctrl_c(prompt):
        raise KeyboardInterrupt

    for input_fn in (ctrl_c, scripted("q", "never read")):
        out = io.StringIO()
        chat_loop(model, tokenizer, max_tokens=4, input_fn=input_fn, out=out)
        assert not STATS_LINE.search(out.getvalue())


def test_tools_and_template_arguments_reach_the_template(loaded):
    from moestream.runtime.frontends.chat import ChatSession

    model, tokenizer = loaded
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    session = ChatSession(model, tokenizer, system_prompt="Be brief.", tools=tools)
    session.messages.append({"role": "user", "content": "Weather?"})
    assert session.prompt_tokens() == tokenizer.apply_chat_template(session.messages, tools=tools,
                                                                    add_generation_prompt=True)
