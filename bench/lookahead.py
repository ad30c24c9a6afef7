"""Router lookahead accuracy: predict layer l+1's experts from layer l's MoE input with layer l+1's
router, on held-out text; recall and wasted reads per useful one.

    python bench/lookahead.py BUNDLE_OR_CHECKPOINT TEXT_FILE [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    import moestream
    from moestream.runtime.lookahead import measure_lookahead

    model, tokenizer = moestream.load(a.model)
    ids = tokenizer.encode(open(a.text).read())[: a.tokens]
    stats = measure_lookahead(model, ids)
    print(json.dumps({"tokens": len(ids), **stats.as_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
