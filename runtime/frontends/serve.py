"""`moestream serve`: mlx-lm's own OpenAI-compatible server (`mlx_lm.server`: its HTTP handler,
request queue, batching, prompt cache, streaming and tool-call parsing) serving a model that
`moestream.load` built, so that experts stream from disk.

The seam is mlx-lm's `ModelProvider`: ours hands out the already-loaded model and tokenizer for
any requested model name (the served id is the bundle path; "default_model" works as in mlx-lm).
The HTTP server is built here rather than by `mlx_lm.server.run`, which blocks and has no handle
to stop it; `start_server` runs it in a background thread and returns a handle.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from mlx_lm import server as mlx_server
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

from ...common.units import fmt_bytes
from ..model.load import runtime_of


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


class StreamingAPIHandler(mlx_server.APIHandler):
    def handle_models_request(self):
        """The served model only (mlx-lm's lists its Hugging Face cache, which we never load)."""
        body = {"object": "list", "data": [
            {"id": self.response_generator.cli_args.model, "object": "model", "created": self.created,
             "owned_by": "moestream"}]}
        data = json.dumps(body).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


@dataclass
class ServerHandle:
    url: str  # e.g. http://127.0.0.1:8080 (the API is under /v1)
    model_id: str
    httpd: ThreadingHTTPServer
    generator: mlx_server.ResponseGenerator
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
    """Serve `model` (from `moestream.load`) in background threads; port 0 picks a free port."""
    model_id = model_id or str(runtime_of(model).path.resolve())
    cli_args = server_args(model_id, host, port, **mlx_options)
    generator = mlx_server.ResponseGenerator(
        StreamingModelProvider(model, tokenizer, cli_args), LRUPromptCache(cli_args.prompt_cache_size))
    family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("HTTPServer", (ThreadingHTTPServer,), {"address_family": family})
    fingerprint = mlx_server.get_system_fingerprint()
    try:
        httpd = server_class(address[:2], lambda *a, **kw: StreamingAPIHandler(
            generator, *a, system_fingerprint=fingerprint, **kw))
    except BaseException:
        generator.stop_and_join()
        raise
    bound_host, bound_port = httpd.server_address[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    thread = threading.Thread(target=httpd.serve_forever, name="moestream-serve", daemon=True)
    thread.start()
    return ServerHandle(f"http://{url_host}:{bound_port}", model_id, httpd, generator, thread)


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None) -> None:
    """Serve until Ctrl-C (`moestream serve`): the model from `moestream.load`, on host:port."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    handle = start_server(model, tokenizer, host, port, model_id=model_id)
    plan = runtime_of(model).plan
    print(f"moestream serve: {handle.url}/v1 (OpenAI API; model id {handle.model_id})\n"
          f"memory budget {fmt_bytes(plan.budget_bytes)} (expert cache {fmt_bytes(plan.cache_bytes)}, "
          f"resident {fmt_bytes(plan.resident_bytes)}); Ctrl-C stops", flush=True)
    try:
        while handle.thread.is_alive():
            handle.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        handle.shutdown()
