"""fetch stage: local folders, the HF cache offline, and a fake Hub over an injected transport.

Everything runs the real huggingface_hub code; only the network is replaced (HF_HUB_OFFLINE=1
with a cache built on disk, or an httpx2.MockTransport playing the Hub).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
from pathlib import Path

import huggingface_hub
import pytest
from hf_fake import DiskFile, FakeHub, build_fake_cache, hub_env, repo_folder

from moestream.stages.fetch import CHECKPOINT_PATTERNS, FetchedSource, FetchError, fetch_source

TOKEN = "hf_SeCrEtTokenThatMustNeverBePrinted123"
REPO = "org/tiny-moe"
CONFIG = json.dumps({"model_type": "qwen3_moe", "num_experts": 4}).encode()
FILES = {
    "config.json": CONFIG,
    "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x01" * 64,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
}
# What a real download with CHECKPOINT_PATTERNS leaves out of the snapshot.
STRAYS = {
    "pytorch_model.bin": b"\x80\x02pickle" * 8,
    "README.md": b"# tiny",
    "original/model.safetensors": b"\x02" * 32,
}


@pytest.fixture
def offline_cache(monkeypatch, tmp_path) -> Path:
    return hub_env(monkeypatch, tmp_path, offline=True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    hub_env(monkeypatch, tmp_path, offline=False)
    fake = FakeHub(token=TOKEN)
    with fake.installed():
        yield fake


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf_home" / "hub"  # the folder hub_env points HF_HUB_CACHE at


def fetch(source, **kwargs) -> FetchedSource:
    return fetch_source(source, progress=False, **kwargs)


def files_in(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


# --- offline, from a fake HF cache -----------------------------------------------------------


def test_repo_id_resolves_to_cached_snapshot(offline_cache):
    snap = build_fake_cache(offline_cache, REPO, FILES)

    got = fetch(REPO)  # cache_dir left out: found through HF_HUB_CACHE

    assert got == FetchedSource(path=snap.path, repo_id=REPO, revision="main", commit=snap.commit)
    assert files_in(got.path) == set(FILES)
    assert (got.path / "config.json").read_bytes() == CONFIG  # symlink into blobs/


def test_revision_by_branch_and_by_commit(offline_cache):
    v1 = build_fake_cache(offline_cache, REPO, FILES)
    v2_files = {**FILES, "config.json": b'{"model_type": "qwen3_moe", "v": 2}'}
    v2 = build_fake_cache(offline_cache, REPO, v2_files, ref="v2")
    pinned = build_fake_cache(offline_cache, REPO, {**FILES, "merges.txt": b"a b"}, ref=None)

    assert fetch(REPO, revision="v2", cache_dir=offline_cache).commit == v2.commit
    by_hash = fetch(REPO, revision=pinned.commit, cache_dir=offline_cache)
    assert (by_hash.commit, by_hash.revision, by_hash.path) == (
        pinned.commit, pinned.commit, pinned.path)
    assert "merges.txt" in files_in(by_hash.path)
    assert fetch(REPO, cache_dir=offline_cache).commit == v1.commit


def test_files_outside_allow_patterns_are_not_required(offline_cache):
    # The commit on the Hub also has a .bin, a README and a subfolder copy; a filtered download
    # left them out. huggingface_hub checks the cached tree listing for completeness, filtered
    # by the same patterns, so fetch must pass the patterns it downloaded with.
    build_fake_cache(offline_cache, REPO, FILES, tree={**FILES, **STRAYS})

    got = fetch(REPO, cache_dir=offline_cache)

    assert files_in(got.path) == set(FILES)
    with pytest.raises(FetchError, match=r"incomplete.*HF_HUB_OFFLINE is set"):
        fetch(REPO, cache_dir=offline_cache, allow_patterns=None, ignore_patterns=None)


def test_repo_missing_from_cache_offline(offline_cache):
    build_fake_cache(offline_cache, "org/other", FILES)

    with pytest.raises(FetchError) as err:
        fetch(REPO, cache_dir=offline_cache)

    message = str(err.value)
    assert "HF_HUB_OFFLINE is set" in message and REPO in message
    assert str(offline_cache) in message and "\n" not in message


def test_unknown_revision_offline_says_so(offline_cache):
    build_fake_cache(offline_cache, REPO, FILES)
    with pytest.raises(FetchError, match=r"HF_HUB_OFFLINE is set and org/tiny-moe@nope"):
        fetch(REPO, revision="nope", cache_dir=offline_cache)


def test_repo_without_safetensors(offline_cache):
    # Only .bin weights on the Hub: the default patterns download config + tokenizer only.
    files = {"config.json": CONFIG, "tokenizer.json": b"{}"}
    build_fake_cache(offline_cache, REPO, files, tree={**files, "pytorch_model.bin": b"pk"})

    with pytest.raises(FetchError, match=r"no \*\.safetensors .*pytorch_model\.bin.*safetensors"):
        fetch(REPO, cache_dir=offline_cache)


def test_missing_required_file(offline_cache):
    build_fake_cache(offline_cache, REPO, {"model.safetensors": b"w"})
    with pytest.raises(FetchError, match="lacks config.json"):
        fetch(REPO, cache_dir=offline_cache)


def test_sharded_checkpoint_missing_a_shard(offline_cache):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": CONFIG, "model-00001-of-00002.safetensors": b"w",
             "model.safetensors.index.json": json.dumps(index).encode()}
    build_fake_cache(offline_cache, REPO, files)

    with pytest.raises(FetchError, match="1 missing shard.*00002-of-00002"):
        fetch(REPO, cache_dir=offline_cache)


# --- local folders and what is not a source --------------------------------------------------


def write_checkpoint(folder: Path, files=FILES) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_local_folder(tmp_path, offline_cache):
    folder = write_checkpoint(tmp_path / "ckpt")

    got = fetch(folder)

    assert got == FetchedSource(path=folder.resolve(), repo_id=None, revision=None, commit=None)
    assert fetch(str(folder)).path == folder.resolve()


def test_local_folder_validation(tmp_path, offline_cache):
    folder = write_checkpoint(tmp_path / "ckpt", {"config.json": CONFIG, "model.pth": b"pk"})
    with pytest.raises(FetchError, match=r"no \*\.safetensors .*model\.pth"):
        fetch(folder)
    with pytest.raises(FetchError, match="lacks config.json"):
        fetch(write_checkpoint(tmp_path / "bare", {"model.safetensors": b"w"}))
    with pytest.raises(FetchError, match="only applies to Hub repo ids"):
        fetch(write_checkpoint(tmp_path / "ok"), revision="main")


@pytest.mark.parametrize("source", ["does-not-exist", "a/b/c", "org/bad--name", "/abs/missing",
                                    "./rel/missing", "org/name.git"])
def test_neither_folder_nor_repo_id(source, offline_cache):
    with pytest.raises(FetchError, match="no such local folder, and not a Hugging Face repo id"):
        fetch(source)


def test_empty_source_is_not_the_current_folder(tmp_path, monkeypatch, offline_cache):
    monkeypatch.chdir(write_checkpoint(tmp_path / "cwd"))
    with pytest.raises(FetchError, match="empty source"):
        fetch("")


def test_missing_path_object_and_file(tmp_path, offline_cache):
    with pytest.raises(FetchError, match="no such local folder"):
        fetch(tmp_path / "org" / "name")  # a Path is never taken for a repo id
    (tmp_path / "weights.safetensors").write_bytes(b"w")
    with pytest.raises(FetchError, match="is a file"):
        fetch(tmp_path / "weights.safetensors")


def test_fetch_error_is_a_value_error():
    assert issubclass(FetchError, ValueError)
    assert "*.safetensors" in CHECKPOINT_PATTERNS and "config.json" in CHECKPOINT_PATTERNS


# --- online, through a fake Hub transport ----------------------------------------------------


def test_download_through_fake_hub(hub, cache, monkeypatch):
    commit = hub.add_repo(REPO, {**FILES, **STRAYS})

    got = fetch(REPO)

    assert (got.repo_id, got.revision, got.commit) == (REPO, "main", commit)
    assert got.path == repo_folder(cache, REPO) / "snapshots" / commit
    assert files_in(got.path) == set(FILES)  # no .bin, README or original/
    downloaded = {r.url.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET"}
    assert not downloaded & {"pytorch_model.bin", "README.md"}
    assert (got.path / "model.safetensors").read_bytes() == FILES["model.safetensors"]

    # Now cached: the same fetch works with the Hub out of reach.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert fetch(REPO) == got


def test_fake_cache_matches_a_real_download(hub, cache, tmp_path):
    # Keeps build_fake_cache honest: same folders, links, refs and tree listing as
    # snapshot_download writes (minus its lock files and CACHEDIR.TAG).
    commit = hub.add_repo(REPO, {**FILES, **STRAYS})
    real = repo_folder(cache, REPO)
    fetch(REPO)
    fake = build_fake_cache(tmp_path / "fake", REPO, FILES, tree={**FILES, **STRAYS},
                            commit=commit).repo_folder

    def layout(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_text(
            errors="replace") for p in folder.rglob("*") if p.is_file() or p.is_symlink()}

    assert layout(fake) == layout(real)


def test_revision_online(hub):
    hub.add_repo(REPO, FILES)
    v2 = hub.push(REPO, {**FILES, "merges.txt": b"a b"}, branch="v2")

    assert fetch(REPO, revision="v2").commit == v2
    with pytest.raises(FetchError, match=r"org/tiny-moe has no revision 'v3'"):
        fetch(REPO, revision="v3")


def test_repo_not_found_online(hub):
    with pytest.raises(FetchError) as err:
        fetch("org/missing")
    message = str(err.value)
    assert "no such repo on the Hub" in message and "hf auth login" in message
    assert "\n" not in message


def test_private_repo_needs_a_valid_token(hub, monkeypatch):
    hub.add_repo(REPO, FILES, private=True)

    with pytest.raises(FetchError, match="no such repo on the Hub.*hf auth login"):
        fetch(REPO)  # anonymous: the Hub hides private repos behind a 401 "not found"
    with pytest.raises(FetchError) as err:
        fetch(REPO, token="hf_wrongTokenValue12345")
    assert "HTTP 401" in str(err.value) and "hf auth login" in str(err.value)
    assert "hf_wrongTokenValue12345" not in str(err.value)

    got = fetch(REPO, token=TOKEN)
    assert files_in(got.path) == set(FILES)
    cdn = [r for r in hub.requests if "fake-hub.test" in r.url]
    assert cdn and all(r.authorization is None for r in cdn)  # the token stays on the Hub


def test_gated_repo(hub):
    hub.add_repo(REPO, FILES, gated=True)
    with pytest.raises(FetchError, match="gated repo: accept its conditions.*hf auth login"):
        fetch(REPO)


def test_tokens_never_appear_in_errors(hub, monkeypatch):
    stale = TOKEN[:-1]  # a token the Hub rejects, from the environment
    monkeypatch.setenv("HF_TOKEN", stale)
    hub.add_repo(REPO, FILES, private=True)

    with pytest.raises(FetchError) as err:
        fetch(REPO)
    assert "HTTP 401" in str(err.value) and "HF_TOKEN" in str(err.value)

    hub.fail("GET", "/revision/main", 500, headers={"X-Error-Message": f"echo {stale}"})
    for source, token in ((REPO, None), ("org/missing", None), (REPO, TOKEN + "x")):
        with pytest.raises(FetchError) as err:
            fetch(source, token=token)
        assert stale not in str(err.value) and TOKEN not in str(err.value)


def test_network_down(hub):
    hub.add_repo(REPO, FILES)
    cached = fetch(REPO)
    hub.down = True

    # A branch resolves through refs/ in the cache, as huggingface_hub does when it can't connect.
    assert fetch(REPO) == cached
    with pytest.raises(FetchError) as err:
        fetch("org/never-downloaded")
    assert str(err.value).startswith("could not reach the Hub (https://huggingface.co) to fetch "
                                     "org/never-downloaded@main, and it is not in the cache at ")
    assert "ConnectError: [Errno 111] Connection refused" in str(err.value)


def content_gets(hub: FakeHub) -> list[str]:
    """URLs the file bytes were requested from (resolve for small files, CDN for LFS)."""
    return [r.url for r in hub.requests
            if r.method == "GET" and ("/resolve/" in r.url or "fake-hub.test" in r.url)]


def test_server_error_then_rerun_downloads_only_what_is_missing(hub):
    hub.add_repo(REPO, FILES)
    hub.fail("GET", "/tokenizer.json", 500)

    with pytest.raises(FetchError, match="HTTP 500"):
        fetch(REPO)
    got = fetch(REPO)

    assert files_in(got.path) == set(FILES)
    gets = content_gets(hub)
    # Files finished in the first run are reused from blobs/; only the failed one is fetched again.
    assert {u: gets.count(u) for u in gets} == {
        u: 2 if u.endswith("/tokenizer.json") else 1 for u in gets}


def test_dropped_connection_resumes_with_a_range_request(hub, monkeypatch):
    # Bytes reach the file in DOWNLOAD_CHUNK_SIZE pieces (10 MiB); a smaller chunk lets a tiny
    # file be cut mid-way and resumed.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)
    weights = bytes(range(256)) * 64
    hub.add_repo(REPO, {**FILES, "model.safetensors": weights})
    blob = hashlib.sha256(weights).hexdigest()
    hub.drop_connection(blob, after=4 * 256)

    got = fetch(REPO)  # huggingface_hub retries after 1 s, asking for the rest only

    assert (got.path / "model.safetensors").read_bytes() == weights
    assert [r.range for r in hub.requested("GET", blob)] == [None, "bytes=1024-"]


def test_progress_flag(hub, capfd, monkeypatch):
    # Whatever the machine's HF_HUB_DISABLE_PROGRESS_BARS says: utils.tqdm copied its value at
    # import (patching constants would not reach it), and disable_progress_bars() state is global.
    tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")  # utils.tqdm is the class
    monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(tqdm_module, "progress_bar_states", {})
    hub.add_repo(REPO, FILES)
    fetch_source(REPO, progress=True)
    assert "Fetching" in capfd.readouterr().err
    hub.add_repo("org/other", FILES)
    fetch_source("org/other", progress=False)
    assert capfd.readouterr().err == ""


def test_fake_hub_records_a_commit_that_fetch_then_downloads(hub):
    api = huggingface_hub.HfApi(token=TOKEN)
    api.create_repo("me/published")
    api.create_commit("me/published", commit_message="upload bundle", operations=[
        huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
        for name, data in FILES.items()])

    [commit] = hub.commits
    assert (commit.repo_id, commit.message, commit.added) == ("me/published", "upload bundle",
                                                              FILES)
    got = fetch("me/published", token=TOKEN)
    assert got.commit == commit.commit and files_in(got.path) == set(FILES)


# --- weights later: a Hub checkpoint fetched shard by shard (stages/shards.py) ---------------


def safetensors_file(values: list[float]) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, 4 * len(values)]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(struct.pack("<f", v) for v in values)


def test_fake_hub_answers_range_requests_for_safetensors_headers(hub):
    # huggingface_hub's own header reader: a `bytes=0-100000` range request per file, and the
    # second request a longer header needs.
    hub.add_repo(REPO, {**FILES, "model.safetensors": safetensors_file([1.0, 2.0, 3.0])})

    meta = huggingface_hub.HfApi().get_safetensors_metadata(REPO)

    info = meta.files_metadata["model.safetensors"].tensors["w"]
    assert (info.dtype, info.shape, info.data_offsets) == ("F32", [3], (0, 12))
    assert [r.range for r in hub.requests if "fake-hub.test" in r.url] == ["bytes=0-100000"]


def test_weights_later_downloads_everything_but_the_weights(hub, cache):
    shards = {"model-00001-of-00002.safetensors": safetensors_file([1.0]),
              "model-00002-of-00002.safetensors": safetensors_file([2.0])}
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {**{k: v for k, v in FILES.items() if k != "model.safetensors"}, **shards,
             "model.safetensors.index.json": json.dumps(index).encode()}
    commit = hub.add_repo(REPO, {**files, **STRAYS})

    got = fetch(REPO, weights=False)

    assert got.weight_files == tuple(shards) and got.commit == commit
    assert files_in(got.path) == set(files) - set(shards)
    assert not [r for r in hub.requests if "fake-hub.test" in r.url]  # no weight bytes asked for

    index["weight_map"]["c"] = "model-00003-of-00002.safetensors"
    hub.push(REPO, {**files, "model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(FetchError, match="names 1 shard.* the repo does not have: model-00003-of-00002"):
        fetch(REPO, weights=False)


def test_weights_later_single_file_and_offline(offline_cache):
    # The cached commit has its config and tokenizer but not its weights: enough without them.
    build_fake_cache(offline_cache, REPO, {k: v for k, v in FILES.items() if k != "model.safetensors"},
                     tree={**FILES, **STRAYS})

    got = fetch(REPO, weights=False)

    assert got.weight_files == ("model.safetensors",)
    with pytest.raises(FetchError, match="no \\*\\.safetensors weights .*pytorch_model\\.bin"):
        build_fake_cache(offline_cache, "org/bin-only", {"config.json": CONFIG},
                         tree={"config.json": CONFIG, "pytorch_model.bin": b"pk"})
        fetch("org/bin-only", weights=False)


def test_fake_hub_serves_files_from_disk(hub, tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(safetensors_file([float(i) for i in range(1000)]))
    hub.add_repo(REPO, {**FILES, "model.safetensors": DiskFile(weights)})

    got = fetch(REPO)

    assert (got.path / "model.safetensors").read_bytes() == weights.read_bytes()
    assert huggingface_hub.HfApi().get_safetensors_metadata(REPO).files_metadata["model.safetensors"].tensors["w"].shape == [1000]
