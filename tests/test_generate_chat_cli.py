"""`moestream generate` and `moestream chat` as a user runs them: mlx-lm's prompt options
(`--prompt -` from stdin, `--system-prompt`, `--prefill-step-size`), `--tools FILE` through the chat
template, and chat in a real terminal (a pty): line editing and history, Ctrl-C stopping an answer
while the session goes on, Ctrl-C / Ctrl-D at the prompt ending it. The model is the trained fixture
(fixtures/qwen3-moe-tiny-tools), which answers tool requests with tool calls."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moestream.demo import DEMO_REQUEST, DEMO_TOOLS, FIXTURE

TIMEOUT = 120
STATS = re.compile(r"\[\d+ tok, [\d.]+ tok/s \| read [^|]+\| expert cache hit rate [^\]]+\]")
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}


def moestream(*argv, stdin: str | None = None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.cli", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "tools.json"
    path.write_text(json.dumps(DEMO_TOOLS))
    return path


@pytest.fixture(scope="module")
def fixture_tokenizer():
    import moestream

    return moestream.load(FIXTURE).tokenizer


# --- generate ---------------------------------------------------------------------------------


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_generate_reads_stdin_and_puts_system_prompt_and_tools_through_the_template(tools_file, fixture_tokenizer,
                                                                                    tmp_path):
    stats = tmp_path / "stats.json"
    question = DEMO_REQUEST + "\n"
    r = moestream("generate", FIXTURE, "--prompt", "-", "--system-prompt", "You are a weather bot.", "--tools",
                  tools_file, "--max-tokens", 64, "--stats-json", stats, stdin=question)
    assert r.returncode == 0, r.stderr
    # the model called the tool: its markup streamed, then one line per parsed call, then the figures
    assert "<tool_call>" in r.stdout
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("[moestream] prompt ")
    assert lines[-2].startswith("[moestream] tool call: weather_forecast(")
    data = json.loads(stats.read_text())
    (call,) = data["tool_calls"]
    assert call["name"] == "weather_forecast" and call["arguments"]["location"] == "Zagreb"
    # exactly the template's rendering of system prompt + stdin's text + tools went in
    expected = fixture_tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": question}],
        tools=DEMO_TOOLS, add_generation_prompt=True)
    assert data["prompt_tokens"] == len(expected)


def test_generate_option_errors_are_one_line(tools_file, tmp_path, capsys):
    from moestream.cli import main

    r = moestream("generate", FIXTURE, "--prompt", "-", stdin="")  # as a user's shell runs it
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["moestream generate: error: --prompt -: stdin was empty: pipe the prompt "
                                             "in, e.g. echo Hello | moestream generate ..."]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"name": 3}]')
    for argv, needle in (
        (["--prompt", "hi", "--tools", bad], "entry 0 is not a tool schema"),
        (["--prompt", "hi", "--tools", tmp_path / "missing.json"], "cannot read it"),
        (["--prompt", "hi", "--tools", tools_file, "--ignore-chat-template"], "--ignore-chat-template"),
        (["--prompt", "hi", "--chat-template-config", "[1]"], "JSON object"),
    ):
        assert main(["generate", str(FIXTURE), *map(str, argv)]) == 2
        out, err = capsys.readouterr()
        assert out == "", (argv, out)
        (line,) = err.strip().splitlines()
        assert line.startswith("moestream generate: error: ") and needle in line, line


def test_prefill_step_size_reaches_generate_text(monkeypatch):
    """Passed as generate_text(..., prefill_step_size=N) where generate_text takes it, else a warning."""
    from moestream.commands.generate import generation_options

    args = type("Args", (), {"prefill_step_size": 32})()

    def new_style(model, tokenizer, prompt, prefill_step_size=None):
        pass

    def old_style(model, tokenizer, prompt):
        pass

    assert generation_options(new_style, args) == {"prefill_step_size": 32}
    assert generation_options(old_style, args) == {}


def test_chat_template_kwargs_and_stdin_helpers(fixture_tokenizer):
    from moestream.common.errors import OptionsError
    from moestream.runtime.frontends.prompt import build_prompt, check_tools, read_prompt, template_args

    assert read_prompt("a\\nb\\tc") == "a\nb\tc"  # mlx_lm.generate's escapes
    assert read_prompt("-", stdin=io.StringIO("from stdin\\n")) == "from stdin\\n"  # stdin is taken as it is
    assert template_args('{"enable_thinking": false}') == {"enable_thinking": False}
    bare = check_tools([{"name": "f", "parameters": {"type": "object", "properties": {}}}])
    assert bare == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert check_tools({"tools": DEMO_TOOLS}) == DEMO_TOOLS  # a request body's "tools"
    with pytest.raises(OptionsError, match="non-empty JSON list"):
        check_tools([])
    with_tools = build_prompt(fixture_tokenizer, "hi", tools=DEMO_TOOLS)
    plain = build_prompt(fixture_tokenizer, "hi")
    assert "weather_forecast" in fixture_tokenizer.decode(with_tools) and len(with_tools) > len(plain)
    assert build_prompt(fixture_tokenizer, "hi", use_chat_template=False) == "hi"


def test_find_tool_calls_keeps_what_does_not_parse(fixture_tokenizer):
    from moestream.runtime.frontends.prompt import find_tool_calls

    good = '<tool_call>\n{"name": "weather_forecast", "arguments": {"location": "Oslo", "days": 2}}\n</tool_call>'
    broken = '<tool_call>\n{"name": "weather_forecast", "arguments": {"loc\n</tool_call>'
    no_args = '<tool_call>\n{"name": "weather_forecast", "arguments": "Oslo"}\n</tool_call>'
    cut = '<tool_call>\n{"name": "find_fl'
    found = find_tool_calls(fixture_tokenizer, f"Sure. {good}{broken}\n{no_args}{cut}", DEMO_TOOLS)
    assert found.calls == [{"name": "weather_forecast", "arguments": {"location": "Oslo", "days": 2}}]
    assert found.unparsed == [broken, no_args, cut]
    assert found.text == f"Sure. {broken}\n{no_args}{cut}"


# --- chat in a terminal -------------------------------------------------------------------------


class Terminal:
    """`moestream chat` on a pseudo-terminal, in its own process group (as a shell runs a job)."""

    def __init__(self, *argv):
        master, slave = os.openpty()
        self.master = master
        self.proc = subprocess.Popen([sys.executable, "-m", "moestream.cli", "chat", *map(str, argv)], stdin=slave,
                                     stdout=slave, stderr=slave, env=ENV, start_new_session=True, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, pattern: str, timeout=TIMEOUT, after: int = 0) -> int:
        """Read output until `pattern` (a regex) appears past offset `after`; the offset past its match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.seen, after)
            if m:
                return m.end()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} after {timeout}s; terminal shows:\n{self.seen[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"chat exited ({self.proc.returncode}) before {pattern!r}:\n{self.seen[-3000:]}")
                self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole foreground group

    def wait(self, timeout=30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            try:
                if ready:
                    self.seen += os.read(self.master, 65536).decode("utf-8", "replace").replace("\r\n", "\n")
            except OSError:
                break
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"chat did not exit in {timeout}s; terminal shows:\n{self.seen[-3000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    made = []

    def start(*argv):
        made.append(Terminal(*argv))
        return made[-1]

    yield start
    for t in made:
        t.close()


PROMPT = r"\n>> "


def test_chat_history_with_arrow_keys_and_ctrl_d_exits(terminal):
    t = terminal(FIXTURE, "--max-tokens", 16)
    at = t.read_until(PROMPT)
    t.type("h\r")  # mlx_lm.chat's help command
    at = t.read_until(r"Ctrl-C stops an answer\n>> ", after=at)
    t.type("\x1b[A\r")  # up arrow recalls "h" (readline), Enter sends it again
    at = t.read_until(r"Ctrl-C stops an answer\n>> ", after=at)
    assert "^[[A" not in t.seen and "unknown command" not in t.seen
    t.type("\x04")  # Ctrl-D at the prompt
    assert t.wait() == 0
    assert "Traceback" not in t.seen


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_ctrl_c_stops_the_answer_and_the_session_goes_on(terminal):
    """~4 s: a long answer (the fixture rambles after a Python prompt) is stopped by SIGINT to
    the chat's process group; the next question is answered in the same conversation; Ctrl-C at the
    prompt then exits with 0."""
    t = terminal(FIXTURE, "--max-tokens", 3000)
    at = t.read_until(PROMPT)
    t.type("def fibonacci(n):\r")
    at = t.read_until(r"def fibonacci\(n\):\n[\s\S]{80}", after=at)  # the answer is streaming
    t.interrupt()
    at = t.read_until(r"\[stopped: the answer so far stays in the conversation\]\n" + STATS.pattern + PROMPT,
                      timeout=30, after=at)
    stopped = re.findall(r"\[(\d+) tok,", t.seen)
    assert 0 < int(stopped[-1]) < 3000
    t.type("Hello\r")
    at = t.read_until(r"Hello\n.+\n" + STATS.pattern + PROMPT, after=at)
    # Ctrl-C at the prompt ends the chat. Not in the same instant the prompt shows: Python's input()
    # prints it before it waits, and a signal in between is only seen at the next key (a person
    # is never that fast)
    time.sleep(0.3)
    t.interrupt()
    assert t.wait() == 0
    assert "Traceback" not in t.seen and "KeyboardInterrupt" not in t.seen
