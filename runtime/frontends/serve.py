"""`moestream serve`: mlx-lm's own OpenAI-compatible server (`mlx_lm.server`: its HTTP handler,
request queue, batching, prompt cache, streaming and tool-call parsing) serving a model that
`moestream.load` built, so that experts stream from disk.

The seam is mlx-lm's `ModelProvider`: ours hands out the already-loaded model and tokenizer for
any requested model name (the served id, which /v1/models lists, is the Hub repo id of a bundle
loaded by repo id, else the bundle folder's name; "default_model" works as in mlx-lm; other names
are served by the same model, not refused). The HTTP server is built here rather
than by `mlx_lm.server.run`, which blocks and has no handle to stop it; `start_server` runs it in
a background thread and returns a handle.

What this adds to mlx-lm's server, so that one client cannot starve the others or the memory
budget (mlx-lm's handler, generator and batching are otherwise used as they are):

- Context limit. A request's prompt (the chat template applied exactly as mlx-lm applies it,
  counted in the handler's thread before the request is queued) plus its `max_tokens` must fit in
  the smaller of the model's context (`max_position_embeddings`, or its `text_config`'s) and the
  KV cache the memory budget reserves (`plan.kv_tokens`, `--max-kv-size`). A prompt that leaves
  no room for one token is refused with a 400 (`code: context_length_exceeded`, the limit and the
  count in the message) and never reaches the generation thread. A `max_tokens` beyond what the
  prompt leaves is capped to it, as llama.cpp does (OpenAI refuses instead): the reply ends with
  `finish_reason: "length"` there, and the response carries `X-Moestream-Max-Tokens: N`, the
  number it was capped to. A prompt whose rendered text has more bytes than the limit's tokens
  can possibly cover (the vocabulary's longest token, twice over) is refused without being
  tokenized; a body over `max(16 MiB, 64 bytes per token of context)` is refused with a 413
  without being read.
- Malformed requests: bad JSON, wrong JSON types (`content` as a number, `messages` not a list,
  `max_tokens` negative or a string, `temperature` outside OpenAI's [0, 2] ...), image parts (the
  model reads text only), chat templates that cannot render the messages, unknown paths and
  methods: each gets a 4xx whose body is OpenAI's error object, `{"error": {"message", "type",
  "param", "code"}}`. An unexpected failure answers a 500 in the same shape; the handler thread
  never dies with a request, and the generation thread never sees a refused one.
- Client disconnects: while it waits for tokens, a request's handler thread checks its socket
  (a peek that finds the connection closed; a failed write does the same for streams) and
  cancels the request: mlx-lm's own `GenerationContext.stop()` if it has started, which removes
  it from the batch at the next step, else it is dropped when the generation thread takes it from
  the queue. Other requests go on being served.
- Tool calls that do not parse: mlx-lm's handler logs them and drops them, and still ends the
  reply with `finish_reason: "tool_calls"`, so the client gets neither a call nor the text. Here
  mlx-lm's parser is asked through `prompt.parse_tool_call` (which also refuses a call without a
  name or with arguments that are not a JSON object), and a call that does not parse is returned
  as text content, markup and all, as the model wrote it; a reply whose tool calls all failed
  ends with `finish_reason: "stop"` (or "length" where max_tokens cut it). A text completion
  (/v1/completions) has no tool calls in OpenAI's API: its tool-call markup stays in its text.
- `GET /moestream/stats`: the model's I/O and cache counters (`moestream.stats`) and, for the
  latest requests that finished, when the generation thread produced their first and last token
  (monotonic seconds) and how many tokens: whether concurrent requests were decoded together (in
  one batch) or one after another shows there, measured where the tokens are made rather than
  where a client reads them (`bench/serve_load.py` reads it).
- Listening: a port in use, an address that cannot be bound or resolved, a port outside
  0-65535 are a `ServeError` (a MoestreamError and an OSError) in one line naming host:port.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from queue import Empty as QueueEmpty
from queue import Queue
from types import SimpleNamespace

from mlx_lm import server as mlx_server
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

from ...common.errors import MoestreamError
from ...common.units import fmt_bytes
from ..io.workers import release_mlx_thread_state
from ..model.load import runtime_of
from .prompt import parse_tool_call

# How often a waiting handler looks whether its client is still connected (seconds).
POLL_S = 0.2
# A body is refused unread (413) above max(MIN_BODY_CAP, BODY_BYTES_PER_TOKEN * context tokens).
MIN_BODY_CAP = 16 << 20
BODY_BYTES_PER_TOKEN = 64
MAX_TOKENS_HEADER = "X-Moestream-Max-Tokens"
# How many finished requests' token times GET /moestream/stats keeps.
KEPT_SPANS = 4096
STATS_PATH = "/moestream/stats"


class ServeError(MoestreamError, OSError):
    """The server cannot start: the address is in use, cannot be bound or resolved, an option is out of range."""


def served_model_id(model, source: str | None = None) -> str:
    """The model id the server reports: the Hub repo id of a bundle loaded by repo id (`source` as
    given when it is not a local path, or read from the HF cache's models--ORG--NAME/snapshots/<commit>
    layout), else the bundle (or checkpoint) folder's name. Never an absolute path."""
    from pathlib import Path

    if source and not Path(source).expanduser().exists():
        return str(source).strip().rstrip("/")
    rt = runtime_of(model, required=False)
    path = Path(source).expanduser() if source else getattr(rt, "path", None)
    if path is None:
        return "default_model"
    path = Path(path).resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--") and repo.count("--") >= 2:
        return repo[len("models--"):].replace("--", "/")
    return path.name or str(path)


