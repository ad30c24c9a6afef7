"""End-to-end streaming benchmark at real read sizes, fully disclosed (the lent H200's figures).

synth (Qwen3.5-397B-A17B layer shapes by default) -> prepare (in process, no Prefect) -> `moestream
bench`'s run (runtime.measure.bench.bench_bundle): decode under a memory budget well under the expert
bytes, cold then warm, the disk's O_DIRECT ceiling over the bundle's own files at its read sizes,
per-layer phase timings, the figure scaled to the full model's layer count (labelled as scaled),
the comparisons asked for, and mlx-lm fully in memory on the same weights, for scale.

    python bench/stream_e2e.py --workdir /tmp/e2e --family qwen3_5_moe --preset a397b --layers 2 \\
        --gen-tokens 32 --compare-naive --compare host,prefetch --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import sys

import common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moestream-e2e")
    ap.add_argument("--family", default="qwen3_5_moe")
    ap.add_argument("--preset", default="a397b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget-fraction", type=float, default=0.25, help="expert cache as a share of the expert bytes")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--io-mode", default="direct")
    ap.add_argument("--full-layers", type=int, default=60, help="layer count of the real model, for the scaled figure")
    ap.add_argument("--delete-source", action="store_true", help="delete the synth checkpoint once the bundle is made")
    ap.add_argument("--no-reference", action="store_true", help="skip mlx-lm fully in memory")
    ap.add_argument("--compare-naive", action="store_true", help="also run the naive loader baseline")
    ap.add_argument("--compare", default="", help="also (comma list): buffered, prefetch, host, stage, nostage, "
                    "noadvice, policy:NAME, threads:N, plainprefill, admission:recent|free|all|tail|none")
    ap.add_argument("--io-threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from moestream.runtime.measure.bench import bench_bundle
    from moestream.runtime.measure.report import print_report

    inputs = common.make_inputs(args.workdir, args.family, args.preset, args.layers, args.bits)
    compare = tuple(c for c in args.compare.split(",") if c) + (("naive",) if args.compare_naive else ())
    report = {"script_args": vars(args), **inputs.made_s}
    report.update(bench_bundle(inputs.bundle, args.budget_fraction, args.prompt_tokens, args.gen_tokens,
                               io={"mode": args.io_mode, "threads": args.io_threads}, compare=compare,
                               reference_checkpoint=None if args.no_reference or not inputs.source.exists() else inputs.source,
                               full_layers=args.full_layers))
    if args.delete_source:
        shutil.rmtree(inputs.source, ignore_errors=True)
    print_report(report)
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
