"""The preparation flow: fetch -> inspect -> quantize + pack per layer -> write -> verify.

Orchestration only: retries on fetch, per-layer tasks whose finished work survives an
interruption (the stage keeps each finished layer in the staging folder; the task's cache key
says whether it is there, so a rerun skips it), a summary artifact, progress in the log.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from ..manifests.checkpoint import SourceCheckpoint
from ..stages.fetch import fetch_source
from ..stages.pack import LayerJob, pack_layer, staged_layer
from ..stages.quantize import ExpertRecipe
from ..stages.write import SourceInfo, finalize, staging_dir, write_bundle


@task(name="fetch", retries=3, retry_delay_seconds=[2, 10, 30])
def fetch_task(source: str, revision: str | None):
    return fetch_source(source, revision=revision)


@task(name="inspect")
def inspect_task(path: Path) -> dict:
    ckpt = SourceCheckpoint.open(path)
    dims = ckpt.dims
    get_run_logger().info(
        "%s: %d MoE layers x %d experts, top-%d, hidden %d, expert intermediate %d",
        ckpt.family.name, len(ckpt.expert_layers), dims.num_experts, dims.experts_per_token,
        dims.hidden_size, dims.expert_intermediate_size,
    )
    return {"family": ckpt.family.name, "layers": ckpt.expert_layers, **asdict(dims)}


def _layer_cache_key(context, parameters) -> str:
    # A finished layer (its file and sidecar in the staging folder, for this very job) is a cache
    # hit; anything else runs. The staging folder stays the source of truth for what is done.
    job, staging = parameters["job"], Path(parameters["staging"])
    done = staged_layer(staging, job) is not None
    digest = hashlib.sha256(f"{staging.resolve()}|{job.key()}|{done}".encode()).hexdigest()
    return f"moestream-layer-{job.layer}-{digest}" if done else f"moestream-layer-run-{digest}-{id(context)}"


@task(name="pack-layer", cache_key_fn=_layer_cache_key, persist_result=True)
def pack_layer_task(path: Path, job: LayerJob, staging: Path):
    extents = pack_layer(SourceCheckpoint.open(path), job, staging)
    # Fault injection for the resume test: die like `kill -9` once this layer is on disk.
    if os.environ.get("MOESTREAM_FAULT_KILL_AFTER_LAYER") == str(job.layer):
        os.kill(os.getpid(), signal.SIGKILL)
    get_run_logger().info("layer %d: %d experts packed, %.1f MB", job.layer, len(extents), sum(e.nbytes for e in extents) / 1e6)
    return extents


@task(name="profile")
def profile_task(path: Path, calibration: str | None, out: Path, max_tokens: int) -> dict:
    from ..stages.profile import profile_model

    result = profile_model(path, calibration, out, max_tokens)
    get_run_logger().info("profile: %s", result.summary)
    return result.summary


@task(name="profile-shard")
def profile_shard_task(path: Path, calibration: str | None, out: Path, max_tokens: int, index: int, count: int) -> str:
    from ..stages.profile import profile_model

    profile_model(path, calibration, out, max_tokens, plots=False, shard=(index, count))
    return str(out)


@task(name="profile-merge")
def profile_merge_task(shards: list[str], out: Path, calibration: str | None) -> dict:
    from ..stages.profile import merge_profiles

    result = merge_profiles([Path(s) for s in shards], out, calibration)
    get_run_logger().info("profile (%d shards): %s", len(shards), result.summary)
    return result.summary


@task(name="plan-bits")
def plan_task(path: Path, size_budget: int, group_size: int, calibration: str | None) -> dict:
    from ..stages.plan import calibration_token_ids, plan_expert_bits

    plan = plan_expert_bits(path, calibration_token_ids(path, calibration), size_budget, group_size)
    counts = {}
    for b in plan.bits.values():
        counts[b] = counts.get(b, 0) + 1
    get_run_logger().info("bit plan: %s experts by width, %.1f MB of experts", dict(sorted(counts.items())), plan.expert_bytes / 1e6)
    return plan.bits


@task(name="write")
def write_task(path: Path, staging: Path, extents, recipe, source: SourceInfo, resident_bits, order, profile_summary):
    return write_bundle(SourceCheckpoint.open(path), staging, extents, recipe, source, resident_bits, order,
                        profile_summary)


@task(name="verify")
def verify_task(staging: Path, out: Path, overwrite: bool) -> str:
    return str(finalize(staging, out, overwrite).root)


def task_runner_for(dask_address: str | None = None, workers: int | None = None):
    """Threads by default (the per-layer work releases the GIL in MLX and hashing); a Dask
    cluster when asked: an existing one by address, or a local one of `workers` processes."""
    if dask_address or workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=2)


@contextmanager
def shared_prefect_api():
    """Dask workers are other processes: with no Prefect server configured, each would start
    its own embedded one. Start one here and hand its URL to the workers through the
    environment they inherit."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        server.stop()


