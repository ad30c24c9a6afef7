"""`moestream serve` under abuse, over real HTTP on loopback: prompts longer than the context, a
`max_tokens` beyond it, clients that leave mid-generation, and malformed requests; meanwhile other
clients are served. The limit is the smaller of the model's context (4096 for the synth model) and
the KV cache its memory budget reserves (`max_kv_size`)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

TIMEOUT = 60  # seconds, for every request
REFUSAL_S = 5  # a refused prompt comes back well within this, however long it is
MB = 1 << 20


@pytest.fixture(scope="module")
def served(bundle_dir):
    """(handle, model, tokenizer): the synth qwen3_moe served with the default KV reserve (4096)."""
    import moestream
    from moestream.runtime.frontends.serve import start_server

    model, tokenizer = moestream.load(bundle_dir("qwen3_moe"), dtype="float32")
    handle = start_server(model, tokenizer, host="127.0.0.1", port=0)
    try:
        yield handle, model, tokenizer
    finally:
        handle.shutdown()


def call(url, method="POST", path="/v1/chat/completions", body=None, raw=None, headers=None):
    """(status, headers, parsed JSON body) of one request."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        payload = r.read()
        assert r.getheader("Content-Type") == "application/json", payload[:200]
        return r.status, dict(r.getheaders()), json.loads(payload)
    finally:
        conn.close()


def assert_error(reply, status, param=..., code=...):
    """An OpenAI error object: {"error": {"message", "type", "param", "code"}}, no Python traceback."""
    got, _, body = reply
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error


def no_eos(tokenizer):
    """A logit_bias that keeps the model from ending its turn: generation runs to max_tokens."""
    return {str(t): -100 for t in tokenizer.eos_token_ids}


