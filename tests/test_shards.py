"""Preparing by Hub repo id, shard by shard (stages/shards.py): the index from the shards' headers
(range requests), each shard downloaded when a step needs it, and with --drop-source-shards deleted
once used. huggingface_hub's real client runs against the fake Hub (tests/hf_fake.py); no network.

The checkpoint is the tiny qwen3_moe synth: 3 MoE layers, one shard per layer (the first also holds
the embeddings, the last the final norm and the head)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from conftest import build_bundle
from hf_fake import FakeHub, build_fake_cache, hub_env, repo_folder

import moestream.stages.prepare as prepare
from moestream.cli import main as cli_main
from moestream.common.errors import OptionsError
from moestream.manifests.safetensors_index import index_folder
from moestream.stages.fetch import FetchError
from moestream.stages.prepare import InProcess, PrepareOptions, make_plan, run_steps

REPO = "org/tiny-moe"


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_bundle(a: Path, b: Path) -> None:
    """Byte for byte, but for where bundle.json says the source came from."""
    fa, fb = files_of(a), files_of(b)
    meta_a, meta_b = json.loads(fa.pop("bundle.json")), json.loads(fb.pop("bundle.json"))
    assert fa == fb
    meta_a.pop("source"), meta_b.pop("source")
    assert meta_a == meta_b


def shard_names(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


@pytest.fixture
def source(synth_dir) -> Path:
    return synth_dir("qwen3_moe")


@pytest.fixture
def local_bundle(bundle_dir) -> Path:
    return bundle_dir("qwen3_moe", 4, 64)  # the same checkpoint prepared from its folder


@pytest.fixture
def hub(monkeypatch, tmp_path, source):
    hub_env(monkeypatch, tmp_path, offline=False)
    fake = FakeHub()
    fake.commit = fake.add_repo(REPO, files_of(source))
    with fake.installed():
        yield fake


class Watch:
    """Records each shard download (wrapping huggingface_hub.hf_hub_download, which only the shard
    fetches call) and the most shards in the cache at once, after every download and every step."""

    def __init__(self, monkeypatch, snapshot_of):
        self.downloads: list[str] = []
        self.most = 0
        self.after_steps: list[tuple[str, list[str]]] = []  # (step, shards in the cache after it)
        self.snapshot_of = snapshot_of
        real = huggingface_hub.hf_hub_download

        def download(repo_id, filename, **kwargs):
            path = real(repo_id, filename, **kwargs)
            self.downloads.append(filename)
            self.look()
            return path

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)

    def present(self) -> list[str]:
        return sorted(p.name for p in self.snapshot_of().glob("*.safetensors"))

    def look(self, step: str | None = None, *_):
        present = self.present()
        self.most = max(self.most, len(present))
        if step is not None:
            self.after_steps.append((step, present))


def run(out: Path, watch: Watch | None = None, **options) -> tuple[prepare.PrepareResult, list[str]]:
    runner = InProcess(progress=watch.look if watch else None)
    plan = make_plan(PrepareOptions(REPO, out, expert_bits=4, group_size=64, **options))
    bundle, meta = run_steps(plan, runner)
    return prepare.PrepareResult(bundle, meta, 0.0, "plain"), runner.steps


def snapshot(cache: Path, commit: str) -> Path:
    return repo_folder(cache, REPO) / "snapshots" / commit


# ----------------------------------------------------------------------------- the index


def test_plan_reads_shard_headers_by_range_requests(hub, tmp_path, source):
    plan = make_plan(PrepareOptions(REPO, tmp_path / "b"))

    cdn = [r for r in hub.requests if "fake-hub.test" in r.url]
    assert len(cdn) == len(shard_names(source)) and all(r.range == "bytes=0-99999" for r in cdn)
    assert not list(plan.checkpoint.glob("*.safetensors"))  # no shard downloaded
    local = index_folder(source)
    by_headers = prepare.source_checkpoint(plan).tensors
    assert {n: (i.file.name, i.dtype, i.shape, i.offset, i.nbytes) for n, i in by_headers.items()} == {
        n: (i.file.name, i.dtype, i.shape, i.offset, i.nbytes) for n, i in local.items()}
    assert {i.file.parent for i in by_headers.values()} == {plan.checkpoint}  # where each shard will be
    assert plan.hub.layers == {0: ("model-00001-of-00003.safetensors",), 1: ("model-00002-of-00003.safetensors",),
                               2: ("model-00003-of-00003.safetensors",)}


def test_a_long_header_takes_a_second_range_request(hub, tmp_path, source, monkeypatch):
    monkeypatch.setattr(prepare.shards, "HEADER_PROBE", 64)  # every header is longer
    plan = make_plan(PrepareOptions(REPO, tmp_path / "b"))

    ranges = [r.range for r in hub.requests if "fake-hub.test" in r.url]
    assert ranges[:2] == ["bytes=0-63", f"bytes=8-{7 + len(plan.hub.headers[shard_names(source)[0]][0])}"]
    assert len(ranges) == 2 * len(shard_names(source))


# ----------------------------------------------------------------------------- preparing


def test_by_repo_id_equals_local_folder_and_keeps_the_shards(hub, tmp_path, source, local_bundle, monkeypatch):
    watch = Watch(monkeypatch, lambda: snapshot(tmp_path / "hf_home" / "hub", hub.commit))

    result, steps = run(tmp_path / "b", watch)

    same_bundle(result.bundle, local_bundle)
    assert steps == ["resident-source", *["pack-layer"] * 3, "write", "verify"]
    assert watch.downloads == shard_names(source)  # each once, layer by layer
    assert watch.present() == shard_names(source)  # all kept in the cache
    assert result.peak_disk_bytes > sum((source / s).stat().st_size for s in shard_names(source))
    assert not (tmp_path / ".b.prepare").exists() and not (tmp_path / ".b.partial").exists()


def test_drop_source_shards(hub, tmp_path, source, local_bundle, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    watch = Watch(monkeypatch, lambda: snapshot(cache, hub.commit))

    result, _ = run(tmp_path / "b", watch, drop_source_shards=True)

    same_bundle(result.bundle, local_bundle)
    assert watch.downloads == shard_names(source)
    assert watch.present() == [] and watch.most == 1  # never more than one of the three at once
    blobs = {p.name for p in (repo_folder(cache, REPO) / "blobs").iterdir()}
    kept = {p.resolve().name for p in snapshot(cache, hub.commit).iterdir()}
    assert blobs == kept and len(kept) == 5  # config, generation config, tokenizer files, index: no shard blob
    shards_bytes = sum((source / s).stat().st_size for s in shard_names(source))
    assert result.peak_disk_bytes < shards_bytes  # the bundle and one shard at most
    assert result.summary()["peak_disk_bytes"] == result.peak_disk_bytes


def test_interrupted_then_resumed_downloads_only_what_it_lacks(hub, tmp_path, source, local_bundle, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    watch = Watch(monkeypatch, lambda: snapshot(cache, hub.commit))
    real = prepare.pack_layer_step

    def interrupted(plan, job):
        out = real(plan, job)
        if job.layer == 1:
            raise KeyboardInterrupt("stopped after layer 1")
        return out

    monkeypatch.setattr(prepare, "pack_layer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", watch, drop_source_shards=True)
    names = shard_names(source)
    assert watch.downloads == names[:2] and watch.present() == []  # layers 0 and 1 packed, their shards gone

    monkeypatch.setattr(prepare, "pack_layer_step", real)
    watch.downloads.clear()
    result, _ = run(tmp_path / "b", watch, drop_source_shards=True)

    assert watch.downloads == names[2:]  # the resident tensors of the dropped shards were kept aside
    same_bundle(result.bundle, local_bundle)
    assert watch.present() == []


def test_a_failed_download_says_so_and_a_rerun_resumes(hub, tmp_path, source, local_bundle):
    last = shard_names(source)[-1]
    plan = make_plan(PrepareOptions(REPO, tmp_path / "b", expert_bits=4, drop_source_shards=True))
    hub.fail("GET", hashlib.sha256((source / last).read_bytes()).hexdigest(), 503)  # its bytes, on the CDN

    with pytest.raises(FetchError) as err:
        run_steps(plan, InProcess())
    assert err.value.transient  # the flow's pack-layer task retries it
    assert str(err.value).startswith(f"shard {last}: the Hub returned HTTP 503") and "\n" not in str(err.value)

    result, _ = run(tmp_path / "b", drop_source_shards=True)
    same_bundle(result.bundle, local_bundle)


def test_drop_source_shards_refuses_a_local_folder(source, tmp_path, capsys):
    with pytest.raises(OptionsError, match="local folder, whose files are not ours to delete"):
        PrepareOptions(str(source), tmp_path / "b", drop_source_shards=True)

    code = cli_main(["prepare", str(source), "--out", str(tmp_path / "b"), "--drop-source-shards", "--engine", "plain"])

    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not ours to delete" in err
    assert not (tmp_path / "b").exists()


def test_offline_with_a_complete_cache(monkeypatch, tmp_path, source, local_bundle):
    cache = hub_env(monkeypatch, tmp_path, offline=True)  # no fake Hub: any request would fail
    build_fake_cache(cache, REPO, files_of(source))

    result, steps = run(tmp_path / "b")

    same_bundle(result.bundle, local_bundle)
    assert "resident-source" in steps


def write_shards(folder: Path, tensors: dict[str, dict], groups: list[list[str]], data: dict[str, bytes]) -> None:
    """Write safetensors shards holding `groups` of tensors, and their index."""
    weight_map = {}
    for i, names in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset, body = {}, 0, []
        for n in sorted(names):
            header[n] = {**tensors[n], "data_offsets": [offset, offset + len(data[n])]}
            offset += len(data[n])
            body.append(data[n])
            weight_map[n] = name
        raw = json.dumps(header).encode()
        (folder / name).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(body))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_shard_of_resident_tensors_only_goes_before_any_layer(monkeypatch, tmp_path, source):
    # The same tensors, sharded as some Hub repos are: embeddings, norm and head in a shard of their own.
    tensors, data = {}, {}
    for path in source.glob("*.safetensors"):
        raw = path.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        for name, entry in json.loads(raw[8:8 + hlen]).items():
            if name == "__metadata__":
                continue
            begin, end = entry.pop("data_offsets")
            tensors[name], data[name] = entry, raw[8 + hlen + begin:8 + hlen + end]
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    for p in source.iterdir():
        if not p.name.endswith((".safetensors", ".index.json")):
            (resharded / p.name).write_bytes(p.read_bytes())
    layers = [[n for n in tensors if n.startswith(f"model.layers.{i}.")] for i in range(3)]
    write_shards(resharded, tensors, [[n for n in tensors if ".layers." not in n], *layers], data)
    hub_env(monkeypatch, tmp_path, offline=False)
    fake = FakeHub()
    commit = fake.add_repo(REPO, files_of(resharded))
    watch = Watch(monkeypatch, lambda: snapshot(tmp_path / "hf_home" / "hub", commit))

    with fake.installed():
        result, _ = run(tmp_path / "b", watch, drop_source_shards=True)

    assert watch.downloads == shard_names(resharded)  # the resident one first
    assert watch.after_steps[0] == ("resident-source", [])  # dropped at once, its tensors kept aside
    assert watch.most == 1 and watch.present() == []
    same_bundle(result.bundle, build_bundle(resharded, tmp_path / "local"))


@pytest.mark.slow
def test_prefect_engine_by_repo_id_with_drop_source_shards(tmp_path, source, local_bundle):
    """The flow runs the same steps (the shard downloads as tasks with retries): `moestream prepare
    REPO --drop-source-shards` in a subprocess, from a complete cache with HF_HUB_OFFLINE=1."""
    home = tmp_path / "hf_home"
    snap = build_fake_cache(home / "hub", REPO, files_of(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    out = tmp_path / "b"
    argv = [sys.executable, "-m", "moestream.cli", "prepare", REPO, "--out", str(out), "--expert-bits", "4",
            "--drop-source-shards", "--json"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind (Prefect's server)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(re.search(r"^\{\n.*?^\}$", output, re.S | re.M).group(0))  # among Prefect's log lines
    assert 0 < summary["peak_disk_bytes"] < sum((source / s).stat().st_size for s in shard_names(source)) * 2
    same_bundle(out, local_bundle)
    assert not list(snap.path.glob("*.safetensors"))
