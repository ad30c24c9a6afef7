"""`moestream serve`: mlx-lm's OpenAI-compatible server on a streaming model, spoken to over real
HTTP on loopback. Random weights produce gibberish, so where a test needs a known reply (a tool
call) it adds a logits processor that forces the reply's tokens; the model still runs every step
(its experts are streamed) and the HTTP handler, streaming and tool-call parsing are mlx-lm's."""

from __future__ import annotations

import json
import threading
import urllib.request
from contextlib import contextmanager

import mlx.core as mx
import pytest

TIMEOUT = 60  # seconds, for every request
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def served(bundle_dir):
    """(handle, model, tokenizer): the server on 127.0.0.1 with a free port, and a memory budget
    whose expert cache holds a quarter of the experts."""
    import moestream
    from moestream.runtime.frontends.serve import start_server
    from moestream.runtime.model.load import runtime_of

    bundle = bundle_dir("qwen3_moe")
    model, _ = moestream.load(bundle, dtype="float32")
    rt = runtime_of(model)
    expert_bytes = sum(rt.store.nbytes(layer, e) for layer in rt.store.layers for e in range(model.args.num_experts))
    p = rt.plan
    budget = p.resident_bytes + p.kv_reserve_bytes + p.buffer_bytes + max(p.min_layer_bytes, expert_bytes // 4)
    model, tokenizer = moestream.load(bundle, memory_budget=budget, dtype="float32")
    assert moestream.stats(model)["cache_capacity_bytes"] < expert_bytes
    handle = start_server(model, tokenizer, host="127.0.0.1", port=0)
    try:
        yield handle, model, tokenizer
    finally:
        handle.shutdown()


def get(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        assert r.status == 200
        return json.loads(r.read())


def post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.status == 200
        if not body.get("stream"):
            return json.loads(r.read())
        assert r.headers["Content-Type"] == "text/event-stream"
        chunks = []
        for raw in r:  # server-sent events: "data: {...}" lines, ": keepalive" comments
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks
            chunks.append(json.loads(line[len("data: "):]))
        raise AssertionError("the stream ended without [DONE]")


def in_threads(ask, n: int) -> list[Exception]:
    """ask(0..n-1), each in its own thread, all at once; the exceptions they raised."""
    errors = []

    def run(i):
        try:
            ask(i)
        except Exception as e:  # returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return errors


class ForceTokens:
    """A logits processor that leaves one token possible at each step: `ids`, then repeats the last."""

    def __init__(self, ids):
        self.ids, self.step = ids, 0

    def __call__(self, tokens, logits):
        token = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        keep = mx.arange(logits.shape[-1]) == token
        return mx.where(keep, mx.zeros_like(logits), mx.full(logits.shape, -1e9, dtype=logits.dtype))


@contextmanager
def forced_reply(monkeypatch, tokenizer, text):
    """Requests made inside reply `text` and then end the turn (the template's end token)."""
    import mlx_lm.server

    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    real = mlx_lm.server._make_logits_processors
    with monkeypatch.context() as m:
        m.setattr(mlx_lm.server, "_make_logits_processors", lambda args: [*real(args), ForceTokens(ids)])
        yield


def test_models_and_health(served):
    handle, _, _ = served
    models = get(handle.url + "/v1/models")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [handle.model_id]
    assert handle.model_id.endswith("qwen3_moe-4-64")
    assert get(handle.url + "/health") == {"status": "ok"}


def test_chat_completion_streams_experts_from_disk(served):
    import moestream

    handle, model, tokenizer = served
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    before = moestream.stats(model)
    for name in (handle.model_id, "default_model"):
        reply = post(handle.url, {"model": name, "messages": messages, "max_tokens": 5, "temperature": 0.0})
        assert reply["object"] == "chat.completion" and reply["model"] == name
        choice = reply["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("length", "stop")
        usage = reply["usage"]
        assert usage["prompt_tokens"] == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        assert 1 <= usage["completion_tokens"] <= 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    after = moestream.stats(model)
    # the served model is ours: its streaming layers looked experts up, and read them from disk
    assert after["cache_hits"] + after["cache_misses"] > before["cache_hits"] + before["cache_misses"]
    assert after["bytes_read"] > 0 and after["expert_cache_peak_bytes"] <= after["cache_capacity_bytes"]


def test_streaming_chat_completion(served):
    handle, _, _ = served
    body = {"messages": [{"role": "user", "content": "Tell me about experts."}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "seed": 3}  # a seed: mlx-lm's unbatched path
    chunks = post(handle.url, body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    *content, final, usage = chunks
    assert content and all(c["choices"][0]["finish_reason"] is None for c in content)
    assert final["choices"][0]["finish_reason"] in ("length", "stop")
    assert usage["choices"] == [] and 1 <= usage["usage"]["completion_tokens"] <= 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content + [final])
    assert text and len({c["id"] for c in chunks}) == 1


def test_tool_call_round_trip(served, monkeypatch):
    handle, _, tokenizer = served
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    with forced_reply(monkeypatch, tokenizer, TOOL_CALL):
        reply = post(handle.url, {"messages": messages, "tools": TOOLS, "max_tokens": 64})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert not choice["message"]["content"]  # the markup went to tool_calls, not the text

    # send the tool's result back: a normal reply, rendered from the whole conversation
    messages += [choice["message"],
                 {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"sky": "sunny", "c": 21})}]
    with forced_reply(monkeypatch, tokenizer, "It is sunny and warm in Paris."):
        reply = post(handle.url, {"messages": messages, "tools": TOOLS, "max_tokens": 64})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "It is sunny and warm in Paris."
    for m in messages:  # as the template sees them: arguments as objects
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True)
    assert "<tool_response>" in tokenizer.decode(expected)
    assert reply["usage"]["prompt_tokens"] == len(expected)


def test_streaming_tool_call(served, monkeypatch):
    handle, _, tokenizer = served
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, "max_tokens": 64,
            "stream": True}
    with forced_reply(monkeypatch, tokenizer, TOOL_CALL):
        chunks = post(handle.url, body)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_concurrent_requests(served):
    """Requests in flight together go through mlx-lm's batched decoding ([B, L, k] routed indices
    through the streaming layers) and give what each gives alone (a seed: the unbatched path)."""
    handle, _, _ = served
    results = {}

    def body(i, **extra):
        return {"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 12, **extra}

    def ask(i):
        results[i] = post(handle.url, body(i))

    errors = in_threads(ask, 3)
    assert not errors and len(results) == 3
    for i, reply in results.items():
        alone = post(handle.url, body(i, seed=0))
        assert reply["choices"][0]["message"] == alone["choices"][0]["message"]
        assert reply["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"]


def test_stats_show_concurrent_requests_decoded_in_one_batch(served):
    """mlx_lm.server batches our model (its KV caches merge), and GET /moestream/stats shows it: the
    generation thread's token times of two requests in flight together overlap. Each request is
    longer than mlx-lm's 0.5 s scheduling window, so the second joins the first's batch however
    late its handler queues it."""
    import moestream

    handle, model, tokenizer = served
    assert handle.generator.model_provider.is_batchable
    before = get(handle.url + "/moestream/stats")
    no_eos = {str(t): -100 for t in tokenizer.eos_token_ids}
    replies = []

    def ask(i):
        replies.append(post(handle.url, {"messages": [{"role": "user", "content": f"Story {i}"}],
                                         "max_tokens": 300, "logit_bias": no_eos}))

    errors = in_threads(ask, 2)
    assert not errors and [r["usage"]["completion_tokens"] for r in replies] == [300, 300]
    after = get(handle.url + "/moestream/stats")
    assert after["clock"] == "monotonic" and after["requests_finished"] == before["requests_finished"] + 2
    a, b = sorted(after["requests"][-2:], key=lambda r: r["first_token"])
    assert a["tokens"] == b["tokens"] == 300
    assert a["first_token"] <= a["last_token"] and b["first_token"] < a["last_token"]  # decoded together
    assert after["model"]["bytes_read"] >= before["model"]["bytes_read"] > 0
    assert after["model"]["budget_bytes"] == moestream.stats(model)["budget_bytes"]


def test_shutdown_frees_the_port_and_the_generation_threads_mlx_state(bundle_dir, monkeypatch):
    """After shutdown nobody listens, and the generation thread released its MLX state in its own
    thread before it ended (io/workers.py: else a stop just before exit may abort the process)."""
    import socket

    import moestream
    from moestream.runtime.frontends.serve import start_server

    released = []
    clear_streams = mx.clear_streams
    monkeypatch.setattr(mx, "clear_streams", lambda: (released.append(threading.get_ident()), clear_streams()))
    model, tokenizer = moestream.load(bundle_dir("qwen3_moe"), dtype="float32")
    with start_server(model, tokenizer, host="127.0.0.1", port=0) as handle:
        port = int(handle.url.rsplit(":", 1)[1])
        assert get(handle.url + "/health") == {"status": "ok"}
        post(handle.url, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        generation_thread = handle.generator._generation_thread.ident
    assert not handle.thread.is_alive() and not handle.generator.generation_available()
    assert generation_thread in released
    with pytest.raises(ConnectionRefusedError):  # nobody listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serve_command(bundle_dir, monkeypatch, capsys):
    """`moestream serve BUNDLE ...` (the CLI's command): prints the URL and the budget, serves, and
    stops cleanly when its server is shut down."""
    from moestream.cli import command_parser
    from moestream.runtime.frontends import serve as serve_module

    started, real_start = [], serve_module.start_server

    def start_server(*args, **kwargs):
        started.append(real_start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(serve_module, "start_server", start_server)
    parser, command = command_parser("serve")
    args = parser.parse_args([str(bundle_dir("qwen3_moe")), "--port", "0", "--dtype", "float32",
                              "--memory-budget", "8MB", "--io-mode", "buffered"])
    thread = threading.Thread(target=command.run, args=(args,), daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if started or not thread.is_alive():
                break
            thread.join(0.05)
        (handle,) = started
        assert get(handle.url + "/v1/models")["data"][0]["id"] == handle.model_id
        reply = post(handle.url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        for handle in started:
            handle.shutdown()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    out = capsys.readouterr().out
    assert f"{handle.url}/v1" in out and "memory budget 8.00 MB" in out


# --- what a user meets: the model id, tool calls that do not parse, a busy port, mlx-lm's options --


def test_the_model_id_is_the_folder_name_or_the_repo_id(served, tmp_path):
    import os

    from moestream.runtime.frontends.serve import served_model_id

    handle, model, _ = served
    assert handle.model_id == "qwen3_moe-4-64" and not os.path.isabs(handle.model_id)
    assert get(handle.url + "/v1/models")["data"][0]["id"] == "qwen3_moe-4-64"
    snapshot = tmp_path / "hub" / "models--me--q3-moestream" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert served_model_id(model, str(snapshot)) == "me/q3-moestream"  # fetched by repo id into the HF cache
    assert served_model_id(model, "me/q3-moestream") == "me/q3-moestream"  # as given on the command line
    assert served_model_id(model, str(tmp_path / "hub")) == "hub"


BROKEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'


def test_a_tool_call_that_does_not_parse_comes_back_as_text(served, monkeypatch):
    """mlx-lm drops it and still says finish_reason "tool_calls"; the client gets the model's text."""
    handle, _, tokenizer = served
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for stream in (False, True):
        with forced_reply(monkeypatch, tokenizer, BROKEN_CALL):
            reply = post(handle.url, {"messages": messages, "tools": TOOLS, "max_tokens": 64, "stream": stream})
        if stream:
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in reply)
            assert not [tc for c in reply for tc in c["choices"][0]["delta"].get("tool_calls", [])]
            finish = reply[-1]["choices"][0]["finish_reason"]
        else:
            message, finish = reply["choices"][0]["message"], reply["choices"][0]["finish_reason"]
            text = message["content"]
            assert "tool_calls" not in message
        assert text == BROKEN_CALL and finish == "stop", (stream, reply)


def test_good_and_broken_tool_calls_in_one_reply(served, monkeypatch):
    handle, _, tokenizer = served
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, "max_tokens": 96}
    with forced_reply(monkeypatch, tokenizer, f"{TOOL_CALL}\n{BROKEN_CALL}"):
        reply = post(handle.url, body)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] == "\n" + BROKEN_CALL


def test_a_tool_call_cut_by_max_tokens_comes_back_as_text(served, monkeypatch):
    handle, _, tokenizer = served
    ids = tokenizer.encode(TOOL_CALL, add_special_tokens=False)
    cut = tokenizer.decode(ids[:8])
    with forced_reply(monkeypatch, tokenizer, TOOL_CALL):
        reply = post(handle.url, {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS,
                                  "max_tokens": 8})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == cut and cut.startswith("<tool_call>")


def test_a_text_completion_keeps_tool_call_markup_in_its_text(served, monkeypatch):
    handle, _, tokenizer = served
    with forced_reply(monkeypatch, tokenizer, TOOL_CALL):
        req = urllib.request.Request(handle.url + "/v1/completions", data=json.dumps(
            {"prompt": "The weather tool:", "max_tokens": 64}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            reply = json.loads(r.read())
    assert reply["choices"][0]["text"] == TOOL_CALL and reply["choices"][0]["finish_reason"] == "stop"


def test_mlx_server_options_pass_through(bundle_dir):
    import moestream
    from moestream.cli import command_parser
    from moestream.commands.serve import MLX_OPTIONS
    from moestream.runtime.frontends.serve import server_args, start_server

    parser, _ = command_parser("serve")
    args = parser.parse_args(["b", "--temp", "0.7", "--max-tokens", "3", "--decode-concurrency", "4",
                              "--prompt-cache-bytes", "1GB", "--chat-template-args", '{"enable_thinking": false}'])
    cli_args = server_args("m", **{name: getattr(args, name) for name in MLX_OPTIONS})
    assert (cli_args.temp, cli_args.max_tokens, cli_args.decode_concurrency) == (0.7, 3, 4)
    assert cli_args.prompt_cache_bytes == 10**9 and cli_args.chat_template_args == {"enable_thinking": False}
    defaults = parser.parse_args(["b"])  # mlx_lm.server's own defaults
    assert (defaults.max_tokens, defaults.temp, defaults.prompt_cache_size) == (512, 0.0, 10)
    assert defaults.prefill_step_size is None  # the memory plan's chunk
    model, tokenizer = moestream.load(bundle_dir("qwen3_moe"), dtype="float32")
    with start_server(model, tokenizer, port=0, max_tokens=3, prefill_step_size=None) as handle:
        reply = post(handle.url, {"messages": [{"role": "user", "content": "Hi"}]})  # no max_tokens: the server's
        planned = getattr(moestream.runtime_of(model).plan, "prefill_tokens", None) or 2048
        assert handle.generator.cli_args.prefill_step_size == planned
    assert 1 <= reply["usage"]["completion_tokens"] <= 3


def test_a_busy_port_is_one_line(bundle_dir, served):
    import socket
    import subprocess
    import sys

    from moestream.common.errors import MoestreamError
    from moestream.runtime.frontends.serve import ServeError, start_server

    _, model, tokenizer = served
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        threads = threading.active_count()
        with pytest.raises(ServeError, match=f"127.0.0.1:{port}: the port is in use") as error:
            start_server(model, tokenizer, port=port)
        assert isinstance(error.value, MoestreamError) and isinstance(error.value, OSError)
        assert threading.active_count() == threads  # no generation thread left behind
        r = subprocess.run([sys.executable, "-m", "moestream.cli", "serve", str(bundle_dir("qwen3_moe")), "--port",
                            str(port)], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"moestream serve: error: cannot listen on 127.0.0.1:{port}: the port is in use (another server is listening "
        "there: stop it, choose another --port, or --port 0 for any free one)"]


@contextmanager
def serve_process(bundle):
    """`moestream serve BUNDLE --port 0` in its own process: (the process, its first line, the URL
    without /v1); killed if still running when the block ends."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "moestream.cli", "serve", str(bundle), "--port", "0",
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("moestream serve: http://"), (first, proc.stderr.read() if proc.poll() else "")
        yield proc, first, first.split()[2].removesuffix("/v1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_serve_command_end_to_end_with_the_trained_fixture():
    """`moestream serve` in its own process, spoken to over HTTP: the fixture's model id, a real
    tool call from the trained model, Ctrl-C stops it with exit code 0."""
    import signal

    from moestream.demo import DEMO_REQUEST, DEMO_TOOLS, FIXTURE

    with serve_process(FIXTURE) as (proc, first, url):
        assert "model id qwen3-moe-tiny-tools" in first
        assert [m["id"] for m in get(url + "/v1/models")["data"]] == ["qwen3-moe-tiny-tools"]
        reply = post(url, {"model": "qwen3-moe-tiny-tools", "messages": [{"role": "user", "content": DEMO_REQUEST}],
                           "tools": DEMO_TOOLS, "max_tokens": 64})
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "weather_forecast"
        assert json.loads(call["function"]["arguments"])["location"] == "Zagreb"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0


@pytest.mark.slow  # a server process: over 3 s here
def test_serve_stops_on_sigterm_in_the_middle_of_a_generation():
    """A service manager stops a server with SIGTERM: with a streaming request in flight, `moestream
    serve` closes its listener, ends the generation and exits 0, as Ctrl-C does."""
    import signal

    from moestream.demo import FIXTURE

    with serve_process(FIXTURE) as (proc, _, url):
        eos = json.loads((FIXTURE / "generation_config.json").read_text())["eos_token_id"]
        added = json.loads((FIXTURE / "tokenizer.json").read_text())["added_tokens"]
        tool_call = [t["id"] for t in added if t["content"] == "<tool_call>"]  # a tool call streams nothing till its end
        assert tool_call, "the fixture names its tool-call token"
        suppressed = (eos if isinstance(eos, list) else [eos]) + tool_call
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 40}],
                           "max_tokens": 2000, "stream": True,  # it generates text until stopped
                           "logit_bias": {str(t): -100 for t in suppressed}}).encode()
        reply = urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", body,
                                                              {"Content-Type": "application/json"}), timeout=TIMEOUT)
        while not reply.readline().startswith(b"data: "):  # keep-alive comments until the first token
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()[-2000:]
        rest = reply.read()  # the stream ended early, not at max_tokens
        assert rest.count(b"data: ") < 1000, len(rest)