def chat(text, **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_context_limit_is_the_smaller_of_model_and_budget(served, bundle_dir):
    import moestream
    from moestream.runtime.frontends.serve import context_limit

    _, model, _ = served
    limit = context_limit(model)
    assert (limit.tokens, limit.model_tokens, limit.budget_tokens) == (4096, 4096, 4096)
    small, _ = moestream.load(bundle_dir("qwen3_moe"), dtype="float32", max_kv_size=64)
    limit = context_limit(small)
    assert (limit.tokens, limit.model_tokens, limit.budget_tokens) == (64, 4096, 64)


def test_huge_prompt_refused_at_once_while_others_are_served(served):
    """A 1 MB prompt (chat and text completion) and one just past the context are refused with a
    400 quickly, never reaching the generation thread, while another client's requests go on."""
    handle, _, tokenizer = served
    others, stop = [], threading.Event()

    def other_client():
        for i in range(50):
            if stop.is_set() and len(others) >= 3:
                return
            t0 = time.monotonic()
            status, _, reply = call(handle.url, body=chat(f"Question {i}", max_tokens=8))
            others.append((status, time.monotonic() - t0, reply))

    thread = threading.Thread(target=other_client)
    thread.start()
    try:
        huge = ("All work and no play makes Jack a dull boy. " * (MB // 40))[:MB]
        for path, body, param in (("/v1/chat/completions", chat(huge, max_tokens=10**9), "messages"),
                                  ("/v1/completions", {"prompt": huge, "max_tokens": 5}, "prompt")):
            t0 = time.monotonic()
            error = assert_error(call(handle.url, path=path, body=body), 400, param, "context_length_exceeded")
            assert time.monotonic() - t0 < REFUSAL_S
            assert "maximum context length is 4096 tokens" in error["message"]

        # longer than the context by a little: counted exactly (mlx-lm's chat template path), still refused
        per_word = len(tokenizer.encode("hello world " * 100, add_special_tokens=False)) / 100
        text = "hello world " * int(4500 / per_word)
        expected = len(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        assert 4096 <= expected < 8192
        t0 = time.monotonic()
        error = assert_error(call(handle.url, body=chat(text)), 400, "messages", "context_length_exceeded")
        assert time.monotonic() - t0 < REFUSAL_S
        assert f"resulted in {expected} tokens" in error["message"]
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive() and len(others) >= 3
    for status, seconds, reply in others:
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1
        assert seconds < 30


def _moe_calls(model):
    import moestream

    return moestream.runtime_of(model).stats()["moe_calls"]


def _settled(model, wait=1.0, within=10.0):
    """Whether the model's MoE call counter stops moving (no token generated for `wait` seconds)
    within `within` seconds."""
    deadline = time.monotonic() + within
    last = _moe_calls(model)
    while time.monotonic() < deadline:
        time.sleep(wait)
        now = _moe_calls(model)
        if now == last:
            return True
        last = now
    return False


def _send(handle, body: dict) -> socket.socket:
    """A connection with one chat completion request sent on it (the caller reads or leaves)."""
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def _wait_for_tokens(model, since: int, calls: int = 50) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _moe_calls(model) - since < calls:  # tokens are coming
        assert time.monotonic() < deadline, "no generation"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(served, stream):
    """A client asking for 10**9 tokens (capped to the context: thousands) leaves after the first
    chunk (or, not streaming, once generation has begun): its generation stops, and the server
    answers the next request."""
    handle, model, tokenizer = served
    assert _settled(model, wait=0.3)
    before = _moe_calls(model)
    sock = _send(handle, chat("Tell me a long story.", max_tokens=10**9, stream=stream, logit_bias=no_eos(tokenizer)))
    try:
        if stream:
            received = b""
            while b"data: {" not in received:
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.0 200")
        else:
            _wait_for_tokens(model, before)
    finally:
        sock.close()
    left = time.monotonic()
    assert _settled(model), "generation went on after the client left"
    assert time.monotonic() - left < 15
    tokens = (_moe_calls(model) - before) // len(model.layers)
    assert tokens < 3000, f"about {tokens} tokens: not stopped when the client left"
    status, _, reply = call(handle.url, body=chat("Still there?", max_tokens=4))
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_queued_request_of_a_departed_client_never_runs(served, monkeypatch):
    """Requests with a seed are served one at a time (mlx-lm's unbatched path): a second one waits
    in the queue behind the first. Its client leaves while it waits: when the generation thread
    takes it, it is dropped without being prefilled or generated."""
    from moestream.runtime.frontends.serve import POLL_S, RequestCancelled

    handle, model, tokenizer = served
    started, dropped, real = [], [], handle.generator._tokenize

    def spy(tok, request, args):
        try:
            result = real(tok, request, args)
        except RequestCancelled:
            dropped.append(request)
            raise
        started.append(request)
        return result

    monkeypatch.setattr(handle.generator, "_tokenize", spy)
    assert _settled(model, wait=0.3)
    before = _moe_calls(model)
    first = _send(handle, chat("First, a long story.", max_tokens=10**9, seed=1, logit_bias=no_eos(tokenizer)))
    try:
        _wait_for_tokens(model, before)
        second = _send(handle, chat("Second, in the queue.", max_tokens=10**9, seed=2, logit_bias=no_eos(tokenizer)))
        time.sleep(4 * POLL_S)  # the second's handler waits for it to start
        second.close()
        time.sleep(4 * POLL_S)  # and notices that its client left
        assert len(started) == 1 and not dropped  # the first is still generating
    finally:
        first.close()
    assert _settled(model), "generation went on after the clients left"
    deadline = time.monotonic() + TIMEOUT
    while not dropped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(started) == 1 and len(dropped) == 1
    status, _, reply = call(handle.url, body=chat("Still there?", max_tokens=4, seed=3))
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1


MALFORMED = [
    # (id, method, path, raw body or JSON-able body, status, param, code)
    ("bad json", "POST", "/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    ("not utf-8", "POST", "/v1/chat/completions", b"\xff\xfe{}", 400, None, "invalid_json"),
    ("body a list", "POST", "/v1/chat/completions", [], 400, None, "invalid_type"),
    ("no messages", "POST", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages", "missing_required_parameter"),
    ("messages a string", "POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("messages empty", "POST", "/v1/chat/completions", {"messages": []}, 400, "messages", "empty_array"),
    ("message a string", "POST", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
    ("no role", "POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role",
     "missing_required_parameter"),
    ("content a number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, 400,
     "messages[0].content", "invalid_type"),
    ("content part image", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, 400,
     "messages[0].content[0].type", "invalid_value"),
    ("content part no text", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text"}]}]}, 400, "messages[0].content[0].text", "invalid_type"),
    ("tool call arguments not json", "POST", "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "f", "arguments": "{not json"}}]}]}, 400, "messages[1].tool_calls[0].function.arguments",
     "invalid_value"),
    ("tools a string", "POST", "/v1/chat/completions", chat("hi", tools="get_weather"), 400, "tools", "invalid_type"),
    ("max_tokens negative", "POST", "/v1/chat/completions", chat("hi", max_tokens=-1), 400, "max_tokens",
     "invalid_value"),
    ("max_tokens zero", "POST", "/v1/chat/completions", chat("hi", max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max_tokens a string", "POST", "/v1/chat/completions", chat("hi", max_tokens="10"), 400, "max_tokens",
     "invalid_type"),
    ("max_tokens a boolean", "POST", "/v1/chat/completions", chat("hi", max_tokens=True), 400, "max_tokens",
     "invalid_type"),
    ("max_tokens a fraction", "POST", "/v1/chat/completions", chat("hi", max_tokens=1.5), 400, "max_tokens",
     "invalid_type"),
    ("max_completion_tokens negative", "POST", "/v1/chat/completions", chat("hi", max_completion_tokens=-5), 400,
     "max_completion_tokens", "invalid_value"),
    ("temperature too high", "POST", "/v1/chat/completions", chat("hi", temperature=5), 400, "temperature",
     "invalid_value"),
    ("temperature negative", "POST", "/v1/chat/completions", chat("hi", temperature=-0.5), 400, "temperature",
     "invalid_value"),
    ("temperature a string", "POST", "/v1/chat/completions", chat("hi", temperature="hot"), 400, "temperature",
     "invalid_type"),
    ("top_p above 1", "POST", "/v1/chat/completions", chat("hi", top_p=1.5), 400, "top_p", "invalid_value"),
    ("stream a string", "POST", "/v1/chat/completions", chat("hi", stream="yes"), 400, "stream", "invalid_type"),
    ("stream_options.include_usage", "POST", "/v1/chat/completions",
     chat("hi", stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage",
     "invalid_type"),
    ("stop a number", "POST", "/v1/chat/completions", chat("hi", stop=5), 400, "stop", "invalid_type"),
    ("logit_bias key", "POST", "/v1/chat/completions", chat("hi", logit_bias={"abc": 1}), 400, "logit_bias.abc",
     "invalid_value"),
    ("logit_bias token out of vocab", "POST", "/v1/chat/completions", chat("hi", logit_bias={"999999": 1}), 400,
     "logit_bias.999999", "invalid_value"),
    ("n above 1", "POST", "/v1/chat/completions", chat("hi", n=2), 400, "n", "invalid_value"),
    ("model a number", "POST", "/v1/chat/completions", chat("hi", model=42), 400, "model", "invalid_type"),
    ("adapters", "POST", "/v1/chat/completions", chat("hi", adapters="lora"), 400, "adapters",
     "unsupported_parameter"),
    ("no prompt", "POST", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("prompt a number", "POST", "/v1/completions", {"prompt": 7}, 400, "prompt", "invalid_type"),
    ("unknown POST path", "POST", "/v1/embeddings", {"input": "hi"}, 404, None, "unknown_url"),
    ("unknown GET path", "GET", "/v1/nothing", None, 404, None, "unknown_url"),
    ("unsupported method", "DELETE", "/v1/chat/completions", None, 405, ..., ...),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_json_4xx(served, case):
    handle, _, _ = served
    _, method, path, body, status, param, code = case
    raw = body if isinstance(body, bytes) else None
    assert_error(call(handle.url, method, path, body=None if raw else body, raw=raw), status, param, code)


def test_malformed_transport_and_template_errors(served, monkeypatch):
    """No Content-Length, an oversized body (refused unread), a chat template that raises: 4xx in
    JSON; and afterwards the server still answers."""
    import jinja2
    import mlx_lm.server

    handle, _, _ = served
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    for head, status in ((b"POST /v1/chat/completions HTTP/1.0\r\n\r\n", 411),
                         (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 1000000000\r\n\r\n", 413),
                         (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: many\r\n\r\n", 400),
                         (b"GET /a b HTTP/1.0\r\n\r\n", 400), (b"PUT /v1/models HTTP/1.0\r\n\r\n", 405)):
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(head)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head_part, _, payload = reply.partition(b"\r\n\r\n")
        assert head_part.split(b" ")[1] == str(status).encode(), reply
        assert b"application/json" in head_part.lower()
        error = json.loads(payload)["error"]
        assert error["type"] == "invalid_request_error" and error["message"]

    real = mlx_lm.server.process_message_content

    def strict(messages, **kwargs):
        if any(m.get("content") == "roles must alternate" for m in messages):
            raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant/user/...")
        return real(messages, **kwargs)

    monkeypatch.setattr(mlx_lm.server, "process_message_content", strict)
    error = assert_error(call(handle.url, body=chat("roles must alternate")), 400, "messages", "invalid_prompt")
    assert "Conversation roles must alternate" in error["message"]
    status, _, reply = call(handle.url, body=chat("Fine now?", max_tokens=3))
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def test_server_errors_are_json_and_the_server_lives_on(served, monkeypatch):
    """A failure in the handler, or in the generation thread for one request, is a 500 in OpenAI's
    shape (never a 404 with Python's text); the next request is served."""
    handle, _, _ = served
    generator = handle.generator
    real_admit, real_tokenize = generator.admit, generator._tokenize

    def admit(request, *args):
        if request.messages[-1]["content"] == "fail in the handler":
            raise ZeroDivisionError("division by zero")
        return real_admit(request, *args)

    def tokenize(tokenizer, request, args):
        if request.messages[-1]["content"] == "fail in generation":
            raise RuntimeError("boom")
        return real_tokenize(tokenizer, request, args)

    monkeypatch.setattr(generator, "admit", admit)
    monkeypatch.setattr(generator, "_tokenize", tokenize)  # the generation thread's call
    error = assert_error(call(handle.url, body=chat("fail in the handler")), 500)
    assert "ZeroDivisionError" in error["message"]
    error = assert_error(call(handle.url, body=chat("fail in generation")), 500)
    assert error["message"] == "Generation failed: RuntimeError: boom"
    status, _, reply = call(handle.url, body=chat("And now?", max_tokens=3))
    assert status == 200 and generator.generation_available()


def test_null_parameters_mean_defaults(served):
    handle, _, _ = served
    status, _, reply = call(handle.url, body=chat("hi", max_tokens=3, temperature=None, stop=None, tools=None,
                                                  seed=None, xtc_probability=0))
    assert status == 200 and 1 <= reply["usage"]["completion_tokens"] <= 3


def test_max_tokens_capped_to_the_context(bundle_dir):
    """With a 64-token KV reserve: max_tokens 10**9 (or left out: mlx-lm's 512) is capped to what
    the prompt leaves, streaming or not; a prompt that fills the 64 tokens is refused, naming both
    limits."""
    import moestream
    from moestream.runtime.frontends.serve import MAX_TOKENS_HEADER, start_server

    model, tokenizer = moestream.load(bundle_dir("qwen3_moe"), dtype="float32", max_kv_size=64)
    messages = [{"role": "user", "content": "Tell me a story."}]
    prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    left = 64 - prompt
    with start_server(model, tokenizer, host="127.0.0.1", port=0) as handle:
        for extra in ({"max_tokens": 10**9}, {"max_completion_tokens": 10**9}, {}):
            status, headers, reply = call(handle.url, body={"messages": messages, "logit_bias": no_eos(tokenizer),
                                                            **extra})
            assert status == 200 and headers[MAX_TOKENS_HEADER] == str(left)
            assert reply["usage"] == {"prompt_tokens": prompt, "completion_tokens": left, "total_tokens": 64,
                                      "prompt_tokens_details": reply["usage"]["prompt_tokens_details"]}
            assert reply["choices"][0]["finish_reason"] == "length"

        status, headers, reply = call(handle.url, body={"messages": messages, "max_tokens": 5})  # within: kept
        assert status == 200 and reply["usage"]["completion_tokens"] <= 5 and MAX_TOKENS_HEADER not in headers

        body = {"messages": messages, "logit_bias": no_eos(tokenizer), "max_tokens": 10**9, "stream": True,
                "stream_options": {"include_usage": True}}
        host, port = handle.url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader(MAX_TOKENS_HEADER) == str(left)
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                  if line.startswith("data: {")]
        conn.close()
        assert events[-1]["usage"]["completion_tokens"] == left
        assert events[-2]["choices"][0]["finish_reason"] == "length"

        long = [{"role": "user", "content": "word " * 80}]
        error = assert_error(call(handle.url, body={"messages": long, "max_tokens": 1}), 400, "messages",
                             "context_length_exceeded")
        assert "maximum context length is 64 tokens" in error["message"]
        assert "the model's context is 4096 tokens" in error["message"]
        assert "KV cache reserve (--max-kv-size) is 64 tokens" in error["message"]
