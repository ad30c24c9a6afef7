"""A fully disclosed decode benchmark of one bundle: the disk's read ceiling, cold and warm
tokens/s inside a memory budget, per-layer timings, the roofline (ceiling / bytes missed per
token) and the share of it achieved, and optional comparisons. It prints figures; it asserts none."""

EXAMPLES = """examples:
  moestream bench bundles/q3
  moestream bench bundles/q3 --compare naive,buffered,policy:lfu --json bench.json --plot bench.png
  moestream bench bundles/q3 --reference ./source-checkpoint     # also mlx-lm fully in memory
  moestream bench bundles/q3 --io-only --trace prof/trace.parquet   # the I/O engine alone"""


def add_arguments(p) -> None:
    from .options import CACHE_POLICIES, positive_int

    p.add_argument("bundle", help="bundle folder or Hub repo id of a bundle")
    p.add_argument("--revision", default=None, help="Hub revision of ORG/NAME")
    p.add_argument("--budget-fraction", type=float, default=0.25, help="expert cache as a share of the expert bytes")
    p.add_argument("--prompt-tokens", type=positive_int, default=16, help="prompt length (random token ids)")
    p.add_argument("--gen-tokens", type=positive_int, default=32, help="tokens to decode, greedy")
    p.add_argument("--io-mode", choices=("direct", "buffered"), default="direct", help="how experts are read")
    p.add_argument("--compare", default="", help="comma list, each run cold and warm: naive, prefetch, buffered "
                   "(the OS page cache on equal memory: see --page-cache; buffered:cache etc. per run), host (read into host buffers + copy), "
                   "stage / nostage (GPU staging copy), nocheck (no per-read checksum), fixedcache (the expert cache "
                   "keeps its prefill-time size while decoding too, instead of borrowing the prefill's room), default "
                   "(the first run again), policy:NAME, threads:N, plainprefill (each prefill group read, then computed, and cached "
                   "like the decode's: the runtime before prefill overlapped), readsahead:N (prefill group reads in flight "
                   "at once; 1: one at a time), readfirst / noreadfirst (a long prefill call's first group read before its routing, "
                   "while the attention before it computes, or not; on by default), subread:MIB (a checked extent read in sub-reads of MIB MiB; "
                   "default 1), order:shares|pieces|shuffled (how a read call's bytes are shared among the reader's threads: one "
                   "contiguous share each, the default, or 1 MiB pieces taken in turn, in layout order or shuffled), depth:N (at most "
                   "N reads in the disk at once, spare threads taking the slot of one that checks what it read: "
                   "threads:8+depth:4), "
                   "admission:recent|free|all|tail|none (what a "
                   "prefill caches of what it reads); entries joined by + run together (readfirst+subread:8)")
    p.add_argument("--streams", type=positive_int, default=1,
                   help="also decode this many streams at once (mlx-lm's batching, as the server does): aggregate "
                        "and per-stream tok/s, the batch roofline, how many experts the streams shared; with each --compare "
                        "entry too, and summed up by entry")
    p.add_argument("--page-cache", choices=("equal", "cache", "all"), default="equal",
                   help="for --compare buffered, the OS page cache's memory (the machine's other memory is held): "
                        "equal, the same total as the budget (the expert cache and the room for long prefill "
                        "chunks); cache, only what the budget gives the expert cache; all, every free byte. "
                        "buffered:MODE in --compare picks it per run")
    p.add_argument("--ceiling-seconds", type=float, default=3.0,
                   help="how long each cell (thread count, read size, random or in sequence) of the disk's "
                        "read ceiling reads, in four windows taking turns with the other cells'")
    p.add_argument("--io-threads", type=positive_int, default=None, help="reader threads (default: the runtime's)")
    p.add_argument("--reference", default=None,
                   help="source checkpoint: also run mlx-lm fully in memory, experts quantized like the bundle")
    p.add_argument("--full-layers", type=positive_int, default=None,
                   help="also scale the figure to this many layers (labelled as scaled)")
    p.add_argument("--json", default=None, help="write the whole report to this file")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s against the roofline")
    p.add_argument("--io-only", action="store_true", help="replay --trace through cache and reader, no compute")
    p.add_argument("--trace", default=None, help="routing trace for --io-only (trace.parquet of `moestream profile`)")
    p.add_argument("--cache-policy", default="lru", choices=CACHE_POLICIES, help="with --io-only: the cache policy")


def run(args) -> None:
    from moestream.runtime.io.hub import resolve_bundle
    from moestream.runtime.measure.bench import bench_bundle
    from moestream.runtime.measure.report import plot_report, print_report

    from .options import write_json

    if args.io_only:
        return _io_only(args)
    compare = tuple(c for c in (args.compare or "").split(",") if c)
    report = bench_bundle(resolve_bundle(args.bundle, revision=args.revision), args.budget_fraction,
                          args.prompt_tokens, args.gen_tokens, io={"mode": args.io_mode, "threads": args.io_threads},
                          compare=compare, reference_checkpoint=args.reference, full_layers=args.full_layers,
                          page_cache=args.page_cache, streams=args.streams, ceiling_seconds=args.ceiling_seconds)
    print_report(report)
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot_report(report, args.plot)


def _io_only(args) -> None:
    """Replay a routing trace through the real cache and reader, no compute: the I/O engine
    against the disk's ceiling, measurable on machines whose matmuls are slow."""
    from moestream.common.errors import OptionsError
    from moestream.manifests.open import open_bundle
    from moestream.runtime.io.reader import default_threads
    from moestream.runtime.measure.ceiling import read_ceiling
    from moestream.runtime.measure.replay import format_table, replay

    from .options import write_json

    if not args.trace:
        raise OptionsError("--io-only needs --trace (trace.parquet from `moestream profile`)")
    bundle = open_bundle(args.bundle)
    extents = list(bundle.extents.values())
    files = sorted({bundle.path(e.file) for e in extents})
    ceiling = read_ceiling(files, sum(e.nbytes for e in extents) // len(extents), default_threads())
    rows = replay(args.bundle, args.trace, budgets=[args.budget_fraction], policies=[args.cache_policy],
                  io_mode=args.io_mode)
    for row in rows:
        row["ceiling_gb_per_s"] = ceiling["gb_per_s"]
    print(f"ceiling: {ceiling['gb_per_s']:.2f} GB/s (O_DIRECT, {ceiling['chunk_bytes'] / 1e6:.2f} MB reads, "
          f"{ceiling['threads']} threads)")
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"ceiling": ceiling, "rows": rows})
