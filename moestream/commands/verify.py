"""Check a bundle as `moestream.load` would, and more: its structure (the validation gate), every
checksum, the model built from it, its resident weights, the tokenizer and the chat template.
The exit code says the result: 0 when everything holds, 2 with one line naming what does not."""

EXAMPLES = """examples:
  moestream verify bundles/q3
  moestream verify me/Qwen3-30B-A3B-moestream-4bit     # a Hub bundle: downloaded, then checked"""


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle folder or Hub repo id of a bundle")


def run(args) -> None:
    import moestream

    with moestream.load(args.bundle, verify=True, dtype="source"):
        pass
    print(f"{args.bundle}: OK (structure, every checksum, resident weights, tokenizer and chat template)")
