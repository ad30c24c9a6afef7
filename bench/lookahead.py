"""Router lookahead accuracy: predict layer l+1's experts from layer l's MoE input with layer l+1's
router (what `load(prefetch=True)` reads ahead), on held-out text: recall, and wasted reads per
useful one (runtime.measure.lookahead). `moestream bench --compare prefetch` measures what it buys.

    python bench/lookahead.py BUNDLE_OR_CHECKPOINT TEXT_FILE [--tokens 4096] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import moestream
    from moestream.runtime.measure.lookahead import measure_lookahead

    with moestream.load(args.model) as (model, tokenizer):
        ids = tokenizer.encode(Path(args.text).read_text())[: args.tokens]
        result = {"model": args.model, "text": args.text, "tokens": len(ids), **measure_lookahead(model, ids).as_dict()}
    print(json.dumps(result, indent=2))
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
