"""Serve a model over HTTP with an OpenAI-compatible API (mlx-lm's server: chat and text
completions, streaming, tool calling), streaming the routed experts from disk inside a memory
budget. Prompts longer than the context the budget reserves are refused with a 400."""

EXAMPLES = """examples:
  moestream serve bundles/q3 --memory-budget 8GB --port 8080
  curl localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'"""


def add_arguments(p) -> None:
    from .options import add_runtime_options

    add_runtime_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")


def run(args) -> None:
    from moestream.runtime.frontends.serve import serve

    from .options import load_model

    model, tokenizer = load_model(args)
    serve(model, tokenizer, args.host, args.port)