def server_args(model_id: str, host: str = "127.0.0.1", port: int = 8080, **overrides) -> argparse.Namespace:
    """The options `mlx_lm.server` reads from its command line, at its defaults (its `main`
    builds the parser inline, so they are repeated here); keyword arguments override them."""
    args = dict(
        model=model_id, adapter_path=None, draft_model=None, num_draft_tokens=3, host=host, port=port,
        allowed_origins=["*"], trust_remote_code=False, chat_template="", use_default_chat_template=False,
        temp=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=512, chat_template_args={},
        decode_concurrency=32, prompt_concurrency=8, prefill_step_size=2048, prompt_cache_size=10,
        prompt_cache_bytes=None, kv_bits=None, kv_group_size=64,
        quantized_kv_start=mlx_server.DEFAULT_QUANTIZED_KV_START, pipeline=False,
    )
    unknown = set(overrides) - set(args)
    if unknown:
        raise ValueError(f"unknown mlx_lm.server option(s): {', '.join(sorted(unknown))}")
    return argparse.Namespace(**{**args, **overrides})


class StreamingModelProvider(mlx_server.ModelProvider):
    """One model, loaded once by moestream, whatever model name a request names."""

    def __init__(self, model, tokenizer, cli_args: argparse.Namespace):
        super().__init__(cli_args)
        self._served = (model, tokenizer)

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if adapter_path is not None or draft_model_path not in (None, "default_model"):
            raise ValueError("moestream serve serves one model: adapters and draft models are not supported")
        if self.model is None:  # first request, or after ResponseGenerator's reset()
            self.model, self.tokenizer = self._served
            self.model_key = (self.cli_args.model, None, None)
            self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))
        return self.model, self.tokenizer


# --- the context limit ------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextLimit:
    """The most tokens (prompt + completion) one request may hold."""

    tokens: int
    model_tokens: int | None  # the model's context (max_position_embeddings), None if unknown
    budget_tokens: int | None  # the KV cache the memory budget reserves, None for a model not moestream's

    def describe(self) -> str:
        parts = []
        if self.model_tokens is not None:
            parts.append(f"the model's context is {self.model_tokens} tokens")
        if self.budget_tokens is not None:
            parts.append(f"the memory budget's KV cache reserve (--max-kv-size) is {self.budget_tokens} tokens")
        return " and ".join(parts)


def _model_config(model) -> dict:
    store = getattr(runtime_of(model, required=False), "store", None)
    if hasattr(store, "bundle"):
        return store.bundle.config
    if hasattr(store, "ckpt"):
        return store.ckpt.mlx_config()
    return {}


