"""Record which experts fire, and which fire together, on calibration text: a routing trace and
frequency, co-activation, reuse and transition tables (Parquet), with heatmaps (PNG)."""

EXAMPLES = """examples:
  moestream profile ./source-checkpoint --out prof/
  moestream profile ./source-checkpoint --out prof/ --calibration my-text/ --max-tokens 65536"""


def add_arguments(p) -> None:
    from .options import positive_int

    p.add_argument("source", help="source checkpoint folder (or a bundle)")
    p.add_argument("--calibration", default=None,
                   help="text file, folder of *.txt, or Hub dataset (default: the shipped set)")
    p.add_argument("--out", required=True, help="folder for the tables and heatmaps")
    p.add_argument("--max-tokens", type=positive_int, default=16384, help="calibration tokens to profile")


def run(args) -> None:
    import json

    from moestream.stages.profile import profile_model

    result = profile_model(args.source, args.calibration, args.out, args.max_tokens)
    print(json.dumps(result.summary, indent=2))
    print(f"wrote {args.out}: trace, frequency, co-activation, reuse, transitions (Parquet) and heatmaps (PNG)")
