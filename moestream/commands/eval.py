"""Measure a bundle's quality against its source checkpoint: KL divergence and top-1 agreement of
the next-token distributions, perplexity on held-out text, and tool-call validity."""

EXAMPLES = """examples:
  moestream eval bundles/q3 --reference ./source-checkpoint --text heldout.txt
  moestream eval bundles/q3 --reference ./source-checkpoint --suite tools --tools prompts.jsonl"""


def add_arguments(p) -> None:
    from .options import positive_int

    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--reference", required=True, help="the source checkpoint (run unprepared, at source precision)")
    p.add_argument("--suite", default="perplexity,kl,tools", help="comma list of perplexity, kl, tools")
    p.add_argument("--text", default=None, help="held-out text file, needed by the kl and perplexity suites")
    p.add_argument("--tools", default=None, help="JSON lines of {messages, tools, expected}, needed by the tools suite")
    p.add_argument("--experts-per-token", type=positive_int, default=None,
                   help="lower the bundle's routed top-k (default: the model's own)")
    p.add_argument("--max-text-tokens", type=positive_int, default=2048, help="held-out tokens to score at most")
    p.add_argument("--json", default=None, help="write the full result to this file")


def run(args) -> None:
    import json
    from pathlib import Path

    from moestream.stages.eval import evaluate, load_tool_examples

    from .options import write_json

    suites = tuple(x for x in args.suite.split(",") if x)
    text = Path(args.text).read_text() if args.text else None
    tools = load_tool_examples(args.tools) if args.tools else None
    result = evaluate(args.bundle, args.reference, suites=suites, text=text, tool_examples=tools,
                      experts_per_token=args.experts_per_token, max_text_tokens=args.max_text_tokens)
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=2))
    if args.json:
        write_json(args.json, result)
