"""The preparation flow: the steps of stages/prepare.py as Prefect tasks.

Orchestration only; what the bundle holds is decided by `make_plan` and `run_steps`. Prefect adds:
retries of the fetch when the network or the Hub failed (never for a bad source or options),
per-layer tasks whose finished work survives an interruption (the stage keeps each finished layer
in the staging folder; the task's cache key says whether it is there, so a rerun skips it), task
runners (threads, or Dask processes), and a summary artifact. Without PREFECT_API_URL the flow talks
to an embedded server that this module starts and stops, so that it can also stop it at once when
the user interrupts the run (`stop_now`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from ..common.hub import as_repo_id
from ..stages.fetch import FetchError
from ..stages.pack import staged_layer
from ..stages.prepare import PrepareOptions, PrepareResult, make_plan, run_steps


def _transient(task, task_run, state) -> bool:
    """Retry only what may heal: a fetch that failed on the network or the Hub's side."""
    err = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return bool(getattr(err, "transient", False))


def _layer_cache_key(context, parameters) -> str:
    # A finished layer (its file and sidecar in the staging folder, for this very job) is a cache
    # hit; anything else runs, under a key no other task can have: layers whose jobs are alike
    # (same recipe, order and bits) share a digest, and id(context), the earlier token, is reused
    # once a context is freed, which gave one layer's result to another. The staging folder stays
    # the source of truth for what is done.
    plan, job = parameters["plan"], parameters["job"]
    done = staged_layer(plan.staging, job) is not None
    digest = hashlib.sha256(f"{plan.staging.resolve()}|{job.layer}|{job.key()}|{done}".encode()).hexdigest()
    return f"moestream-layer-{job.layer}-{digest}" if done else f"moestream-layer-{job.layer}-run-{uuid.uuid4().hex}"


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
    """Runs each step as a Prefect task; a mapped step's items are submitted to the task runner.
    progress(step, 0, total) as a step starts, then progress(step, done, total) as its items finish."""

    def __init__(self, progress=None):
        self.progress = progress

    def call(self, name, fn, *args):
        self._report(name, 0, 1)
        result = _task(name, fn)(*args)
        self._report(name, 1, 1)
        return result

    def map(self, name, fn, calls):
        self._report(name, 0, len(calls))
        futures = [_task(name, fn).submit(*args) for args in calls]
        for done, future in enumerate(as_completed(futures), 1):
            future.result()  # the first failure stops the flow, with its own error
            self._report(name, done, len(futures))
        return [f.result() for f in futures]

    def _report(self, name: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(name, done, total)


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


@dataclass
class _Current:
    """The preparation running in this process: its progress callback (not a flow parameter, because
    Prefect records those), and what `stop_now` has to stop."""

    progress: Callable[[str, int, int], None] | None = None
    flow_run_id: Any = None
    server: Any = None  # the embedded server this module started, if any


_current = _Current()


def _steps_of_this_run() -> PrefectSteps:
    """Records the flow run (for `stop_now`) and returns its step runner. The flow's code names this
    function rather than `_current`: Dask pickles the flow function by value, with the globals it
    names, and `_current` holds what cannot be pickled (the server, a progress display's lock)."""
    from prefect.runtime import flow_run

    _current.flow_run_id = flow_run.id
    return PrefectSteps(_current.progress)


@flow(name="prepare-bundle", task_runner=ThreadPoolTaskRunner(max_workers=2))
def prepare_flow(options: PrepareOptions) -> dict:
    steps = _steps_of_this_run()
    plan = steps.call("plan", make_plan, options)
    bundle, meta = run_steps(plan, steps)
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
def prefect_api(progress=None):
    """The user's server when PREFECT_API_URL is set; else an embedded one, started here rather than
    by Prefect's client on first use, so that this module holds it: the logs still queued are sent
    before it stops, Ctrl-C stops it at once (`stop_now`), and Dask workers, other processes, get
    its URL through the environment they inherit instead of each starting its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = _current.server = SubprocessASGIServer()
    _step_event(progress, "start-server", 0)
    server.start()
    _step_event(progress, "start-server", 1)
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
        _current.server = None


def _drain_to_api() -> None:
    """Send the logs and events still queued for the API while the server is up: once it stops,
    their workers retry against it for a minute before the process can exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _step_event(progress, step: str, done: int) -> None:
    if progress is not None:
        progress(step, done, 1)


def fail_fast(options: PrepareOptions, progress=None) -> None:
    """A source that cannot work fails before the server starts (that takes seconds): a local folder
    is planned here (it reads headers only, and imports what the flow's plan task needs, so that task
    is quick), and a source that is neither a folder nor a Hub repo id is refused as the fetch would."""
    local = Path(options.source).expanduser()
    if local.is_dir():
        _step_event(progress, "plan", 0)
        make_plan(options)
    else:
        as_repo_id(options.source, local, FetchError, "checkpoint folder")


def prepare_with_prefect(options: PrepareOptions, progress=None) -> PrepareResult:
    """Run the flow with the task runner the options ask for."""
    start = time.perf_counter()
    fail_fast(options, progress)
    runner = task_runner_for(options)
    _current.progress = progress
    try:
        with prefect_api(progress):
            meta = prepare_flow.with_options(task_runner=runner)(options)
    finally:
        _current.progress = _current.flow_run_id = None
    return PrepareResult(options.out, meta, time.perf_counter() - start, "prefect")


def stop_now(wait: float = 1.5) -> None:
    """What an interruption (Ctrl-C) does before the process exits; finished layers stay on disk for
    a rerun either way. The embedded server got the same SIGINT from the terminal, so nothing more
    is sent to it (Prefect's client would retry against it for a minute or more): it is stopped. A
    server the user runs is told the flow run was cancelled and gets the log lines still queued,
    waiting for it at most `wait` seconds."""
    server, flow_run_id = _current.server, _current.flow_run_id
    if server is not None:
        _stop_process(server.server_process)
    elif flow_run_id is not None:
        told = threading.Thread(target=_mark_cancelled, args=(flow_run_id, wait), name="moestream-cancel", daemon=True)
        told.start()
        told.join(wait)


def _stop_process(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        process.kill()


def _mark_cancelled(flow_run_id, wait: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelled(message="interrupted by the user; finished layers are "
                                                                     "kept for a rerun"), force=True)
        APILogWorker.drain_all(timeout=wait)
    except Exception:  # noqa: BLE001 - best effort on the way out: the run is ending whatever the server says
        pass
