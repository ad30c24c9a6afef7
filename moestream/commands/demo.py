"""Prepare the trained fixture MoE shipped with moestream (a 4.4M-parameter qwen3_moe trained on
Python source and tool calls) with the preparation flow, then answer a tool-calling request inside
a memory budget whose expert cache holds a quarter of the experts, and print what happened."""

EXAMPLES = """examples:
  moestream demo
  moestream demo --family mixtral --workdir /tmp/demo    # a random-weight mixtral instead"""


def add_arguments(p) -> None:
    p.add_argument("--workdir", default="moestream-demo", help="where the demo writes its model and bundle")
    p.add_argument("--family", default=None,
                   help="synthesise a random-weight model of this family instead of the trained fixture")
    p.add_argument("--preset", default="tiny", help="with --family: tiny, small or a397b")


def run(args) -> None:
    from moestream.demo import run_demo

    from .prepare import quiet_prefect

    quiet_prefect(False, None)  # the demo's own lines say what happens; Prefect's would drown them

    run_demo(workdir=args.workdir, family=args.family, preset=args.preset)
