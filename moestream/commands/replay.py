"""Replay a routing trace through the real expert cache and reader, without computing the model:
hit rates and bytes read per token for each cache size and policy, in seconds."""

EXAMPLES = """examples:
  moestream replay bundles/q3 --trace prof/trace.parquet
  moestream replay bundles/q3 --trace prof/trace.parquet --budget 10%,25% --policy lru,lrfu --profile prof/"""


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--trace", required=True, help="trace.parquet from `moestream profile`")
    p.add_argument("--budget", default="5%,10%,25%,50%", help="expert cache sizes as shares of the expert bytes")
    p.add_argument("--policy", default="lru,lfu,hot,prior,lrfu", help="comma list of cache policies")
    p.add_argument("--profile", default=None,
                   help="profile folder for the profile-driven policies (default: the bundle's own)")
    p.add_argument("--io-mode", choices=("direct", "buffered"), default="direct", help="how experts are read")
    p.add_argument("--json", default=None, help="write the rows to this file")


def run(args) -> None:
    from moestream.runtime.measure.replay import format_table, replay

    from .options import write_json

    def fraction(x: str) -> float:
        return float(x[:-1]) / 100 if x.endswith("%") else float(x)

    rows = replay(args.bundle, args.trace, budgets=[fraction(b) for b in args.budget.split(",")],
                  policies=args.policy.split(","), io_mode=args.io_mode, profile=args.profile)
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)
