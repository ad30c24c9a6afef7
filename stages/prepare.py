"""The preparation, decided once: options -> plan -> steps, run by any executor.

`PrepareOptions` is everything a user says about the bundle they want (the CLI, `moestream.prepare`,
the sweep, the demo, tests and benchmarks all build one). `make_plan` resolves it against the
source checkpoint into a `PreparePlan`: the recipe, where the bytes go, which steps run (a measured
bit plan, profiling in how many shards). `run_steps` is the one sequence of steps, each a plain
function of the plan; an executor only decides how a step runs: `InProcess` calls it, the Prefect
flow (flows/prepare.py) runs it as a task with retries, caching and Dask. So every executor makes
the same bundle by construction.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..common.errors import OptionsError, OutputExistsError
from ..common.units import parse_bytes
from ..manifests.bundle import BUNDLE_JSON, ExpertExtent
from ..manifests.checkpoint import SourceCheckpoint
from ..manifests.profile import SUMMARY_FILE
from . import shards
from .fetch import fetch_source
from .pack import LayerJob, pack_layer, staged_layer
from .quantize import EXPERT_BITS, GROUP_SIZES, ExpertRecipe
from .write import SourceInfo, finalize, staging_dir, write_bundle

ENGINES = ("prefect", "plain")
RESIDENT_BITS = (8,)
PROFILE_DIR = "profile"
PROFILE_SHARDS_DIR = "profile-shards"


@dataclass(frozen=True)
class PrepareOptions:
    """What to prepare and how. Checked when made: a bad option fails before any work.

    source: a Hugging Face repo id (org/name) or a checkpoint folder; out: the bundle folder.
    expert_bits: 2, 3, 4, 8 or 16 (source precision); "source": as the checkpoint stores them where
    MLX computes that format (MLX codes, MXFP4), else source precision (fp8 is dequantized);
    None: "source" for a quantized checkpoint, else 4; or "auto": a measured per-expert plan within
    size_budget (bytes of experts, or a string like "300MB"). bits_plan: a plan file
    ({"bits": {"LAYER:EXPERT": BITS}}) overriding expert_bits per expert. group_size: 32/64/128.
    resident_bits: 8 quantizes the resident Linear weights too (routers never). calibration: text
    for profiling and "auto" (a file, a folder of *.txt, or a Hub dataset; None: the shipped set).
    profile: True profiles expert co-activation and orders each layer's experts by it; a folder
    uses a profile made earlier. workers / dask_address: the flow's per-layer tasks (and profiling
    shards) on a local Dask cluster of N processes, or on a running scheduler. drop_source_shards
    (a Hub repo id only): delete each downloaded shard from the HF cache once every tensor in it is
    used, so that the source and the bundle need not fit on the disk together.
    """

    source: str
    out: Path
    expert_bits: int | str | None = None
    group_size: int = 64
    resident_bits: int | None = None
    revision: str | None = None
    bits_plan: Path | None = None
    size_budget: int | str | None = None
    calibration: str | None = None
    profile: bool | Path = False
    profile_tokens: int = 16384
    overwrite: bool = False
    workers: int | None = None
    dask_address: str | None = None
    drop_source_shards: bool = False

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("source", str(self.source))
        put("out", Path(self.out).absolute())
        bits = self.expert_bits
        if isinstance(bits, str) and bits.isdigit():
            bits = int(bits)
        if bits not in (None, "auto", *EXPERT_BITS):
            raise OptionsError(f"expert bits must be one of {', '.join(map(str, EXPERT_BITS))} or auto, got {self.expert_bits!r}")
        put("expert_bits", bits)
        if self.group_size not in GROUP_SIZES:
            raise OptionsError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        if self.resident_bits not in (None, *RESIDENT_BITS):
            raise OptionsError(f"resident bits must be 8 or unset (source precision), got {self.resident_bits!r}")
        put("size_budget", parse_bytes(self.size_budget))
        if bits == "auto" and self.size_budget is None:
            raise OptionsError("expert bits auto needs a size budget (bytes of experts, e.g. 300MB)")
        if bits != "auto" and self.size_budget is not None:
            raise OptionsError("a size budget applies to expert bits auto only")
        if self.bits_plan is not None:
            if bits == "auto":
                raise OptionsError("give a bit plan file or expert bits auto, not both")
            put("bits_plan", Path(self.bits_plan))
        if not isinstance(self.profile, bool):
            put("profile", Path(self.profile))
            if not self.profile.is_dir():
                raise OptionsError(f"profile {self.profile}: no such folder (a profile made by `moestream profile`)")
        if not isinstance(self.profile_tokens, int) or self.profile_tokens < 1:
            raise OptionsError(f"profile tokens must be a positive integer, got {self.profile_tokens!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise OptionsError(f"workers must be a positive integer, got {self.workers!r}")
        if self.workers and self.dask_address:
            raise OptionsError("give workers (a local Dask cluster) or a Dask scheduler address, not both")
        if self.drop_source_shards and Path(self.source).expanduser().is_dir():
            raise OptionsError(f"--drop-source-shards deletes the shards it downloads from the Hub once used; {self.source} "
                               "is a local folder, whose files are not ours to delete (give a Hub repo id, or leave it out)")

    @property
    def distributed(self) -> bool:
        return bool(self.workers or self.dask_address)


@dataclass(frozen=True)
class PreparePlan:
    """The options resolved against the source: what every step needs, decided once."""

    options: PrepareOptions
    checkpoint: Path  # the local checkpoint folder (a Hub snapshot or the given folder)
    source: SourceInfo
    family: str
    layers: tuple[int, ...]
    num_experts: int
    staging: Path  # where the bundle is assembled; finished layers survive an interruption
    profile_shards: int  # 0: no profiling run; 1: one process; n: n shards merged
    recipe: ExpertRecipe  # its bits: the default width (a measured plan overrides it per expert)
    hub: shards.HubShards | None = None  # a Hub source: its shards, downloaded as steps need them

    @property
    def out(self) -> Path:
        return self.options.out

    @property
    def work(self) -> Path:
        """Beside the staging folder: resident tensors of dropped shards, disk use samples."""
        return self.out.parent / f".{self.out.name}.prepare"

    @property
    def reads_whole_source(self) -> bool:
        """A step reads every layer's experts through the checkpoint folder (profiling, a measured bit plan)."""
        return self.options.expert_bits == "auto" or self.profile_shards > 0

    @property
    def measures_bits(self) -> bool:
        return self.options.expert_bits == "auto" or self.options.bits_plan is not None

    @property
    def orders_experts(self) -> bool:
        return self.options.profile is not False

    def layer_jobs(self, bits: dict[tuple[int, int], int], orders: dict[int, list[int]]) -> list[LayerJob]:
        """One job per MoE layer: its experts' file order and each expert's bit width."""
        identity = tuple(range(self.num_experts))
        default = self.recipe.bits
        return [LayerJob(layer, self.recipe, tuple(orders.get(layer, identity)),
                         tuple(bits.get((layer, e), default) for e in range(self.num_experts)), self.source.commit)
                for layer in self.layers]


