"""End-to-end streaming benchmark at real read sizes, fully disclosed.

synth (Qwen3.5-397B-A17B layer shapes by default) -> prepare (the stages, no Prefect) -> the disk's
O_DIRECT ceiling over the bundle's own files at its read size -> decode with a memory budget well
under the expert bytes, cold then warm -> per-layer phase timings -> the figure scaled to the full
model's layer count (labelled as scaled) -> mlx-lm fully in memory on the same weights, for scale.

    python bench/stream_e2e.py --workdir /tmp/e2e --family qwen3_5_moe --preset a397b --layers 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


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
    ap.add_argument("--compare", default="", help="also (comma list): buffered, prefetch, host, stage, nostage, policy:NAME, threads:N")
    ap.add_argument("--io-threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from moestream.runtime.bench import _timed, bench_bundle, print_report
    from moestream.stages.sequential import prepare_sequential
    from moestream.stages.synth import synth_checkpoint

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, bundle_path = work / f"{args.family}-{args.preset}", work / f"{args.family}-{args.preset}-bundle"
    report = {"script_args": vars(args)}
    if not bundle_path.exists():
        if not src.exists():
            r, report["synth_s"] = _timed(synth_checkpoint, args.family, src, preset=args.preset, layers=args.layers)
            print(f"synth: {r.total_bytes / 1e9:.2f} GB in {report['synth_s']:.1f}s", flush=True)
        _, report["prepare_s"] = _timed(prepare_sequential, src, bundle_path, args.bits, 64)
        print(f"prepare: {report['prepare_s']:.1f}s", flush=True)
    report.update(bench_bundle(bundle_path, args.budget_fraction, args.prompt_tokens, args.gen_tokens, args.io_mode,
                               compare=tuple(c for c in args.compare.split(",") if c) + (("naive",) if args.compare_naive else ()),
                               reference_checkpoint=None if args.no_reference or not src.exists() else src,
                               full_layers=args.full_layers, bits=args.bits,
                               load_kwargs={"io_threads": args.io_threads} if args.io_threads else None))
    if args.delete_source and src.exists():
        shutil.rmtree(src)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
