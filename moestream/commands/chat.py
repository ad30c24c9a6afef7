"""Chat with a model in the terminal (its chat template, multi-turn), streaming the routed experts
from disk inside a memory budget."""

EXAMPLES = """examples:
  moestream chat bundles/q3 --memory-budget 8GB"""


def add_arguments(p) -> None:
    from .generate import add_sampling_options
    from .options import add_runtime_options, positive_int

    add_runtime_options(p)
    add_sampling_options(p, positive_int)


def run(args) -> None:
    from moestream.runtime.frontends.chat import chat_loop

    from .options import load_model

    model, tokenizer = load_model(args)
    chat_loop(model, tokenizer, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed)