def make_plan(options: PrepareOptions) -> PreparePlan:
    """Fetch the source (Hub downloads are resumable and cached) and decide everything else."""
    if options.out.exists() and not options.overwrite:
        raise OutputExistsError(f"{options.out} exists; pass --overwrite to replace it")
    fetched = fetch_source(options.source, revision=options.revision, weights=False)  # a repo's shards: later
    if (fetched.path / BUNDLE_JSON).is_file():
        raise OptionsError(f"{options.source} is a moestream bundle, not a model checkpoint: run it as it is "
                           f"(moestream generate {options.source}), or prepare from the checkpoint it was made from")
    headers = shards.read_headers(fetched) if fetched.weight_files else None
    ckpt = SourceCheckpoint.open(fetched.path, headers)
    layers = tuple(ckpt.expert_layers)
    if not layers:
        raise OptionsError(f"{options.source}: no routed expert tensors found; not a Mixture-of-Experts checkpoint")
    recipe = ExpertRecipe(bits=_default_bits(options, ckpt), group_size=options.group_size)
    _check_group_size(options, ckpt, recipe)
    if options.resident_bits and ckpt.resident_quantization():
        raise OptionsError(f"{options.source}: its resident weights are already quantized (MLX codes); "
                           "--resident-bits applies to source-precision checkpoints")
    profile_shards = 0
    if options.profile is True:
        profile_shards = (options.workers or 2) if options.distributed else 1
    staging = staging_dir(options.out)
    staging.mkdir(parents=True, exist_ok=True)
    hub = shards.hub_shards(fetched, headers, ckpt, options.drop_source_shards) if headers is not None else None
    return PreparePlan(options, fetched.path, SourceInfo(fetched.repo_id, fetched.revision, fetched.commit),
                       ckpt.family, layers, ckpt.dims.num_experts, staging, profile_shards, recipe, hub)


