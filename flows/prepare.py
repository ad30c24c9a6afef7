"""The preparation flow: the steps of stages/prepare.py as Prefect tasks.

Orchestration only; what the bundle holds is decided by `make_plan` and `run_steps`. Prefect adds:
retries of the fetch when the network or the Hub failed (never for a bad source or options),
per-layer tasks whose finished work survives an interruption (the stage keeps each finished layer
in the staging folder; the task's cache key says whether it is there, so a rerun skips it), task
runners (threads, or Dask processes), and a summary artifact.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from ..stages.pack import staged_layer
from ..stages.prepare import PrepareOptions, PrepareResult, make_plan, run_steps


def _transient(task, task_run, state) -> bool:
    """Retry only what may heal: a fetch that failed on the network or the Hub's side."""
    err = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return bool(getattr(err, "transient", False))


def _layer_cache_key(context, parameters) -> str:
    # A finished layer (its file and sidecar in the staging folder, for this very job) is a cache
    # hit; anything else runs. The staging folder stays the source of truth for what is done.
    plan, job = parameters["plan"], parameters["job"]
    done = staged_layer(plan.staging, job) is not None
    digest = hashlib.sha256(f"{plan.staging.resolve()}|{job.key()}|{done}".encode()).hexdigest()
    return f"moestream-layer-{job.layer}-{digest}" if done else f"moestream-layer-run-{digest}-{id(context)}"


# What Prefect adds to a step, by step name (any other step is a plain task). The steps that
# download a Hub source's shards (the plan reads their headers) retry when the network failed.
_RETRY = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": _transient}
TASK_OPTIONS = {
    "plan": _RETRY,
    "fetch-shards": _RETRY,
    "resident-source": _RETRY,
    "pack-layer": {"cache_key_fn": _layer_cache_key, "persist_result": True, **_RETRY},
    "write": _RETRY,
}


@cache
def _task(name: str, fn):
    return task(fn, name=name, **TASK_OPTIONS.get(name, {}))


class PrefectSteps:
    """Runs each step as a Prefect task; a mapped step's items are submitted to the task runner."""

    def __init__(self, progress=None):
        self.progress = progress

    def call(self, name, fn, *args):
        result = _task(name, fn)(*args)
        if self.progress is not None:
            self.progress(name, 1, 1)
        return result

    def map(self, name, fn, calls):
        futures = [_task(name, fn).submit(*args) for args in calls]
        for done, future in enumerate(as_completed(futures), 1):
            future.result()  # the first failure stops the flow, with its own error
            if self.progress is not None:
                self.progress(name, done, len(futures))
        return [f.result() for f in futures]


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


# The running flow's progress callback: not a flow parameter, because Prefect records those.
_progress = None


@flow(name="prepare-bundle", task_runner=ThreadPoolTaskRunner(max_workers=2))
def prepare_flow(options: PrepareOptions) -> dict:
    plan = _task("plan", make_plan)(options)
    bundle, meta = run_steps(plan, PrefectSteps(_progress))
    create_markdown_artifact(markdown=summary_markdown(meta, bundle), key="bundle-summary", description="moestream bundle")
    return meta


def task_runner_for(options: PrepareOptions):
    """Threads by default (the per-layer work releases the GIL in MLX and hashing); a Dask
    cluster when asked: an existing one by address, or a local one of `workers` processes."""
    if options.distributed:
        from prefect_dask import DaskTaskRunner

        if options.dask_address:
            return DaskTaskRunner(address=options.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": options.workers, "threads_per_worker": 1, "processes": True})
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
            try:
                yield
            finally:
                _drain_to_api()
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        server.stop()


def _drain_to_api() -> None:
    """Send the logs and events still queued for the API while the server is up: once it stops,
    their workers retry against it for a minute before the process can exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def prepare_with_prefect(options: PrepareOptions, progress=None) -> PrepareResult:
    """Run the flow with the task runner the options ask for."""
    global _progress
    start = time.perf_counter()
    runner = task_runner_for(options)
    _progress = progress
    try:
        if options.distributed:
            with shared_prefect_api():
                meta = prepare_flow.with_options(task_runner=runner)(options)
        else:
            meta = prepare_flow.with_options(task_runner=runner)(options)
    finally:
        _progress = None
    return PrepareResult(options.out, meta, time.perf_counter() - start, "prefect")
