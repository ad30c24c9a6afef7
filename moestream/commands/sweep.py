"""Prepare (cached) and evaluate every combination of expert bits and experts per token, and
tabulate quality against bytes read per token (sweep.md, sweep.json, sweep.png)."""

EXAMPLES = """examples:
  moestream sweep ./source-checkpoint --out sweep/
  moestream sweep ./source-checkpoint --out sweep/ --expert-bits 2,3,4,8 --experts-per-token 4,2 --text heldout.txt"""


def add_arguments(p) -> None:
    p.add_argument("source", help="source checkpoint folder")
    p.add_argument("--out", required=True, help="work folder: bundles/, sweep.md, sweep.json, sweep.png")
    p.add_argument("--expert-bits", default="2,3,4,8", help="comma list of expert bits")
    p.add_argument("--experts-per-token", default=None, help="comma list (default: the model's own)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="quantization group size")
    p.add_argument("--suite", default="perplexity,kl,tools", help="comma list of perplexity, kl, tools")
    p.add_argument("--text", default=None, help="held-out text file, needed by the kl and perplexity suites")
    p.add_argument("--tools", default=None, help="JSON lines of {messages, tools, expected}, needed by the tools suite")


def run(args) -> None:
    from pathlib import Path

    from moestream.stages.eval import load_tool_examples
    from moestream.stages.sweep import markdown_table, sweep

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    rows = sweep(Path(args.source), Path(args.out), ints(args.expert_bits),
                 ints(args.experts_per_token) if args.experts_per_token else None,
                 tuple(x for x in args.suite.split(",") if x),
                 text=Path(args.text).read_text() if args.text else None,
                 tool_examples=load_tool_examples(args.tools) if args.tools else None, group_size=args.group_size)
    print(markdown_table(rows))
    print(f"wrote {args.out}/sweep.md, sweep.json, sweep.png")