def _check_group_size(options: PrepareOptions, ckpt: SourceCheckpoint, recipe: ExpertRecipe) -> None:
    """Quantizing groups the input dimension of every expert projection: one it does not divide
    is refused here, before any layer is packed."""
    if recipe.bits in (16, "source") and options.expert_bits != "auto" and options.bits_plan is None:
        return
    for target in ckpt.arch.targets.values():
        for proj, (_, _, in_dim) in zip(target.projections, target.shapes, strict=True):
            if in_dim % options.group_size:
                fits = [g for g in (128, 64, 32) if in_dim % g == 0]
                hint = f"--group-size {fits[0]}" if fits else "--expert-bits 16 (no group size divides it)"
                raise OptionsError(f"{options.source}: layer {target.layer} {proj} has input dimension {in_dim}, "
                                   f"not a multiple of --group-size {options.group_size}; use {hint}")


def _default_bits(options: PrepareOptions, ckpt: SourceCheckpoint) -> int | str:
    """The bits every expert gets unless a plan says otherwise: as asked, else "source" for a
    quantized checkpoint (4 for a source-precision one). Requantizing quantized experts is allowed
    when asked for explicitly, with one warning."""
    stored = {q.kind for name, q in ckpt.quantized.items() if name in ckpt.experts.source_tensors()}
    bits = options.expert_bits
    if bits in (None, "auto"):
        return "source" if stored and bits is None else 4
    if stored and bits not in (16, "source"):
        kinds = ", ".join(sorted(stored))
        keep = ("--expert-bits source keeps them as stored" if stored & {"mlx", "mxfp4"}
                else "--expert-bits source (or 16) keeps their values in bfloat16")
        warnings.warn(f"{options.source}: its experts are stored quantized ({kinds}); --expert-bits {bits} requantizes "
                      f"them (dequantized, then quantized again: some precision is lost); {keep}",
                      RequantizeWarning, stacklevel=3)
    return bits


class RequantizeWarning(UserWarning):
    """Quantized experts are being quantized again."""


# ----------------------------------------------------------------------------- the steps


def expert_bit_plan(plan: PreparePlan) -> dict[tuple[int, int], int]:
    """(layer, expert) -> bits: read from the plan file, or measured within the size budget."""
    from .bits import calibration_token_ids, load_plan, plan_expert_bits

    o = plan.options
    if o.bits_plan is not None:
        bits = load_plan(o.bits_plan).bits
        wrong = [key for key in bits if key[0] not in plan.layers or not 0 <= key[1] < plan.num_experts]
        if wrong:
            raise OptionsError(f"{o.bits_plan}: {wrong[0][0]}:{wrong[0][1]} is not an expert of this model "
                               f"(MoE layers {plan.layers[0]}..{plan.layers[-1]}, {plan.num_experts} experts)")
        return bits
    ids = calibration_token_ids(plan.checkpoint, o.calibration)
    return plan_expert_bits(plan.checkpoint, ids, o.size_budget, o.group_size).bits


def profile_shard(plan: PreparePlan, index: int) -> str:
    """Profile calibration sequences index, index + n, ... (one of n shards)."""
    from .profile import profile_model

    out = plan.staging / PROFILE_SHARDS_DIR / str(index)
    profile_model(plan.checkpoint, plan.options.calibration, out, plan.options.profile_tokens, plots=False,
                  shard=(index, plan.profile_shards))
    return str(out)


