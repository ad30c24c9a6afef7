"""Generate text from a prompt, streaming the routed experts from disk inside a memory budget.
The prompt (`-` reads it from stdin) goes through the model's chat template with the system prompt
and the tools (--tools FILE, OpenAI-style schemas) unless told otherwise, as mlx_lm.generate does;
tool calls in the reply are listed after it, and the last line reports tokens/s, time to first
token, bytes read and the expert cache's hit rate."""

EXAMPLES = """examples:
  moestream generate bundles/q3 --prompt "Hello" --memory-budget 8GB
  moestream generate me/Qwen3-30B-A3B-moestream-4bit --prompt "Hello" --experts-per-token 4
  cat question.txt | moestream generate bundles/q3 --prompt - --system-prompt "Answer briefly."
  moestream generate bundles/q3 --prompt "Weather in Paris?" --tools tools.json"""


def add_arguments(p) -> None:
    from .options import add_prompt_options, add_runtime_options, positive_int

    add_runtime_options(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message; '-' reads it from stdin")
    add_prompt_options(p)
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as it is")
    p.add_argument("--stats-json", default=None, help="write the run's figures to this file")
    add_sampling_options(p, positive_int)


def add_sampling_options(p, positive_int) -> None:
    p.add_argument("--max-tokens", "-m", type=positive_int, default=256, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def generation_options(generate_text, args) -> dict:
    """Keywords for `generate_text` beyond the sampling ones: `prefill_step_size` where this
    version of it takes one (None: the memory plan decides)."""
    import inspect
    import sys

    if "prefill_step_size" in inspect.signature(generate_text).parameters:
        return {"prefill_step_size": args.prefill_step_size}
    if args.prefill_step_size is not None:
        print("moestream generate: warning: --prefill-step-size is not supported by this version's generate_text; "
              "ignored", file=sys.stderr)
    return {}


def run(args) -> None:
    import sys

    from moestream.runtime.frontends.generate import generate_text
    from moestream.runtime.frontends.prompt import build_prompt, describe_tool_calls, find_tool_calls, read_prompt

    from .options import load_model, prompt_settings, write_json

    settings = prompt_settings(args)  # a bad --tools file is refused before the model loads
    text = read_prompt(args.prompt)
    model, tokenizer = load_model(args)
    prompt = build_prompt(tokenizer, text, use_chat_template=not args.ignore_chat_template, **settings)
    # out: the sys.stdout of now (generate_text's default is the one of when it was imported)
    reply, report = generate_text(model, tokenizer, prompt, max_tokens=args.max_tokens, temp=args.temp,
                                  top_p=args.top_p, seed=args.seed, out=sys.stdout,
                                  **generation_options(generate_text, args))
    print()
    calls = []
    if settings["tools"]:
        found = find_tool_calls(tokenizer, reply, settings["tools"])
        calls = found.calls
        for line in describe_tool_calls(found):
            print(f"[moestream] {line}")
    print(report.line())
    if args.stats_json:
        data = report.as_dict()
        if settings["tools"]:
            data["tool_calls"] = calls
        write_json(args.stats_json, data)