def _config_value(model, key: str):
    config = _model_config(model)
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        if cfg and isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
            return cfg[key]
    value = getattr(getattr(model, "args", None), key, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def context_limit(model) -> ContextLimit:
    """The smaller of the model's context and the tokens of KV cache the memory budget reserves."""
    rt = runtime_of(model, required=False)
    model_tokens = _config_value(model, "max_position_embeddings")
    budget_tokens = rt.plan.kv_tokens if rt is not None else None
    known = [n for n in (model_tokens, budget_tokens) if n]
    if not known:
        raise ValueError("the model's context length is unknown: no max_position_embeddings and no memory plan")
    return ContextLimit(min(known), model_tokens, budget_tokens)


def max_token_bytes(tokenizer) -> int | None:
    """An upper bound on the bytes of text one token covers: the longest vocabulary entry in UTF-8
    (byte-level BPE maps each byte to one character of one or two bytes, SentencePiece writes a
    space as the three-byte "▁", byte-fallback tokens are "<0x41>"). None if the vocabulary is not
    available."""
    try:
        vocab = tokenizer.get_vocab()
        return max(len(str(t).encode("utf-8", "surrogatepass")) for t in vocab) if vocab else None
    except Exception:  # a tokenizer without a plain vocabulary: no fast path, every prompt is tokenized
        return None


# --- errors -----------------------------------------------------------------------------------


class RequestError(Exception):
    """A request answered with an OpenAI-shaped error: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class _Respond(BaseException):
    """Carries a RequestError through mlx-lm's handler, which would answer any Exception raised
    by the generator with a 404 and its bare text."""

    def __init__(self, error: RequestError):
        super().__init__(str(error))
        self.error = error


class ClientGone(BaseException):
    """The client closed its connection while its request was in flight. A BaseException, so that
    mlx-lm's handler (which answers any Exception from the generator with an error response) lets
    it through to ours, which only logs it: nobody is left to answer."""


class RequestCancelled(Exception):
    """Raised in the generation thread for a request whose client left while it was queued: mlx-lm
    puts it on the request's (abandoned) response queue and goes on with the next request."""


_CONNECTION_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def _unavailable() -> RequestError:
    return RequestError("The generation thread has stopped: this server cannot generate.", 503, code="unavailable",
                        kind="server_error")


# --- request validation -----------------------------------------------------------------------


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


_ARTICLES = {"integer": "an integer", "array": "an array", "object": "an object", "null": "null"}


def _check_type(value, param: str, *expected: str):
    """`value` if its JSON type is one of `expected` ("number" takes integers too)."""
    got = _json_type(value)
    if got in expected or (got == "integer" and "number" in expected):
        return value
    names = ", ".join(_ARTICLES.get(e, f"a {e}") for e in expected)
    names = f"one of {names}" if len(expected) > 1 else names
    raise RequestError(f"Invalid type for '{param}': expected {names}, but got {_ARTICLES.get(got, f'a {got}')} "
                       f"instead.", param=param, code="invalid_type")


def _check_range(value, param: str, lo=None, hi=None):
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = " and ".join(s for s in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if s)
        raise RequestError(f"Invalid '{param}': expected a value {bounds}, but got {value} instead.",
                           param=param, code="invalid_value")
    return value


# Top-level parameters mlx-lm reads: JSON type, least and most value. null means the default.
_PARAMETERS = {
    "model": ("string",), "stream": ("boolean",), "stream_options": ("object",),
    "max_tokens": ("integer", 1), "max_completion_tokens": ("integer", 1),
    "temperature": ("number", 0, 2), "top_p": ("number", 0, 1), "top_k": ("integer", 0),
    "min_p": ("number", 0, 1), "n": ("integer", 1, 1), "seed": ("integer",),
    "repetition_penalty": ("number", 0), "repetition_context_size": ("integer", 0),
    "presence_penalty": ("number", -2, 2), "presence_context_size": ("integer", 0),
    "frequency_penalty": ("number", -2, 2), "frequency_context_size": ("integer", 0),
    "xtc_probability": ("number", 0, 1), "xtc_threshold": ("number", 0, 1),
    "logprobs": ("boolean",), "top_logprobs": ("integer", -1, 11),  # mlx-lm's range; -1: none
    "logit_bias": ("object",), "num_draft_tokens": ("integer", 0),
    "chat_template_kwargs": ("object",), "role_mapping": ("object",),
}
_FLOATS = ("xtc_probability", "xtc_threshold")  # mlx-lm insists on a float there


def validate_body(body, chat: bool, vocab_size: int | None = None) -> dict:
    """The request body as mlx-lm's handler may take it, or a RequestError saying what is wrong.
    Null parameters are dropped (mlx-lm then uses its defaults, as OpenAI does)."""
    if not isinstance(body, dict):
        got = _json_type(body)
        raise RequestError(f"The request body must be a JSON object, not {_ARTICLES.get(got, 'a ' + got)}.",
                           code="invalid_type")
    body = {k: v for k, v in body.items() if v is not None}
    for name, (kind, *bounds) in _PARAMETERS.items():
        if name in body:
            _check_range(_check_type(body[name], name, kind), name, *bounds)
    for name in _FLOATS:
        if name in body:
            body[name] = float(body[name])
    if "include_usage" in body.get("stream_options", {}):
        _check_type(body["stream_options"]["include_usage"], "stream_options.include_usage", "boolean")
    if "stream_options" in body:  # mlx-lm reads stream_options["include_usage"] unguarded
        body["stream_options"] = {"include_usage": False, **body["stream_options"]}
    for token, bias in body.get("logit_bias", {}).items():
        param = f"logit_bias.{token}"
        try:
            token_id = int(token)
        except ValueError:
            raise RequestError(f"Invalid '{param}': logit_bias keys must be token ids.", param=param,
                               code="invalid_value") from None
        _check_range(token_id, param, 0, None if vocab_size is None else vocab_size - 1)
        _check_range(_check_type(bias, param, "number"), param, -100, 100)
    if "adapters" in body:
        raise RequestError("moestream serve serves one model: adapters are not supported.", param="adapters",
                           code="unsupported_parameter")
    if body.get("draft_model", "default_model") != "default_model":
        raise RequestError("moestream serve serves one model: draft models are not supported.",
                           param="draft_model", code="unsupported_parameter")
    stop = body.get("stop", [])
    for i, word in enumerate(stop if isinstance(_check_type(stop, "stop", "string", "array"), list) else []):
        _check_type(word, f"stop[{i}]", "string")
    if chat:
        _validate_messages(body)
        for i, tool in enumerate(_check_type(body.get("tools", []), "tools", "array")):
            _check_type(tool, f"tools[{i}]", "object")
            function = _check_type(tool.get("function"), f"tools[{i}].function", "object")
            _check_type(function.get("name"), f"tools[{i}].function.name", "string")
    else:
        if "prompt" not in body:
            raise RequestError("Missing required parameter: 'prompt'.", param="prompt",
                               code="missing_required_parameter")
        _check_type(body["prompt"], "prompt", "string")
    return body


def _validate_messages(body: dict) -> None:
    if "messages" not in body:
        raise RequestError("Missing required parameter: 'messages'.", param="messages",
                           code="missing_required_parameter")
    messages = _check_type(body["messages"], "messages", "array")
    if not messages:
        raise RequestError("Invalid 'messages': empty array. Expected an array with at least one message.",
                           param="messages", code="empty_array")
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        _check_type(message, at, "object")
        if "role" not in message:
            raise RequestError(f"Missing required parameter: '{at}.role'.", param=f"{at}.role",
                               code="missing_required_parameter")
        _check_type(message["role"], f"{at}.role", "string")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                _check_type(message[key], f"{at}.{key}", "string")
        content = _check_type(message.get("content"), f"{at}.content", "string", "array", "null")
        for j, part in enumerate(content if isinstance(content, list) else []):
            _check_type(part, f"{at}.content[{j}]", "object")
            kind = _check_type(part.get("type"), f"{at}.content[{j}].type", "string")
            if kind != "text":
                raise RequestError(f"Invalid '{at}.content[{j}].type': this model reads text only, content parts "
                                   f"of type {kind!r} are not supported.", param=f"{at}.content[{j}].type",
                                   code="invalid_value")
            _check_type(part.get("text"), f"{at}.content[{j}].text", "string")
        for j, call in enumerate(_check_type(message.get("tool_calls") or [], f"{at}.tool_calls", "array")):
            where = f"{at}.tool_calls[{j}]"
            _check_type(call, where, "object")
            function = _check_type(call.get("function"), f"{where}.function", "object")
            _check_type(function.get("name"), f"{where}.function.name", "string")
            arguments = _check_type(function.get("arguments", {}), f"{where}.function.arguments", "string", "object")
            if isinstance(arguments, str) and arguments:
                try:
                    parsed = json.loads(arguments)
                except json.JSONDecodeError:
                    parsed = None
                if not isinstance(parsed, dict):
                    raise RequestError(f"Invalid '{where}.function.arguments': expected a JSON object in a string.",
                                       param=f"{where}.function.arguments", code="invalid_value")


# --- cancelling a request whose client left ---------------------------------------------------


def peer_closed(sock) -> bool:
    """Whether the other end of a connected socket has closed it (or reset it). Reads nothing: a
    peek, which finds end-of-file once the client has gone (a client that pipelines more bytes
    counts as connected)."""
    try:
        if hasattr(socket, "MSG_DONTWAIT"):
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        import select

        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


class Ticket:
    """One request's way back to its client: the connection to watch, the prompt already counted
    (so that the generation thread does not tokenize it again), and cancellation."""

    def __init__(self, connection=None):
        self.connection = connection
        self.tokenized = None  # what ResponseGenerator._tokenize returned, computed by the handler
        self.cancelled = False
        self._ctx = None
        self._lock = threading.Lock()
        self._checked = 0.0
        self.first_token = self.last_token = None  # time.monotonic() when the generation thread made them
        self.tokens = 0
        self.generated: list[str] = []  # the reply's text as the model wrote it (markup included)
        self.unparsed: list[str] = []  # tool-call bodies that did not parse, not yet put back in the text
        self.tool_calls_sent = 0

    # -- tool calls that do not parse come back as text

    def tool_parser(self, parser, as_text: bool = False):
        """`parser` (the tokenizer's, as mlx-lm's handler calls it) checked by `parse_tool_call`: a
        body that does not parse is recorded and refused with the ValueError mlx-lm's formatter
        skips. `as_text` (a text completion): every body is refused, to stay in the text."""

        def parse(text, tools=None):
            calls = None if as_text else parse_tool_call(parser, text, tools)
            if calls is None:
                self.unparsed.append(text)
                raise ValueError("moestream returns this tool call as text content")
            return calls

        return parse

    def settle_tool_calls(self, text: str, finish_reason, tool_calls, stream: bool, start: str, end: str | None):
        """(text, finish_reason) of one response (a whole reply or a stream chunk), with the markup
        of the tool calls that did not parse put back in the text, and "tool_calls" as the finish
        reason only if some call did parse."""
        self.tool_calls_sent += len(tool_calls or ())
        unparsed, self.unparsed = self.unparsed, []
        if unparsed:
            raw = "".join(self.generated)
            # the reply ended inside a tool call (max_tokens): its markup has no end marker
            open_last = finish_reason is not None and (not end or raw.rfind(start) > raw.rfind(end))
            markup = "".join(start + body + ("" if open_last and i == len(unparsed) - 1 else end or "")
                             for i, body in enumerate(unparsed))
            # a stream chunk carries what came since the last chunk, which the call came before
            text = markup + (text or "") if stream else (text or "") + markup
        if finish_reason == "tool_calls" and not self.tool_calls_sent:
            finish_reason = "stop"
        return text, finish_reason

    def attach(self, ctx) -> None:
        """The generation thread started the request (mlx-lm's GenerationContext)."""
        with self._lock:
            self._ctx = ctx
            if self.cancelled:
                ctx.stop()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._ctx is not None:
                self._ctx.stop()  # mlx-lm drops it from the batch (or the single loop) at its next step

    def check(self, force: bool = False) -> None:
        """Cancel and raise ClientGone if the client has closed its connection (looked at most
        every POLL_S unless `force`)."""
        now = time.monotonic()
        if self.connection is None or (not force and now - self._checked < POLL_S):
            return
        self._checked = now
        if peer_closed(self.connection):
            self.cancel()
            raise ClientGone()


class TokenSpans:
    """When the generation thread made the first and last token of the latest finished requests."""

    def __init__(self, keep: int = KEPT_SPANS):
        self._spans: deque = deque(maxlen=keep)
        self._lock = threading.Lock()
        self.finished = 0

    def add(self, first: float, last: float, tokens: int) -> None:
        with self._lock:
            self._spans.append((first, last, tokens))
            self.finished += 1

    def snapshot(self) -> dict:
        with self._lock:
            spans, finished = list(self._spans), self.finished
        return {"clock": "monotonic", "now": time.monotonic(), "requests_finished": finished,
                "requests": [{"first_token": a, "last_token": b, "tokens": n} for a, b, n in spans]}


class _ResponseQueue(Queue):
    """A request's response queue, which hands its GenerationContext to the ticket as it passes and
    notes when the generation thread puts each token on it (`spans` gets the request's first and last
    token times once it finishes)."""

    def __init__(self, ticket: Ticket, spans: TokenSpans | None = None):
        super().__init__()
        self.ticket, self.spans = ticket, spans

    def put(self, item, block=True, timeout=None):
        if isinstance(item, mlx_server.GenerationContext):
            self.ticket.attach(item)
        elif isinstance(item, mlx_server.Response):
            ticket, now = self.ticket, time.monotonic()
            ticket.first_token = ticket.first_token or now
            ticket.last_token, ticket.tokens = now, ticket.tokens + 1
            if item.finish_reason is not None and self.spans is not None:
                self.spans.add(ticket.first_token, now, ticket.tokens)
        super().put(item, block, timeout)


class StreamingResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generator (its thread, queue, batching) with admission and cancellation: `admit`
    counts a request's prompt in the caller's thread and checks it against the context limit;
    a request whose client left is dropped or stopped."""

    def __init__(self, model, tokenizer, cli_args: argparse.Namespace, limit: ContextLimit):
        self.tokenizer, self.limit = tokenizer, limit
        self.vocab_size = _config_value(model, "vocab_size")
        token_bytes = max_token_bytes(tokenizer)
        # two bytes of text per byte of the longest token: room for normalizers that compose characters
        self.bytes_per_token = None if token_bytes is None else 2 * token_bytes
        self.max_body_bytes = max(MIN_BODY_CAP, BODY_BYTES_PER_TOKEN * limit.tokens)
        self.model, self.spans = model, TokenSpans()
        super().__init__(StreamingModelProvider(model, tokenizer, cli_args), LRUPromptCache(cli_args.prompt_cache_size))

    def stats(self) -> dict:
        """What GET /moestream/stats answers (see the module docstring)."""
        rt = runtime_of(self.model, required=False)
        return {"model": rt.stats() if rt is not None else None, **self.spans.snapshot()}

    # -- the handler's side

    def admit(self, request, chat_template_kwargs, body_bytes: int, max_tokens: int) -> tuple[int, int]:
        """(prompt tokens, max_tokens capped to what the context leaves), or a RequestError. The
        prompt is tokenized as the generation thread would (mlx-lm's `_tokenize`), and kept on the
        request's ticket for it."""
        limit, what = self.limit, "messages" if request.request_type == "chat" else "prompt"
        args = SimpleNamespace(chat_template_kwargs=chat_template_kwargs)

        def too_long(count: str):
            return RequestError(
                f"This model's maximum context length is {limit.tokens} tokens ({limit.describe()}). However, "
                f"your {what} resulted in {count}. Please reduce the length of the {what}.",
                param=what, code="context_length_exceeded")

        try:
            if self.bytes_per_token and body_bytes > limit.tokens * self.bytes_per_token:
                n_bytes = len(self._render(request, args).encode("utf-8", "surrogatepass"))
                least = math.ceil(n_bytes / self.bytes_per_token)
                if least >= limit.tokens:  # refused without tokenizing it
                    raise too_long(f"at least {least} tokens ({n_bytes} bytes of text)")
            tokenized = super()._tokenize(self.tokenizer, request, args)
        except RequestError:
            raise
        except Exception as e:  # the template or the tokenizer refused these messages
            raise RequestError(f"The {what} could not be turned into a prompt: {type(e).__name__}: {e}",
                               param=what, code="invalid_prompt") from e
        n = len(tokenized[0])
        if n >= limit.tokens:
            raise too_long(f"{n} tokens, which leaves no room for the completion")
        request.moestream_ticket.tokenized = tokenized
        return n, min(max_tokens, limit.tokens - n)

    def _render(self, request, args) -> str:
        """The prompt's text, before tokenization (the same template call as `_tokenize`)."""
        if request.request_type != "chat":
            return request.prompt
        if not self.tokenizer.has_chat_template:
            return mlx_server.convert_chat(request.messages, request.role_mapping)
        mlx_server.process_message_content(request.messages)
        template_args = {**self.cli_args.chat_template_args, **(args.chat_template_kwargs or {})}
        return self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tools=request.tools,
                                                  **{**template_args, "tokenize": False})

    def generate(self, request, generation_args, progress_callback=None):
        """mlx-lm's `generate`, with a response queue that records the request's GenerationContext
        and waits that look at the client's connection."""
        ticket = getattr(request, "moestream_ticket", None) or Ticket()
        response_queue = _ResponseQueue(ticket, self.spans)
        if not self.generation_available():
            raise _Respond(_unavailable())
        self.requests.put((response_queue, request, generation_args))

        def _inner():
            while True:
                response = self._await(response_queue, ticket)
                if response is None:
                    break
                if isinstance(response, Exception):
                    raise response
                if isinstance(response, tuple):
                    if progress_callback is not None:
                        progress_callback(*response)
                    continue
                ticket.generated.append(getattr(response, "text", "") or "")
                yield response

        ctx = self._await(response_queue, ticket)
        if isinstance(ctx, Exception):  # the generation thread could not start this request
            raise _Respond(RequestError(f"Generation failed: {type(ctx).__name__}: {ctx}", 500,
                                        kind="server_error")) from ctx
        ctx.tool_parser = ticket.tool_parser(ctx.tool_parser, as_text=request.request_type != "chat")
        return ctx, _inner()

    def _await(self, response_queue: Queue, ticket: Ticket):
        while True:
            try:
                item = response_queue.get(timeout=POLL_S)
            except QueueEmpty:
                ticket.check(force=True)
                if not self.generation_available():
                    raise _Respond(_unavailable()) from None
                continue
            ticket.check()
            return item

    # -- the generation thread's side

    def _run_generate(self):
        """mlx-lm's generation thread, which releases its MLX state as it ends (see io/workers.py):
        a server stopped by a signal joins it just before the process exits."""
        try:
            super()._run_generate()
        finally:
            release_mlx_thread_state()

    def _tokenize(self, tokenizer, request, args):
        ticket = getattr(request, "moestream_ticket", None)
        if ticket is not None and ticket.cancelled:
            raise RequestCancelled("the client left before its request started")
        if ticket is not None and ticket.tokenized is not None and tokenizer is self.tokenizer:
            prompt, segments, segment_types, initial_state, vision = ticket.tokenized
            ticket.tokenized = None  # taken once; copies, as mlx-lm's batching edits these lists
            return list(prompt), [list(s) for s in segments], list(segment_types), initial_state, vision
        return super()._tokenize(tokenizer, request, args)


# --- the HTTP handler -------------------------------------------------------------------------


_POST_PATHS = {"/v1/completions": False, "/v1/chat/completions": True, "/chat/completions": True}


class StreamingAPIHandler(mlx_server.APIHandler):
    """mlx-lm's handler, with every request checked before mlx-lm sees it (see the module
    docstring) and every error answered in OpenAI's JSON shape."""

    response_generator: StreamingResponseGenerator

    # -- plumbing

    def send_response(self, code, message=None):
        self._status_sent = True
        super().send_response(code, message)

    def end_headers(self):
        for name, value in getattr(self, "_extra_headers", ()):
            self.send_header(name, value)
        self._extra_headers = []
        super().end_headers()

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, an unsupported method ...) in JSON too."""
        if code == 501:  # http.server's answer to a method no do_METHOD serves
            code = 405
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        short = self.responses.get(code, ("Error",))[0]
        kind = "server_error" if code >= 500 else "invalid_request_error"
        data = json.dumps(RequestError(message or short, code, kind=kind).body()).encode()
        self.send_response(code, short)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(data)

    def _guarded(self, handle) -> None:
        """Run one request: a RequestError is answered, a client that left is let go, anything else
        is logged and answered with a 500 (if nothing was sent yet); the thread lives on."""
        self._status_sent, self._extra_headers = False, []
        try:
            handle()
        except (RequestError, _Respond) as e:
            error = e.error if isinstance(e, _Respond) else e
            if self._status_sent:  # mid-stream: all that is left is to end it
                logging.error("%s %s failed after its response started: %s", self.command, self.path, error)
                self.close_connection = True
            else:
                try:
                    self._send_json(error.status, error.body())
                except _CONNECTION_ERRORS:
                    self.close_connection = True
        except (ClientGone, *_CONNECTION_ERRORS):
            logging.info("%s %s: the client left; its generation was stopped", self.command, self.path)
            self.close_connection = True
        except Exception as e:
            logging.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            if not self._status_sent:
                try:
                    self._send_json(500, RequestError(f"The server failed on this request: {type(e).__name__}: {e}",
                                                      500, kind="server_error").body())
                except OSError:
                    pass

    def generate_response(self, text, finish_reason, *args, tool_calls=None, **kwargs):
        """mlx-lm's response (or stream chunk), with tool calls that did not parse given back as text."""
        ticket = getattr(self, "_ticket", None)
        if ticket is not None:
            tokenizer = self.response_generator.tokenizer
            text, finish_reason = ticket.settle_tool_calls(
                text, finish_reason, tool_calls, self.stream, getattr(tokenizer, "tool_call_start", None) or "",
                getattr(tokenizer, "tool_call_end", None))
        return super().generate_response(text, finish_reason, *args, tool_calls=tool_calls, **kwargs)

    # -- requests

    def do_GET(self):
        self._guarded(self._get)

    def _get(self):
        if self.path == STATS_PATH:
            return self._send_json(200, self.response_generator.stats())
        if not (self.path.startswith("/v1/models") or self.path == "/health"):
            raise RequestError(f"Unknown request URL: GET {self.path}.", 404, code="unknown_url")
        super().do_GET()

    def handle_models_request(self):
        """The served model only (mlx-lm's lists its Hugging Face cache, which we never load)."""
        self._send_json(200, {"object": "list", "data": [
            {"id": self.response_generator.cli_args.model, "object": "model", "created": self.created,
             "owned_by": "moestream"}]})

    def do_POST(self):
        rfile = self.rfile
        try:
            self._guarded(self._post)
        finally:
            self.rfile = rfile  # the socket's own reader: closing it lets the connection close

    def _post(self):
        if self.path not in _POST_PATHS:
            raise RequestError(f"Unknown request URL: POST {self.path}.", 404, code="unknown_url")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("A Content-Length header is required.", 411, code="length_required")
        try:
            length = int(length)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            raise RequestError(f"Invalid Content-Length header: {length!r}.") from None
        limit = self.response_generator.max_body_bytes
        if length > limit:
            self.close_connection = True
            raise RequestError(f"The request body is {length} bytes, more than the {limit} bytes this server takes "
                               f"(its context is {self.response_generator.limit.tokens} tokens).", 413,
                               code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ClientGone()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
        body = validate_body(body, _POST_PATHS[self.path], self.response_generator.vocab_size)
        self._body_bytes = len(raw)
        self._explicit_max_tokens = "max_tokens" in body or "max_completion_tokens" in body
        data = json.dumps(body).encode()
        self.headers.replace_header("Content-Length", str(len(data)))
        self.rfile = io.BytesIO(data)  # mlx-lm's do_POST reads the body we checked
        super().do_POST()

    def handle_completion(self, request, stop_words):
        """Counts the prompt and caps max_tokens before mlx-lm queues the request."""
        generator = self.response_generator
        request.moestream_ticket = self._ticket = Ticket(self.connection)
        if not generator.generation_available():
            raise _unavailable()
        _, max_tokens = generator.admit(request, self.chat_template_kwargs, self._body_bytes, self.max_tokens)
        if max_tokens < self.max_tokens:
            if self._explicit_max_tokens:
                logging.info("max_tokens %d capped to %d: the context holds %d tokens", self.max_tokens, max_tokens,
                             generator.limit.tokens)
            self._extra_headers.append((MAX_TOKENS_HEADER, str(max_tokens)))
            self.max_tokens = max_tokens
        super().handle_completion(request, stop_words)


@dataclass
class ServerHandle:
    url: str  # e.g. http://127.0.0.1:8080 (the API is under /v1)
    model_id: str
    httpd: ThreadingHTTPServer
    generator: StreamingResponseGenerator
    thread: threading.Thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def start_server(model, tokenizer, host: str = "127.0.0.1", port: int = 0, model_id: str | None = None,
                 **mlx_options) -> ServerHandle:
    """Serve `model` (from `moestream.load`) in background threads; port 0 picks a free port.
    `mlx_options` are `mlx_lm.server`'s options (`server_args`); prefill_step_size None or absent is
    the memory plan's prefill chunk (mlx-lm's 2048 for a plan that sizes none). An address that
    cannot be listened on is a ServeError, raised before the generation thread starts."""
    model_id = model_id or served_model_id(model)
    if mlx_options.get("prefill_step_size") is None:  # the chunk the memory plan sizes, where it sizes one
        mlx_options.pop("prefill_step_size", None)
        planned = getattr(getattr(runtime_of(model, required=False), "plan", None), "prefill_tokens", None)
        if isinstance(planned, int) and planned > 0:
            mlx_options["prefill_step_size"] = planned
    cli_args = server_args(model_id, host, port, **mlx_options)
    httpd = listen(host, port, lambda *a, **kw: StreamingAPIHandler(generator, *a, system_fingerprint=fingerprint, **kw))
    try:
        fingerprint = mlx_server.get_system_fingerprint()
        generator = StreamingResponseGenerator(model, tokenizer, cli_args, context_limit(model))
    except BaseException:
        httpd.server_close()
        raise
    bound_host, bound_port = httpd.server_address[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    thread = threading.Thread(target=httpd.serve_forever, name="moestream-serve", daemon=True)
    thread.start()
    return ServerHandle(f"http://{url_host}:{bound_port}", model_id, httpd, generator, thread)


def listen(host: str, port: int, handler) -> ThreadingHTTPServer:
    """A threading HTTP server bound to host:port, or a ServeError that says in one line why not."""
    import errno

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"cannot listen on {where}: a port is a number from 0 to 65535 (0: any free port)")
    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"cannot listen on {where}: the host {host!r} does not resolve "
                         f"({getattr(e, 'strerror', None) or e})") from None
    server_class = type("HTTPServer", (ThreadingHTTPServer,), {"address_family": family})
    try:
        return server_class(address[:2], handler)
    except OSError as e:
        reasons = {
            errno.EADDRINUSE: "the port is in use (another server is listening there: stop it, choose another "
                              "--port, or --port 0 for any free one)",
            errno.EADDRNOTAVAIL: "that address is not one of this machine's (--host 127.0.0.1 or 0.0.0.0 are)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }
        raise ServeError(f"cannot listen on {where}: {reasons.get(e.errno, e.strerror or str(e))}") from None


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None,
          log_level: str = "INFO", **mlx_options) -> None:
    """Serve until Ctrl-C or SIGTERM (`moestream serve`): the model from `moestream.load`, on
    host:port, with `mlx_lm.server`'s options (`server_args`). Either signal stops it the same way:
    the listener closes, the generation in flight ends, the exit code is 0 (a service manager's stop
    is a SIGTERM)."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s - %(levelname)s - %(message)s")
    handle = start_server(model, tokenizer, host, port, model_id=model_id, **mlx_options)
    plan, limit = runtime_of(model).plan, handle.generator.limit
    print(f"moestream serve: {handle.url}/v1 (OpenAI API; model id {handle.model_id})\n"
          f"memory budget {fmt_bytes(plan.budget_bytes)} (expert cache {fmt_bytes(plan.decode_cache_bytes)} while "
          f"decoding, {fmt_bytes(plan.cache_bytes)} during a long prompt's prefill; resident "
          f"{fmt_bytes(plan.resident_bytes)}); context {limit.tokens} tokens per request "
          f"({limit.describe()}); Ctrl-C stops", flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        while handle.thread.is_alive():
            handle.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        handle.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the way Ctrl-C stops the server