def merge_profile_shards(plan: PreparePlan, shard_dirs: list[str]) -> dict:
    from .profile import merge_profiles

    result = merge_profiles([Path(s) for s in shard_dirs], plan.staging / PROFILE_DIR, plan.options.calibration)
    shutil.rmtree(plan.staging / PROFILE_SHARDS_DIR, ignore_errors=True)
    return result.summary


def profile_whole(plan: PreparePlan) -> dict:
    from .profile import profile_model

    return profile_model(plan.checkpoint, plan.options.calibration, plan.staging / PROFILE_DIR,
                         plan.options.profile_tokens).summary


def copy_profile(plan: PreparePlan) -> dict | None:
    """A profile made earlier, shipped in the bundle as it is."""
    shutil.copytree(plan.options.profile, plan.staging / PROFILE_DIR, dirs_exist_ok=True)
    summary = plan.staging / PROFILE_DIR / SUMMARY_FILE
    return json.loads(summary.read_text()) if summary.is_file() else None


def expert_orders(plan: PreparePlan) -> dict[int, list[int]]:
    """Each layer's experts in an order that puts experts that fire together side by side."""
    from .seriate import profile_orders

    return profile_orders(plan.staging / PROFILE_DIR)


def source_checkpoint(plan: PreparePlan) -> SourceCheckpoint:
    """The source, indexed (a Hub source from its shards' headers: shards may not be there yet)."""
    return SourceCheckpoint.open(plan.checkpoint, plan.hub.headers if plan.hub is not None else None)


def fetch_shards_step(plan: PreparePlan) -> None:
    """Every shard of a Hub source, for the steps that read every layer through the checkpoint folder
    (none is used up yet: nothing is dropped)."""
    _fetch(plan, plan.hub.headers)
    _record_disk(plan)


def resident_source_step(plan: PreparePlan) -> None:
    """The shards holding only resident tensors (embeddings, head) come in first; with
    drop_source_shards their resident tensors are kept aside and they are dropped before any
    layer's shard comes in (and so are shards an interrupted run left, whose layers are packed)."""
    _fetch(plan, [s for s in plan.hub.resident_only if shards.stashed(plan.hub, plan.work, s) is None])
    _step_done(plan)


def pack_layer_step(plan: PreparePlan, job: LayerJob) -> list[ExpertExtent]:
    ckpt = source_checkpoint(plan)
    if plan.hub is not None and staged_layer(plan.staging, job) is None:
        _fetch(plan, plan.hub.layers[job.layer])
    extents = pack_layer(ckpt, job, plan.staging)
    _step_done(plan)
    return extents


def write_step(plan: PreparePlan, extents: list[ExpertExtent], ordered: bool, profile_summary: dict | None) -> dict:
    ckpt = source_checkpoint(plan)
    if plan.hub is not None:  # resident tensors from the copies of dropped shards, or from the cache
        ckpt, needed = shards.resident_view(ckpt, plan.hub, plan.work)
        _fetch(plan, needed)
    meta = write_bundle(ckpt, plan.staging, extents, plan.recipe, plan.source, plan.options.resident_bits,
                        "profile" if ordered else "identity", profile_summary)
    _step_done(plan, resident_written=True)
    return meta


def finalize_step(plan: PreparePlan) -> str:
    """Verify every checksum of the staged bundle, then rename it into place."""
    bundle = str(finalize(plan.staging, plan.out, plan.options.overwrite).root)
    _record_disk(plan)
    return bundle


def _fetch(plan: PreparePlan, names) -> None:
    shards.fetch_shards(plan.hub, names, downloaded=lambda: _record_disk(plan))


def _step_done(plan: PreparePlan, resident_written: bool = False) -> None:
    """After a step: with drop_source_shards, the shards it used up go; the disk in use is sampled."""
    if plan.hub is not None and plan.hub.drop:
        shards.drop_used(plan.hub, plan.staging, plan.work, resident_written)
    _record_disk(plan)


def _record_disk(plan: PreparePlan) -> int:
    bundle = plan.staging if plan.staging.exists() else plan.out
    return shards.record_disk(plan.work, [bundle, plan.work], plan.hub)


# ----------------------------------------------------------------------------- running them


