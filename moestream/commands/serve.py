"""Serve a model over HTTP with an OpenAI-compatible API (mlx-lm's server: chat and text
completions, streaming, tool calling), streaming the routed experts from disk inside a memory
budget. Prompts longer than the context the budget reserves are refused with a 400; a tool call
the model got wrong comes back as text. mlx_lm.server's options (sampling defaults, batching,
prompt cache, chat template arguments) are taken with its defaults; the model id is the Hub repo
id or the bundle folder's name."""

EXAMPLES = """examples:
  moestream serve bundles/q3 --memory-budget 8GB --port 8080
  moestream serve me/Qwen3-30B-A3B-moestream-4bit --chat-template-args '{"enable_thinking": false}'
  curl localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'"""


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free port), got {value}")
    return value


def json_object(text: str) -> dict:
    """argparse type: a JSON object (mlx_lm.server's --chat-template-args)."""
    import argparse

    from moestream.common.errors import OptionsError
    from moestream.runtime.frontends.prompt import template_args

    try:
        return template_args(text)
    except OptionsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def byte_size(text: str) -> int:
    """argparse type: a size in bytes, e.g. 2GB or 500MB."""
    import argparse

    from moestream.common.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p) -> None:
    from .options import add_runtime_options, positive_int

    add_runtime_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port_number, default=8080, help="port to listen on (0: any free port)")
    # mlx_lm.server's own options, with its defaults
    p.add_argument("--temp", type=float, default=0.0, help="default sampling temperature of a request")
    p.add_argument("--top-p", type=float, default=1.0, help="default nucleus sampling top-p of a request")
    p.add_argument("--top-k", type=int, default=0, help="default top-k of a request (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p of a request (0: off)")
    p.add_argument("--max-tokens", type=positive_int, default=512,
                   help="default max_tokens of a request (capped to what the context leaves)")
    p.add_argument("--chat-template-args", type=json_object, default={}, metavar="JSON",
                   help="keyword arguments for the chat template, e.g. '{\"enable_thinking\": false}' (default: none)")
    p.add_argument("--decode-concurrency", type=positive_int, default=32,
                   help="requests decoded together in one batch when requests are batchable")
    p.add_argument("--prompt-concurrency", type=positive_int, default=8,
                   help="prompts prefilled together in one batch when requests are batchable")
    p.add_argument("--prefill-step-size", type=positive_int, default=None,
                   help="prompt tokens processed at a time; smaller lowers the peak memory of a long prompt "
                        "(default: the memory plan's chunk, at most mlx-lm's 2048)")
    p.add_argument("--prompt-cache-size", type=positive_int, default=10,
                   help="most distinct KV caches the prompt cache keeps between requests")
    p.add_argument("--prompt-cache-bytes", type=byte_size, default=None,
                   help="most bytes the prompt cache's KV caches hold, e.g. 2GB (default: no limit)")
    p.add_argument("--allowed-origins", type=lambda text: text.split(","), default=["*"],
                   help="comma-separated origins allowed by CORS (default: *)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                   help="logging level")


MLX_OPTIONS = ("temp", "top_p", "top_k", "min_p", "max_tokens", "chat_template_args", "decode_concurrency",
               "prompt_concurrency", "prefill_step_size", "prompt_cache_size", "prompt_cache_bytes", "allowed_origins")


def run(args) -> None:
    from moestream.runtime.frontends.serve import listen, serve, served_model_id

    from .options import load_model

    if args.port:  # a busy port is refused before a large model takes minutes to load
        listen(args.host, args.port, None).server_close()
    model, tokenizer = load_model(args)
    serve(model, tokenizer, args.host, args.port, model_id=served_model_id(model, args.bundle),
          log_level=args.log_level, **{name: getattr(args, name) for name in MLX_OPTIONS})
