"""Turn a Hugging Face checkpoint (Hub repo id or folder) into a verified bundle: low-bit experts
packed into aligned extents for large contiguous reads, everything else at source precision.
Runs as a Prefect flow (retries, resume, Dask, the Prefect UI when PREFECT_API_URL is set) or,
with --engine plain, as the same steps in this process. A rerun resumes where a stopped one left.
Progress goes to stderr (one line redrawn on a terminal); the summary, and what to run next, to
stdout (--json: the summary as JSON). Ctrl-C stops at once, keeping the finished layers."""

import os
import signal
import sys
from contextlib import contextmanager

EXAMPLES = """examples:
  moestream prepare Qwen/Qwen3-30B-A3B --out bundles/q3
  moestream prepare Qwen/Qwen3-30B-A3B --out bundles/q3 --expert-bits 3 --drop-source-shards
  moestream prepare ./my-checkpoint --out bundles/mine --profile --engine plain
  moestream prepare ./my-checkpoint --out bundles/mine --expert-bits auto --size-budget 12GB
  moestream prepare ./my-checkpoint --out bundles/mine --json --log-file prefect.log > summary.json"""

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT

# Set before Prefect is imported (it reads them then), for this process and those it starts (the
# embedded server, Dask workers). Prefect's console handlers print every task run, the server's
# start and stop and a docs link; the progress line says that better. Its API handler is left as it
# is, so a Prefect server's UI still shows every log line. DO_NOT_TRACK turns off Prefect's SDK
# telemetry, whose first-run notice would print too (the server's is off already: flows/__init__.py).
QUIET_PREFECT = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL": "CRITICAL",  # prefect._internal's own handler (its services' errors)
    "DO_NOT_TRACK": "1",
    # Dask workers log their own warnings (a task cancelled by Ctrl-C); their errors still show
    "DASK_LOGGING__DISTRIBUTED": "error",
}


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
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON (bundle folder, layout, bytes, peak disk) instead of text")
    p.add_argument("--verbose", action="store_true",
                   help="show Prefect's own log lines (task runs, its server) on the terminal, and progress as plain lines")
    p.add_argument("--log-file", default=None, metavar="FILE",
                   help="append the Prefect log lines of this process to FILE (they stay off the terminal)")


def run(args) -> int | None:
    import json

    import moestream
    from moestream.progress import PrepareProgress

    options = dict(expert_bits=args.expert_bits, group_size=args.group_size, resident_bits=args.resident_bits,
                   revision=args.revision, bits_plan=args.bits_plan, size_budget=args.size_budget,
                   calibration=args.calibration, profile=args.profile, overwrite=args.overwrite,
                   workers=args.workers, dask_address=args.dask, drop_source_shards=args.drop_source_shards)
    if args.engine == "prefect":
        quiet_prefect(args.verbose, args.log_file)
    # with Prefect's lines on the terminal a redrawn line would be torn apart: plain lines then
    with PrepareProgress(args.out, tty=False if args.verbose else None) as progress:
        try:
            with interrupts(lambda: _stop(args.engine, progress)):
                result = moestream.prepare(args.source, args.out, engine=args.engine, progress=progress, **options)
        except KeyboardInterrupt:  # the plain engine, stopped between two Python lines
            print(progress.interrupted(), file=sys.stderr, flush=True)
            return INTERRUPTED
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(summary_text(result, args.out, _budget(result.bundle)))