class StepRunner(Protocol):
    """How steps run. `call` runs one step; `map` runs one step for each argument tuple (in any
    order, possibly in parallel) and returns the results in the order given."""

    def call(self, name: str, fn: Callable, *args) -> Any: ...

    def map(self, name: str, fn: Callable, calls: list[tuple]) -> list: ...


@dataclass
class PrepareResult:
    bundle: Path
    meta: dict  # bundle.json, and under PREPARATION what this run measured (not in the bundle)
    seconds: float
    engine: str

    @property
    def peak_disk_bytes(self) -> int | None:
        """The most disk the preparation used at once: the bundle being made and the work folder, and
        for a Hub source its shards in the HF cache (sampled after every download and every step)."""
        return self.meta.get(PREPARATION, {}).get("peak_disk_bytes")

    def summary(self) -> dict:
        return {"bundle": str(self.bundle), **self.meta["layout"], "resident_bytes": self.meta["resident"]["nbytes"],
                "peak_disk_bytes": self.peak_disk_bytes}


PREPARATION = "preparation"  # the key of run_steps' own figures in the meta it returns


def run_steps(plan: PreparePlan, run: StepRunner) -> tuple[Path, dict]:
    """The preparation's steps in order; returns (bundle folder, bundle.json with PREPARATION: the
    peak disk use). A Hub source's shards are downloaded by the steps that read them."""
    if plan.hub is not None and plan.reads_whole_source:
        run.call("fetch-shards", fetch_shards_step, plan)
    bits = run.call("plan-bits", expert_bit_plan, plan) if plan.measures_bits else {}
    summary = None
    if plan.profile_shards > 1:  # calibration sequences split across the runner's workers
        shard_dirs = run.map("profile-shard", profile_shard, [(plan, i) for i in range(plan.profile_shards)])
        summary = run.call("profile-merge", merge_profile_shards, plan, shard_dirs)
    elif plan.profile_shards == 1:
        summary = run.call("profile", profile_whole, plan)
    elif plan.orders_experts:
        summary = run.call("profile-copy", copy_profile, plan)
    orders = run.call("order-experts", expert_orders, plan) if plan.orders_experts else {}
    if plan.hub is not None:
        run.call("resident-source", resident_source_step, plan)
    per_layer = run.map("pack-layer", pack_layer_step, [(plan, job) for job in plan.layer_jobs(bits, orders)])
    meta = run.call("write", write_step, plan, [e for layer in per_layer for e in layer], bool(orders), summary)
    bundle = Path(run.call("verify", finalize_step, plan))
    peak = shards.peak_disk(plan.work)
    shutil.rmtree(plan.work, ignore_errors=True)
    return bundle, {**meta, PREPARATION: {"peak_disk_bytes": peak}}


@dataclass
class InProcess:
    """Steps run one after another in this process: no server, no retries, no parallelism.
    progress(step, 0, total) as a step starts, then progress(step, done, total) after it (and after
    each item of a mapped one)."""

    progress: Callable[[str, int, int], None] | None = None
    steps: list[str] = field(default_factory=list)

    def call(self, name, fn, *args):
        self.report(name, 0, 1)
        result = fn(*args)
        self._done(name, 1, 1)
        return result

    def map(self, name, fn, calls):
        self.report(name, 0, len(calls))
        out = []
        for i, args in enumerate(calls):
            out.append(fn(*args))
            self._done(name, i + 1, len(calls))
        return out

    def _done(self, name: str, done: int, total: int) -> None:
        self.steps.append(name)
        self.report(name, done, total)

    def report(self, name: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(name, done, total)


def prepare_in_process(options: PrepareOptions, progress: Callable[[str, int, int], None] | None = None) -> PrepareResult:
    """The whole preparation in this process (the "plain" engine)."""
    if options.distributed:
        raise OptionsError("workers and a Dask address need the Prefect engine (the plain engine runs in one process)")
    start = time.perf_counter()
    run = InProcess(progress)
    run.report("plan", 0, 1)  # reported like a step: it reads the source (downloads a Hub repo but its weights)
    plan = make_plan(options)
    run.report("plan", 1, 1)
    bundle, meta = run_steps(plan, run)
    return PrepareResult(bundle, meta, time.perf_counter() - start, "plain")
