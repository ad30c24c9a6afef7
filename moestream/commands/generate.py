"""Generate text from a prompt, streaming the routed experts from disk inside a memory budget.
The prompt goes through the model's chat template unless told otherwise; the last line reports
tokens/s, time to first token, bytes read and the expert cache's hit rate."""

EXAMPLES = """examples:
  moestream generate bundles/q3 --prompt "Hello" --memory-budget 8GB
  moestream generate me/Qwen3-30B-A3B-moestream-4bit --prompt "Hello" --experts-per-token 4"""


def add_arguments(p) -> None:
    from .options import add_runtime_options, positive_int

    add_runtime_options(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as it is")
    p.add_argument("--stats-json", default=None, help="write the run's figures to this file")
    add_sampling_options(p, positive_int)


def add_sampling_options(p, positive_int) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=256, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def run(args) -> None:
    from moestream.runtime.frontends.generate import format_prompt, generate_text

    from .options import load_model, write_json

    model, tokenizer = load_model(args)
    prompt = format_prompt(tokenizer, args.prompt, not args.ignore_chat_template)
    _, report = generate_text(model, tokenizer, prompt, max_tokens=args.max_tokens, temp=args.temp,
                              top_p=args.top_p, seed=args.seed)
    print()
    print(report.line())
    if args.stats_json:
        write_json(args.stats_json, report.as_dict())
