"""Chat with a model in the terminal (its chat template, multi-turn, with a system prompt and tools
as mlx_lm.chat and mlx-lm's server take them), streaming the routed experts from disk inside a
memory budget. Line editing and history (arrow keys) in a terminal; Ctrl-C stops an answer and
keeps the conversation (the part already answered stays in it); Ctrl-C or Ctrl-D at the prompt
exits. Commands: q (quit), r (reset), h (help), /stats."""

EXAMPLES = """examples:
  moestream chat bundles/q3 --memory-budget 8GB
  moestream chat bundles/q3 --system-prompt "You are terse." --tools tools.json --max-tokens 512"""


def add_arguments(p) -> None:
    from .generate import add_sampling_options
    from .options import add_prompt_options, add_runtime_options, positive_int

    add_runtime_options(p)
    add_prompt_options(p)
    add_sampling_options(p, positive_int)


def run(args) -> None:
    import sys

    from moestream.runtime.frontends.chat import chat_loop, enable_line_editing

    from .options import load_model, prompt_settings

    settings = prompt_settings(args)  # a bad --tools file is refused before the model loads
    model, tokenizer = load_model(args)
    if sys.stdin.isatty():
        enable_line_editing()
    chat_loop(model, tokenizer, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed,
              prefill_step_size=args.prefill_step_size, **settings)
