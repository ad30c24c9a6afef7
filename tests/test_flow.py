"""The Prefect flow end to end, in subprocesses as a user runs it: `moestream prepare` makes a
verified bundle; killed with SIGKILL in the middle, a rerun resumes without redoing the finished
layer and yields a bundle byte-identical to an uninterrupted run; on Dask, the steps really run in
worker processes, and every engine makes the same bundle.

Steps are observed (and the kill injected) by a hook module the subprocess imports first: it wraps
the step functions of stages/prepare.py, which the executors look up when they run. Dask workers
import it too (through PYTHONPATH), because a task's function travels to them by its module name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HOOKS = '''
import os, signal
import moestream.stages.prepare as prepare

def _observed(name, real):
    def step(plan, *args):
        out = real(plan, *args)
        with open(os.environ["MOESTREAM_TEST_STEPS"], "a") as f:
            f.write(f"{name} {os.getpid()}\\n")
        if name == "pack-layer" and os.environ.get("MOESTREAM_TEST_KILL_AFTER_LAYER") == str(args[0].layer):
            os.kill(os.getpid(), signal.SIGKILL)  # like `kill -9` once this layer is on disk
        return out
    step.__name__ = step.__qualname__ = real.__name__  # found here by name, in Dask workers too
    return step

pack_layer_step = prepare.pack_layer_step = _observed("pack-layer", prepare.pack_layer_step)
profile_shard = prepare.profile_shard = _observed("profile-shard", prepare.profile_shard)
'''


def _prepare(src: Path, out: Path, env: dict, extra=()) -> subprocess.CompletedProcess:
    """Run `moestream prepare` in its own process group, the hook module imported first; output goes
    to a file, because a SIGKILLed run leaves Prefect's embedded server behind holding any pipe open.
    Whatever the run leaves behind is killed with the group. The result's `steps` are the
    (step, process id) pairs the hooks saw, and `pid` the command's own process."""
    log = out.parent / f"{out.name}.log"
    steps = out.parent / f"{out.name}.steps"
    steps.unlink(missing_ok=True)
    argv = ["prepare", str(src), "--out", str(out), *extra]
    code = f"import moestream_test_hooks; from moestream.cli import main; raise SystemExit(main({argv!r}))"
    env = {**env, "MOESTREAM_TEST_STEPS": str(steps)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = subprocess.CompletedProcess(argv, returncode, log.read_text(), log.read_text())
    result.pid = proc.pid
    result.steps = [tuple(line.split()) for line in steps.read_text().splitlines()] if steps.exists() else []
    return result


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def prefect_env(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "moestream_test_hooks.py").write_text(HOOKS)
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # an isolated embedded server database
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
    env.pop("MOESTREAM_TEST_KILL_AFTER_LAYER", None)
    return env


def test_prepare_flow_resumes_after_kill_and_is_byte_identical(tmp_path, synth_dir, prefect_env):
    src = synth_dir("qwen3_moe")
    clean = _prepare(src, tmp_path / "clean", prefect_env)
    assert clean.returncode == 0, clean.stderr[-3000:]

    out = tmp_path / "resumed"
    killed = _prepare(src, out, {**prefect_env, "MOESTREAM_TEST_KILL_AFTER_LAYER": "0"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not out.exists(), "an interrupted run must not leave a bundle in place"
    staged = out.parent / f".{out.name}.partial" / "experts" / "layer_000.bin"
    assert staged.exists()
    before = staged.stat()

    resumed = _prepare(src, out, prefect_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = (out / "experts" / "layer_000.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "layer 0 was redone"
    assert _files(out) == _files(tmp_path / "clean")
    assert not (out.parent / f".{out.name}.partial").exists()

    verify = subprocess.run([sys.executable, "-m", "moestream.cli", "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0
    again = _prepare(src, out, prefect_env)
    assert again.returncode == 2 and "exists" in again.stderr


def test_prepare_on_local_dask_cluster_runs_in_workers_and_is_byte_identical(tmp_path, synth_dir, prefect_env):
    src = synth_dir("mixtral")
    seq = _prepare(src, tmp_path / "seq", prefect_env)
    assert seq.returncode == 0, seq.stderr[-3000:]
    assert {pid for step, pid in seq.steps} == {str(seq.pid)}, "threads: every layer packed in the command's process"
    dask = _prepare(src, tmp_path / "dask", prefect_env, extra=("--workers", "2"))
    assert dask.returncode == 0, dask.stderr[-3000:]
    packed = [pid for step, pid in dask.steps if step == "pack-layer"]
    assert len(packed) == 3 and str(dask.pid) not in packed, "Dask: every layer packed in a worker process"
    assert _files(tmp_path / "dask") == _files(tmp_path / "seq")


def test_prepare_engine_plain_gives_the_same_bundle_without_prefect(tmp_path, synth_dir, prefect_env):
    src = synth_dir("qwen3_moe")
    env = {**prefect_env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # Prefect must not be touched at all
    plain = _prepare(src, tmp_path / "plain", env, extra=("--engine", "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    flow = _prepare(src, tmp_path / "flow", prefect_env)
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert _files(tmp_path / "plain") == _files(tmp_path / "flow")


def test_profiling_shards_on_dask_give_the_same_layout(tmp_path, synth_dir, prefect_env):
    """--profile with --workers 2: calibration shards profiled on two Dask worker processes and merged;
    the expert order and expert files equal the single-process profiled run's."""
    src = synth_dir("qwen3_moe")
    one = _prepare(src, tmp_path / "one", prefect_env, extra=("--profile",))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _prepare(src, tmp_path / "two", prefect_env, extra=("--profile", "--workers", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    shards = [pid for step, pid in two.steps if step == "profile-shard"]
    assert len(shards) == 2 and str(two.pid) not in shards, "two shards, each profiled in a worker process"
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    for name in ("layout.parquet", "experts/layer_000.bin", "experts/layer_002.bin", "profile/frequency.parquet"):
        assert a[name] == b[name], name
    import pyarrow.parquet as pq

    cols = ["seq", "token", "layer", "experts", "weights"]  # the footer's run metadata differs, the trace does not
    assert pq.read_table(tmp_path / "one" / "profile" / "trace.parquet").select(cols).equals(
        pq.read_table(tmp_path / "two" / "profile" / "trace.parquet").select(cols))


def test_a_layer_not_yet_packed_never_shares_its_cache_key(tmp_path):
    """Two layers with alike jobs (same recipe, order, bits), in one task context: each unfinished
    layer runs under a key of its own (a shared key gave one layer's extents to another, a duplicate
    row in layout.parquet); a finished one is a cache hit under a key naming its layer."""
    from types import SimpleNamespace

    from moestream.flows.prepare import _layer_cache_key
    from moestream.stages.pack import LayerJob, layer_file
    from moestream.stages.quantize import ExpertRecipe

    plan, context = SimpleNamespace(staging=tmp_path), object()
    jobs = [LayerJob(layer, ExpertRecipe(), (0, 1), (4, 4)) for layer in (1, 2)]
    keys = [_layer_cache_key(context, {"plan": plan, "job": job}) for job in jobs + jobs]
    assert len(set(keys)) == 4
    (tmp_path / layer_file(1)).parent.mkdir(parents=True)
    (tmp_path / layer_file(1)).write_bytes(b"")
    (tmp_path / (layer_file(1) + ".json")).write_text(json.dumps({"key": jobs[0].key(), "extents": []}))
    done = [_layer_cache_key(context, {"plan": plan, "job": jobs[0]}) for _ in range(2)]
    assert done[0] == done[1] and done[0].startswith("moestream-layer-1-")
