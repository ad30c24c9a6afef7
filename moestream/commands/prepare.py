"""Turn a Hugging Face checkpoint (Hub repo id or folder) into a verified bundle: low-bit experts
packed into aligned extents for large contiguous reads, everything else at source precision.
Runs as a Prefect flow (retries, resume, Dask, the Prefect UI when PREFECT_API_URL is set) or,
with --engine plain, as the same steps in this process. A rerun resumes where a stopped one left."""

EXAMPLES = """examples:
  moestream prepare Qwen/Qwen3-30B-A3B --out bundles/q3
  moestream prepare Qwen/Qwen3-30B-A3B --out bundles/q3 --expert-bits 3 --drop-source-shards
  moestream prepare ./my-checkpoint --out bundles/mine --profile --engine plain
  moestream prepare ./my-checkpoint --out bundles/mine --expert-bits auto --size-budget 12GB"""


def add_arguments(p) -> None:
    from .options import positive_int

    p.add_argument("source", help="Hugging Face repo id (ORG/NAME) or local checkpoint folder")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--expert-bits", default=None, choices=("2", "3", "4", "8", "16", "source", "auto"),
                   help="16: source precision; source: as a quantized checkpoint stores them (MLX codes, MXFP4; fp8 is "
                        "dequantized); auto: a measured per-expert plan under --size-budget (default: source for a "
                        "quantized checkpoint, else 4)")
    p.add_argument("--size-budget", default=None, help="with --expert-bits auto: bytes of experts, e.g. 300MB")
    p.add_argument("--bits-plan", default=None, help="a plan file {\"bits\": {\"LAYER:EXPERT\": BITS}}")
    p.add_argument("--calibration", default=None,
                   help="calibration text (file, folder of *.txt, or Hub dataset) for --profile and --expert-bits auto "
                        "(default: the shipped set)")
    p.add_argument("--profile", action="store_true",
                   help="profile expert co-activation on calibration text; order experts by it; ship profile/")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="quantization group size")
    p.add_argument("--resident-bits", type=int, default=None, choices=(8,),
                   help="quantize resident Linear weights too (default: source precision)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the source")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--engine", choices=("prefect", "plain"), default="prefect",
                   help="prefect: the flow (retries, resume, artifacts, Dask); plain: the same steps in-process")
    p.add_argument("--dask", default=None, metavar="ADDRESS", help="run the per-layer tasks on this Dask scheduler")
    p.add_argument("--workers", type=positive_int, default=None, help="run them on a local Dask cluster of N processes")
    p.add_argument("--drop-source-shards", action="store_true",
                   help="a Hub repo id: delete each downloaded shard from the HF cache once every tensor in it is "
                        "used, so that peak disk is the bundle plus a few shards (a rerun downloads what it lacks)")


def run(args) -> None:
    import json

    import moestream

    options = dict(expert_bits=args.expert_bits, group_size=args.group_size, resident_bits=args.resident_bits,
                   revision=args.revision, bits_plan=args.bits_plan, size_budget=args.size_budget,
                   calibration=args.calibration, profile=args.profile, overwrite=args.overwrite,
                   workers=args.workers, dask_address=args.dask, drop_source_shards=args.drop_source_shards)
    progress = None
    if args.engine == "plain":
        def progress(step, done, total):
            if step == "pack-layer":
                print(f"layer {done} of {total} packed", flush=True)

    result = moestream.prepare(args.source, args.out, engine=args.engine, progress=progress, **options)
    print(json.dumps(result.summary(), indent=2))