def run_prepare(source: str, out: str, dask_address: str | None = None, workers: int | None = None, **options) -> dict:
    """Run the flow with the task runner the options ask for."""
    runner = task_runner_for(dask_address, workers)
    if options.get("profile") and (dask_address or workers):
        options.setdefault("profile_shards", workers or 2)
    if not (dask_address or workers):
        return prepare_bundle.with_options(task_runner=runner)(source, out, **options)
    with shared_prefect_api():
        return prepare_bundle.with_options(task_runner=runner)(source, out, **options)


def summary_markdown(meta: dict, out: Path) -> str:
    e, lay = meta["experts"], meta["layout"]
    return "\n".join(
        [
            f"# moestream bundle: {out.name}",
            f"- family: `{meta['family']}`, source: `{meta['source'].get('repo_id') or 'local folder'}`",
            f"- {e['num_moe_layers']} MoE layers x {e['num_experts']} experts, top-{e['experts_per_token']}",
            f"- expert bits: {e['bits']} (group size {e['group_size']}), resident bits: {meta['resident']['bits'] or 'source'}",
            f"- expert bytes: {lay['expert_bytes']:,}; resident bytes: {meta['resident']['nbytes']:,}",
            f"- expert bytes read per token with nothing cached: {lay['expert_bytes_per_token']:,}",
        ]
    )


@flow(name="prepare-bundle", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def prepare_bundle(
    source: str,
    out: str,
    expert_bits: int | str = 4,
    group_size: int = 64,
    resident_bits: int | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    bits_plan: str | None = None,
    size_budget: int | None = None,
    calibration: str | None = None,
    profile: bool = False,
    profile_tokens: int = 16384,
    profile_shards: int = 1,
) -> dict:
    """expert_bits: 2/3/4/8/16, or "auto" (a measured plan under `size_budget` bytes of experts);
    bits_plan: a plan file ({"bits": {"LAYER:EXPERT": BITS}}) overriding expert_bits per expert."""
    out_path = Path(out).absolute()
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it")
    auto = expert_bits == "auto"
    if auto and not size_budget:
        raise ValueError("--expert-bits auto needs --size-budget (bytes of experts)")
    default_bits = 4 if auto else int(expert_bits)
    recipe = ExpertRecipe(bits=default_bits, group_size=group_size)
    fetched = fetch_task(source, revision)
    info = inspect_task(fetched.path)
    plan = {}
    if bits_plan:
        from ..stages.plan import load_plan

        plan = load_plan(Path(bits_plan)).bits
    elif auto:
        plan = plan_task(fetched.path, size_budget, group_size, calibration)
    staging = staging_dir(out_path)
    staging.mkdir(parents=True, exist_ok=True)
    identity = tuple(range(info["num_experts"]))
    orders, profile_summary = {}, None
    if profile:
        from ..stages.seriate import profile_orders

        if profile_shards > 1:  # calibration sequences split across the task runner's workers
            shards = [profile_shard_task.submit(fetched.path, calibration, staging / "profile-shards" / str(i),
                                                profile_tokens, i, profile_shards) for i in range(profile_shards)]
            profile_summary = profile_merge_task([f.result() for f in shards], staging / "profile", calibration)
            shutil.rmtree(staging / "profile-shards", ignore_errors=True)
        else:
            profile_summary = profile_task(fetched.path, calibration, staging / "profile", profile_tokens)
        orders = profile_orders(staging / "profile")
    futures = [
        pack_layer_task.submit(
            fetched.path,
            LayerJob(layer, recipe, tuple(orders.get(layer, identity)),
                     tuple(plan.get((layer, e), default_bits) for e in range(info["num_experts"]))),
            staging,
        )
        for layer in info["layers"]
    ]
    extents = [e for f in futures for e in f.result()]
    source_info = SourceInfo(fetched.repo_id, fetched.revision, fetched.commit)
    meta = write_task(fetched.path, staging, extents, recipe, source_info, resident_bits,
                      "profile" if orders else "identity", profile_summary)
    final = verify_task(staging, out_path, overwrite)
    create_markdown_artifact(markdown=summary_markdown(meta, out_path), key="bundle-summary", description="moestream bundle")
    return {"bundle": final, **meta["layout"], "resident_bytes": meta["resident"]["nbytes"]}
