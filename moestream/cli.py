"""The `moestream` command. Each subcommand imports its code only when it runs, so
`moestream generate` starts fast and never imports the preparation pipeline (Prefect)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder, Hub repo id of a bundle (ORG/NAME), or a source checkpoint folder")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of ORG/NAME")
    p.add_argument("--memory-budget", default=None, help="e.g. 8GB: resident weights + expert cache + KV cache + buffers")
    p.add_argument("--experts-per-token", type=int, default=None, help="lower the routed top-k of every MoE layer")
    p.add_argument("--cache-policy", default="lru", choices=CACHE_POLICIES,
                   help="expert cache policy; hot, prior and lrfu need a routing profile (a bundle prepared with "
                        "--profile has one) (default: lru)")
    p.add_argument("--prefetch", action="store_true", help="read the next MoE layer's experts early, predicted by its router")
    p.add_argument("--max-kv-size", type=int, default=None, help="tokens of KV cache the budget reserves (default: 4096)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on CPU, the source dtype on GPU)")
    p.add_argument("--io-mode", choices=("direct", "buffered"), default="direct",
                   help="direct: bypass the OS page cache (honest budget); buffered: trust the OS (default: direct)")
    p.add_argument("--io-threads", type=int, default=None, help="expert reader threads (default: 8, or 2 per core if fewer)")
    p.add_argument("--verify", action="store_true", help="check every checksum before loading")


CACHE_POLICIES = ("lru", "lfu", "hot", "prior", "lrfu")


def _load(args):
    """moestream.load with the runtime options every running subcommand shares."""
    from moestream import IOOptions, load

    return load(args.bundle, memory_budget=args.memory_budget, experts_per_token=args.experts_per_token,
                cache_policy=args.cache_policy, prefetch=args.prefetch, max_kv_size=args.max_kv_size,
                dtype=args.dtype, revision=args.revision, verify=args.verify,
                io=IOOptions(mode=args.io_mode, threads=args.io_threads))


def cmd_synth(args):
    from moestream.stages.synth import synth_checkpoint

    r = synth_checkpoint(args.family, args.out, preset=args.preset, seed=args.seed, layers=args.layers)
    print(f"wrote {r.path}: {r.family} {args.preset}, {r.total_bytes / 1e6:.1f} MB ({r.expert_bytes / 1e6:.1f} MB experts)")


def cmd_prepare(args):
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


def cmd_publish(args):
    from moestream.stages.publish import publish_bundle

    result = publish_bundle(args.bundle, args.repo, private=args.private, create_pr=args.create_pr,
                            dry_run=args.dry_run, revision=args.revision, license=args.license)
    print(result.summary())


def cmd_verify(args):
    import moestream

    # everything load would reject: the gate, every checksum, then the model built, its resident
    # weights loaded, the tokenizer and the chat template
    with moestream.load(args.bundle, verify=True, dtype="source"):
        pass
    print(f"{args.bundle}: OK (structure, every checksum, resident weights, tokenizer and chat template)")


def cmd_inspect(args):
    from moestream.manifests.describe import describe_bundle

    info = describe_bundle(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:>24}: {value}")


def cmd_generate(args):
    from moestream.runtime.frontends.generate import format_prompt, generate_text

    model, tokenizer = _load(args)
    prompt = format_prompt(tokenizer, args.prompt, not args.ignore_chat_template)
    _, report = generate_text(model, tokenizer, prompt, max_tokens=args.max_tokens, temp=args.temp,
                              top_p=args.top_p, seed=args.seed)
    print()
    print(report.line())
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(report.as_dict(), f, indent=2)


def cmd_chat(args):
    from moestream.runtime.frontends.chat import chat_loop

    model, tokenizer = _load(args)
    chat_loop(model, tokenizer, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed)


def cmd_serve(args):
    from moestream.runtime.frontends.serve import serve

    model, tokenizer = _load(args)
    serve(model, tokenizer, args.host, args.port)


def cmd_bench(args):
    from moestream.runtime.io.hub import resolve_bundle
    from moestream.runtime.measure.bench import bench_bundle, plot_report, print_report

    if args.io_only:
        return _bench_io_only(args)
    compare = tuple(c for c in (args.compare or "").split(",") if c)
    report = bench_bundle(resolve_bundle(args.bundle, revision=args.revision), args.budget_fraction,
                          args.prompt_tokens, args.gen_tokens, io={"mode": args.io_mode, "threads": args.io_threads},
                          compare=compare, reference_checkpoint=args.reference, full_layers=args.full_layers)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if args.plot:
        plot_report(report, args.plot)


def cmd_eval(args):
    from pathlib import Path

    from moestream.stages.eval import evaluate, load_tool_examples

    suites = tuple(x for x in args.suite.split(",") if x)
    text = Path(args.text).read_text() if args.text else None
    tools = load_tool_examples(args.tools) if args.tools else None
    result = evaluate(args.bundle, args.reference, suites=suites, text=text, tool_examples=tools,
                      experts_per_token=args.experts_per_token, max_text_tokens=args.max_text_tokens)
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def cmd_sweep(args):
    from pathlib import Path

    from moestream.stages.eval import load_tool_examples
    from moestream.stages.sweep import markdown_table, sweep

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    rows = sweep(Path(args.source), Path(args.out), ints(args.expert_bits),
                 ints(args.experts_per_token) if args.experts_per_token else None,
                 tuple(x for x in args.suite.split(",") if x),
                 text=Path(args.text).read_text() if args.text else None,
                 tool_examples=load_tool_examples(args.tools) if args.tools else None, group_size=args.group_size)
    print(markdown_table(rows))
    print(f"wrote {args.out}/sweep.md, sweep.json, sweep.png")


def cmd_profile(args):
    from moestream.stages.profile import profile_model

    result = profile_model(args.source, args.calibration, args.out, args.max_tokens)
    print(json.dumps(result.summary, indent=2))
    print(f"wrote {args.out}: trace, frequency, co-activation, reuse, transitions (Parquet) and heatmaps (PNG)")


def cmd_replay(args):
    from moestream.runtime.measure.replay import format_table, replay

    def fraction(x: str) -> float:
        return float(x[:-1]) / 100 if x.endswith("%") else float(x)

    rows = replay(args.bundle, args.trace, budgets=[fraction(b) for b in args.budget.split(",")],
                  policies=args.policy.split(","), io_mode=args.io_mode, profile=args.profile)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)


def _bench_io_only(args):
    """Replay a routing trace through the real cache and reader, no compute: the I/O engine
    against the disk's ceiling, measurable on machines whose matmuls are slow."""
    from moestream.common.errors import OptionsError
    from moestream.manifests.open import open_bundle
    from moestream.runtime.io.reader import default_threads
    from moestream.runtime.measure.ceiling import read_ceiling
    from moestream.runtime.measure.replay import format_table, replay

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
        with open(args.json, "w") as f:
            json.dump({"ceiling": ceiling, "rows": rows}, f, indent=2, default=str)


