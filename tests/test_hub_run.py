"""Run a bundle by Hub repo id: publish to the fake Hub, resolve it by id (downloaded through
the real huggingface_hub client), verify it once, load it, and use the cache offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pytest
from hf_fake import FakeHub, disable_xet, hub_env, repo_folder

import moestream
from moestream.manifests.bundle import BundleError
from moestream.manifests.layout import read_layout
from moestream.runtime.io import hub as hub_module
from moestream.runtime.io.hub import HubError, resolve_bundle, verified_cache_dir
from moestream.stages.publish import publish_bundle

TOKEN = "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7"
REPO = "org/tiny-moestream"
PROMPT = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8]


@pytest.fixture
def bundle(tmp_path, bundle_dir) -> Path:
    folder = Path(shutil.copytree(bundle_dir("qwen3_moe"), tmp_path / "bundle"))
    (folder / "profile").mkdir()
    (folder / "profile" / "summary.json").write_text('{"tokens": 128}')
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    hub_env(monkeypatch, tmp_path, offline=False)
    disable_xet(monkeypatch)
    monkeypatch.setenv("MOESTREAM_CACHE", str(tmp_path / "moestream-cache"))
    fake = FakeHub(token=TOKEN)
    fake.lfs_threshold = 64 * 1024
    with fake.installed():
        yield fake


@pytest.fixture
def published(bundle, hub) -> str:
    return publish_bundle(bundle, REPO, token=TOKEN, echo=None).commit


def resolve(source=REPO, **kwargs) -> Path:
    return resolve_bundle(source, progress=False, **kwargs)


def files_in(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def go_offline(monkeypatch, hub) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.down = True  # and any request would fail


@pytest.fixture
def verifications(monkeypatch) -> list[Path]:
    """Records every full verification resolve_bundle runs."""
    calls = []
    real = hub_module.open_bundle

    def counting(path, verify=False):
        calls.append(Path(path))
        return real(path, verify=verify)

    monkeypatch.setattr(hub_module, "open_bundle", counting)
    return calls


def test_publish_then_run_by_repo_id_online_then_offline(bundle, hub, published, monkeypatch, verifications):
    path = resolve()

    assert path == repo_folder(huggingface_hub.constants.HF_HUB_CACHE, REPO) / "snapshots" / published
    local = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert files_in(path) == (local - {"profile/summary.json"}) | {"README.md"}  # no profile/ unless asked
    assert verifications == [path]
    assert (verified_cache_dir() / "org--tiny-moestream" / f"{published}.json").is_file()
    assert not any(p.name.endswith(".json") and "verified" in p.name for p in path.rglob("*"))  # nothing added to the snapshot

    model, _ = moestream.load(path)
    reference, _ = moestream.load(bundle)
    got, want = model(mx.array([PROMPT])), reference(mx.array([PROMPT]))
    assert mx.array_equal(got, want).item()  # the same bytes, the same logits

    # Again, with the Hub out of reach: from the cache, and without hashing everything again.
    go_offline(monkeypatch, hub)
    assert resolve() == path
    assert resolve(revision=published) == path
    assert verifications == [path]
    model, _ = moestream.load(path)
    assert mx.array_equal(model(mx.array([PROMPT])), want).item()


def test_profile_only_when_asked(hub, published):
    assert "profile/summary.json" not in files_in(resolve())
    path = resolve(include_profile=True)
    assert (path / "profile" / "summary.json").read_text() == '{"tokens": 128}'


def test_a_branch_and_a_private_repo(bundle, hub):
    publish_bundle(bundle, REPO, token=TOKEN, echo=None, private=True, revision="v1")
    with pytest.raises(HubError, match="no such repo on the Hub.*hf auth login"):
        resolve()  # anonymous: a private repo looks like a missing one
    path = resolve(revision="v1", token=TOKEN)
    assert path.name == hub.repos[REPO].refs["v1"]
    with pytest.raises(HubError, match="has no revision 'v2'"):
        resolve(revision="v2", token=TOKEN)


def test_offline_with_nothing_cached(hub, monkeypatch):
    go_offline(monkeypatch, hub)
    with pytest.raises(HubError) as err:
        resolve()
    message = str(err.value)
    assert message.startswith(f"HF_HUB_OFFLINE is set and {REPO}@main is not in the cache at ")
    assert "unset HF_HUB_OFFLINE" in message and "\n" not in message


def test_unknown_repo_and_network_down(hub):
    with pytest.raises(HubError, match=r"org/missing: no such local folder, and no such repo on the Hub"):
        resolve("org/missing")
    hub.down = True
    with pytest.raises(HubError, match=r"could not reach the Hub .* ConnectError"):
        resolve()


def test_a_repo_that_is_not_a_bundle(hub):
    hub.add_repo("org/checkpoint", {"config.json": b'{"model_type": "qwen3_moe"}', "model.safetensors": b"w" * 64})
    with pytest.raises(BundleError, match=r"org/checkpoint@main is not a moestream bundle: it has no bundle\.json.*"
                                          r"moestream prepare org/checkpoint"):
        resolve("org/checkpoint")

    hub.add_repo("org/other", {"bundle.json": json.dumps({"format": "something-else"}).encode()})
    with pytest.raises(BundleError, match=r"org/other@[0-9a-f]{12} is not a moestream bundle .*'something-else'"):
        resolve("org/other")


def test_a_tampered_cached_file_fails_verification(hub, published, monkeypatch, verifications):
    path = resolve()
    extent = read_layout(path / "layout.parquet")[3]
    blob = (path / extent.file).resolve()  # the cache's blobs/ file behind the snapshot's link
    data = bytearray(blob.read_bytes())
    data[extent.offset + 7] ^= 0x01
    blob.write_bytes(bytes(data))

    with pytest.raises(BundleError) as err:
        resolve()  # the file changed since it was verified: checked again, and refused
    message = str(err.value)
    assert f"{REPO}@{published[:12]}" in message and "failed verification" in message
    assert f"checksum mismatch for layer {extent.layer} expert {extent.expert}" in message
    assert "force_download=True" in message and f"hf cache rm model/{REPO}" in message
    assert len(verifications) == 2
    with pytest.raises(BundleError):
        moestream.load(path, verify=True)

    assert resolve(force_download=True) == path  # a fresh download repairs the cache
    assert blob.read_bytes() != bytes(data)


def test_a_damaged_bundle_on_the_hub_is_refused(bundle, hub):
    files = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    damaged = bytearray(files["experts/layer_001.bin"])
    damaged[0] ^= 0xFF  # the first byte of the file's first extent
    hub.add_repo(REPO, {**files, "experts/layer_001.bin": bytes(damaged)})

    with pytest.raises(BundleError, match="failed verification: .*checksum mismatch for layer 1 expert"):
        resolve()
    assert not (verified_cache_dir() / "org--tiny-moestream").exists() or not any(
        (verified_cache_dir() / "org--tiny-moestream").iterdir())


def test_local_folders_and_what_is_not_a_source(bundle, hub, tmp_path):
    assert resolve(bundle) == bundle and resolve(str(bundle)) == bundle
    assert hub.requests == []
    with pytest.raises(HubError, match="only applies to Hub repo ids"):
        resolve(bundle, revision="main")
    for bad in ("not-a-repo", "a/b/c", "org/bad--name", ""):
        with pytest.raises(HubError):
            resolve(bad)
    with pytest.raises(HubError, match="no such local folder"):
        resolve(tmp_path / "org" / "name")  # a Path is never a repo id
    assert issubclass(HubError, ValueError)