@contextmanager
def interrupts(first):
    """While the run lasts, Ctrl-C calls `first` (which ends the run); a second Ctrl-C, should
    `first` take its time, ends the process at once."""
    import threading

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, lambda *_: os._exit(INTERRUPTED))
        first()

    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(engine: str, progress) -> None:
    """Ctrl-C. The plain engine stops where it is (an exception: files being written are removed).
    With Prefect, a KeyboardInterrupt would reach its engine, which reports the crash to a server
    that got the same Ctrl-C and retries for minutes, while task threads finish their layers: the
    run is abandoned instead (finished layers are on disk; a rerun resumes) and the process ends."""
    if engine == "plain":
        raise KeyboardInterrupt
    flows = sys.modules.get("moestream.flows.prepare")  # not imported yet: no server or flow run to stop
    if getattr(flows, "stop_now", None) is not None:
        flows.stop_now()
    print(progress.interrupted(), file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def quiet_prefect(verbose: bool, log_file: str | None) -> None:
    """Prefect's log lines off the terminal unless --verbose (see QUIET_PREFECT); with a log file,
    into it (Prefect's own format)."""
    if not verbose:
        for name, value in QUIET_PREFECT.items():
            os.environ.setdefault(name, value)  # what the user set wins
    if log_file:
        log_prefect_to(log_file)


def log_prefect_to(path: str) -> None:
    import logging

    import prefect.main  # noqa: F401 - configures Prefect's logging, which would drop a handler added before
    from prefect.logging.handlers import PrefectConsoleHandler

    handler = logging.FileHandler(path, encoding="utf-8")
    root = logging.getLogger()
    formats = [h.formatter for h in root.handlers if isinstance(h, PrefectConsoleHandler) and h.formatter]
    handler.setFormatter(formats[0] if formats else logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    for name in ("", "prefect._internal"):  # the latter does not propagate to the root
        logging.getLogger(name).addHandler(handler)


def _budget(bundle) -> int | None:
    """A memory budget to suggest: an expert cache of a quarter of the experts (None if it cannot be planned)."""
    import moestream
    from moestream.common.errors import MoestreamError

    try:
        return moestream.plan_memory(bundle, expert_cache_share=0.25).budget_bytes
    except MoestreamError:
        return None


def summary_text(result, out: str, budget: int | None) -> str:
    """What was made, in human units, and what to run next."""
    import shlex

    from moestream.common.units import fmt_bytes
    from moestream.progress import fmt_duration

    meta = result.meta
    e, layout, resident = meta["experts"], meta["layout"], meta["resident"]
    size = sum(f["nbytes"] for f in meta.get("files", {}).values())
    peak = f", peak disk {fmt_bytes(result.peak_disk_bytes)}" if result.peak_disk_bytes else ""
    where = shlex.quote(str(out))
    memory = f" --memory-budget {budget_arg(budget)}" if budget else ""
    resident_bits = f"{resident['bits']}-bit" if resident["bits"] else "at source precision"
    return "\n".join([
        f"bundle ready: {out} ({fmt_bytes(size)}: experts {fmt_bytes(layout['expert_bytes'])}, "
        f"resident {fmt_bytes(resident['nbytes'])})",
        f"  {meta['family']}: {e['num_moe_layers']} MoE layers x {e['num_experts']} experts, top-{e['experts_per_token']}",
        f"  experts {_bits(e)}; resident weights {resident_bits}",
        f"  {fmt_bytes(layout['expert_bytes_per_token'])} of experts read per token when none is cached",
        f"  prepared in {fmt_duration(result.seconds)} ({result.engine} engine){peak}",
        "next:",
        f"  moestream generate {where} --prompt \"Hello\"{memory}",
        f"  moestream inspect {where}",
    ])


def _bits(experts: dict) -> str:
    bits, used, group, mode = experts["bits"], experts["bits_used"], experts["group_size"], experts.get("mode")
    if bits == 16:
        return "at source precision (16-bit)"
    text = f"{'/'.join(map(str, used))}-bit per expert" if bits == "mixed" else f"{bits}-bit"
    kind = f" {mode}" if mode and mode not in ("affine", "mixed") else ""
    return f"{text}{kind} (group size {group})"


def budget_arg(n: int) -> str:
    """A byte count as a user types it ("169MB", "8.21GB"): three significant digits, rounded up so
    that it is never below `n`."""
    import math

    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            value = n / size
            scale = 10 ** max(0, 2 - int(math.log10(value)))
            return f"{math.ceil(value * scale) / scale:g}{unit}"
    return str(n)
