"""Describe a bundle without loading it: family, experts, bits, sizes, bytes read per token."""

EXAMPLES = """examples:
  moestream inspect bundles/q3
  moestream inspect bundles/q3 --json"""


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def run(args) -> None:
    import json

    from moestream.manifests.describe import describe_bundle

    info = describe_bundle(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:>24}: {value}")