def cmd_demo(args):
    from moestream.demo import run_demo

    run_demo(workdir=args.workdir, family=args.family, preset=args.preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moestream", description=(
        "Run Mixture-of-Experts models larger than memory: prepare a bundle once, then stream "
        "the routed experts from disk at inference."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="prepare the trained fixture MoE, then answer a tool call inside a small memory budget")
    p.add_argument("--workdir", default="moestream-demo", help="where the demo writes its model and bundle")
    p.add_argument("--family", default=None, help="synthesise a random model of this family instead of the trained fixture")
    p.add_argument("--preset", default="tiny")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write a random-weight MoE checkpoint in the Hub layout (for tests and benchmarks)")
    p.add_argument("family", help="qwen3_moe, qwen3_5_moe, mixtral, olmoe, deepseek_v3 or gpt_oss")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny", help="tiny (tests), small (CPU benchmarks), a397b (Qwen3.5-397B layer shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="number of layers (a397b: default 2)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="turn a Hub repo id or checkpoint folder into a verified bundle (Prefect flow)")
    p.add_argument("source", help="Hugging Face repo id (org/name) or local checkpoint folder")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--expert-bits", default=None, choices=("2", "3", "4", "8", "16", "source", "auto"),
                   help="16: source precision; source: as a quantized checkpoint stores them (MLX codes, MXFP4; fp8 is "
                        "dequantized); auto: a measured per-expert plan under --size-budget (default: source for a "
                        "quantized checkpoint, else 4)")
    p.add_argument("--size-budget", default=None, help="with --expert-bits auto: bytes of experts, e.g. 300MB")
    p.add_argument("--bits-plan", default=None, help="a plan file {\"bits\": {\"LAYER:EXPERT\": BITS}}")
    p.add_argument("--calibration", default=None,
                   help="calibration text (file, folder of *.txt, or Hub dataset) for --profile and --expert-bits auto")
    p.add_argument("--profile", action="store_true",
                   help="profile expert co-activation on calibration text; order experts by it; ship profile/")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--resident-bits", type=int, default=None, choices=(8,), help="quantize resident Linear weights too")
    p.add_argument("--revision", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dask", default=None, metavar="ADDRESS", help="run the per-layer tasks on this Dask scheduler")
    p.add_argument("--workers", type=int, default=None, help="run them on a local Dask cluster of N processes")
    p.add_argument("--engine", choices=("prefect", "plain"), default="prefect",
                   help="prefect: the flow (retries, resume, artifacts, Dask); plain: the same stages in-process")
    p.add_argument("--drop-source-shards", action="store_true",
                   help="a Hub repo id: delete each downloaded shard from the HF cache once every tensor in it is "
                        "used, so that peak disk is the bundle plus a few shards (a rerun downloads what it lacks)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("publish", help="verify a bundle, write its model card, upload it to the Hub in one atomic commit")
    p.add_argument("bundle")
    p.add_argument("--repo", required=True, help="ORG/NAME on the Hub (authentication: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--license", default=None)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("verify", help="check a bundle's structure and every checksum (exit code says the result)")
    p.add_argument("bundle")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="describe a bundle: family, experts, bits, bytes per token")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    for name, func, helptext in (("generate", cmd_generate, "generate text, streaming experts from disk"),
                                 ("chat", cmd_chat, "interactive multi-turn chat (chat template)")):
        p = sub.add_parser(name, help=helptext)
        _add_runtime_options(p)
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--ignore-chat-template", action="store_true")
            p.add_argument("--stats-json", default=None, help="write the run's figures to this file")
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temp", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="disclosed decode benchmark: disk ceiling, cold/warm tok/s, roofline, comparisons")
    p.add_argument("bundle")
    p.add_argument("--revision", default=None)
    p.add_argument("--budget-fraction", type=float, default=0.25, help="expert cache as a share of the expert bytes")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--io-mode", choices=("direct", "buffered"), default="direct")
    p.add_argument("--compare", default="", help="comma list, each run cold and warm: naive, buffered, prefetch, "
                   "host (read into host buffers + copy), stage / nostage (GPU staging copy), policy:NAME, threads:N")
    p.add_argument("--io-threads", type=int, default=None, help="reader threads (default: the runtime's)")
    p.add_argument("--reference", default=None, help="source checkpoint: also run mlx-lm fully in memory")
    p.add_argument("--full-layers", type=int, default=None, help="also scale the figure to this many layers (labelled)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s against the roofline")
    p.add_argument("--io-only", action="store_true", help="replay --trace through cache and reader, no compute")
    p.add_argument("--trace", default=None, help="routing trace for --io-only")
    p.add_argument("--cache-policy", default="lru")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="record which experts fire (and together) on calibration text; Parquet + PNG")
    p.add_argument("source", help="source checkpoint folder (or a bundle)")
    p.add_argument("--calibration", default=None, help="text file, folder of *.txt, or Hub dataset (default: shipped set)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("replay", help="compute-free replay of a routing trace through the real cache and reader")
    p.add_argument("bundle")
    p.add_argument("--trace", required=True, help="trace.parquet from `moestream profile`")
    p.add_argument("--budget", default="5%,10%,25%,50%", help="expert cache sizes as shares of the expert bytes")
    p.add_argument("--policy", default="lru,lfu,hot,prior,lrfu")
    p.add_argument("--profile", default=None, help="profile folder for the profile-driven policies")
    p.add_argument("--io-mode", choices=("direct", "buffered"), default="direct")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("eval", help="quality against the source: KL, top-1, perplexity, tool-call validity")
    p.add_argument("bundle")
    p.add_argument("--reference", required=True, help="the source checkpoint (run with the CheckpointStore)")
    p.add_argument("--suite", default="perplexity,kl,tools")
    p.add_argument("--text", default=None, help="held-out text file for kl/perplexity")
    p.add_argument("--tools", default=None, help="JSON lines of {messages, tools, expected} for the tools suite")
    p.add_argument("--experts-per-token", type=int, default=None)
    p.add_argument("--max-text-tokens", type=int, default=2048)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="prepare (cached) and evaluate every expert-bits x experts-per-token combination")
    p.add_argument("source", help="source checkpoint folder")
    p.add_argument("--out", required=True, help="work folder: bundles/, sweep.md, sweep.json, sweep.png")
    p.add_argument("--expert-bits", default="2,3,4,8")
    p.add_argument("--experts-per-token", default=None, help="comma list (default: the model's own)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--suite", default="perplexity,kl,tools")
    p.add_argument("--text", default=None)
    p.add_argument("--tools", default=None)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (mlx_lm.server) with streaming and tool calling")
    _add_runtime_options(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    from moestream.common.errors import MoestreamError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (MoestreamError, OSError) as e:  # expected failures: one clear line, no traceback
        if os.environ.get("MOESTREAM_DEBUG"):
            raise
        print(f"moestream {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    """The error in one line; an OSError from outside moestream with its file and cause."""
    if isinstance(e, OSError) and e.strerror and not str(e).startswith(("cannot", "[")) and e.filename:
        return f"{e.filename}: {e.strerror}"
    line = " ".join(str(e).split()) or type(e).__name__
    # a message quoting an untrusted file's value can be megabytes: one line means a readable one
    return line if len(line) <= MAX_ERROR_CHARS else f"{line[:MAX_ERROR_CHARS]}... ({len(line) - MAX_ERROR_CHARS} more characters)"


MAX_ERROR_CHARS = 2000


if __name__ == "__main__":
    sys.exit(main())
