"""publish stage: a verified bundle and its model card go to the Hub in one commit.

The real huggingface_hub client runs against the fake Hub of hf_fake.py over an injected
transport: create_repo, the preupload negotiation, LFS batch + PUT + verify for the large files
(Xet is switched off: its Rust client cannot be given a transport), and the commit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hf_fake import FakeHub, disable_xet, hub_env
from huggingface_hub import ModelCard

from moestream.manifests.layout import read_layout
from moestream.stages.card import CardError, check_card
from moestream.stages.publish import PublishError, publish_bundle

TOKEN = "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42"
REPO = "me/tiny-moestream"
LFS_THRESHOLD = 64 * 1024  # experts/*.bin and resident.safetensors go through LFS, the rest inline


@pytest.fixture
def bundle(tmp_path, bundle_dir) -> Path:
    """A private copy of the session's qwen3_moe bundle (tests may change it)."""
    return Path(shutil.copytree(bundle_dir("qwen3_moe"), tmp_path / "bundle"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    hub_env(monkeypatch, tmp_path, offline=False)
    disable_xet(monkeypatch)
    fake = FakeHub(token=TOKEN)
    fake.lfs_threshold = LFS_THRESHOLD
    with fake.installed():
        yield fake


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_digest(folder: Path) -> str:
    """Names, bytes and modes of everything in the folder: any change shows."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + oct(p.stat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def set_source(bundle: Path, **source) -> None:
    """bundle.json is not among its own checksummed files: changing its provenance keeps it valid."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["source"].update(source)
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))


def publish(bundle, **kwargs):
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("echo", None)
    return publish_bundle(bundle, REPO, **kwargs)


# --- a successful publish --------------------------------------------------------------------


def test_one_commit_with_exactly_the_bundle_files_and_card(bundle, hub):
    before = folder_digest(bundle)

    result = publish(bundle)

    [commit] = hub.commits
    expected = {**files_of(bundle), "README.md": result.card.encode()}
    assert commit.added == expected  # identical bytes, nothing else
    assert hub.files(REPO) == expected and commit.deleted == []
    assert (result.commit, commit.revision, commit.create_pr) == (commit.commit, "main", False)
    assert result.commit_url.endswith(f"/{REPO}/commit/{commit.commit}")
    assert dict(result.files) == {k: len(v) for k, v in expected.items()}
    assert result.total_bytes == sum(len(v) for v in expected.values())
    # Large files went through the LFS negotiation, small ones inline in the commit.
    assert set(commit.lfs) == {p for p, d in expected.items() if len(d) >= LFS_THRESHOLD or p.endswith(
        (".bin", ".safetensors"))}
    assert {"experts/layer_000.bin", "resident.safetensors"} <= set(commit.lfs)
    assert "README.md" not in commit.lfs and len(hub.lfs_puts) == len(commit.lfs)
    # Credentials went to the Hub only, never to the storage host.
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if "huggingface.co" in r.url)
    assert all(r.authorization is None for r in hub.requests if "fake-hub.test" in r.url)
    assert folder_digest(bundle) == before  # the card came from memory
    assert not (bundle / "README.md").exists()


def test_card_metadata_validates_with_known_source(bundle, hub):
    set_source(bundle, repo_id="Qwen/Qwen3-30B-A3B", revision="main", commit="a" * 40)

    result = publish(bundle, license="apache-2.0")

    card = ModelCard(hub.files(REPO)["README.md"].decode(), ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert data["library_name"] == "mlx" and data["pipeline_tag"] == "text-generation"
    assert {"mlx", "moestream", "qwen3_moe"} <= set(data["tags"])
    assert data["base_model"] == "Qwen/Qwen3-30B-A3B" and data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0"
    text = card.text
    assert "[Qwen/Qwen3-30B-A3B](https://huggingface.co/Qwen/Qwen3-30B-A3B) at commit `" + "a" * 40 in text
    assert "4-bit affine, group size 64" in text and "source precision" in text  # the recipe
    assert "expert bytes read per token" in text and "resident weights" in text  # the sizes
    assert "pip install moestream" in text and f"moestream generate {REPO} " in text
    assert f'moestream.load("{REPO}"' in text
    assert result.card == hub.files(REPO)["README.md"].decode()


def test_card_without_source_or_license(bundle, hub):
    publish(bundle)
    data = ModelCard(hub.files(REPO)["README.md"].decode()).data.to_dict()
    assert "base_model" not in data and "license" not in data
    assert {"mlx", "moestream"} <= set(data["tags"]) and data["library_name"] == "mlx"


def test_optional_results_are_rendered_and_uploaded(bundle, hub):
    (bundle / "quality.json").write_text(json.dumps(
        [{"metric": "perplexity", "source": 7.91, "bundle": 8.02}, {"metric": "top-1 agreement", "bundle": 0.97}]))
    (bundle / "bench.json").write_text(json.dumps({"h200": {"tokens_per_s": 41.5, "hit_rate": 0.82}}))
    (bundle / "profile").mkdir()
    (bundle / "profile" / "summary.json").write_text(json.dumps({"tokens": 4096, "mean_reuse": 0.61}))
    (bundle / "profile" / "frequency.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    (bundle / "notes.txt").write_text("not part of the bundle")

    result = publish(bundle)

    added = hub.commits[-1].added
    for rel in ("quality.json", "bench.json", "profile/summary.json", "profile/frequency.png"):
        assert added[rel] == (bundle / rel).read_bytes()
    assert "notes.txt" not in added and result.skipped == ("notes.txt",)
    text = added["README.md"].decode()
    assert "## Quality" in text and "| perplexity | 7.91 | 8.02 |" in text
    assert "## Benchmarks" in text and "| h200 | 41.5 | 0.82 |" in text
    assert "## Routing profile" in text and "| mean_reuse | 0.61 |" in text
    assert "![frequency](profile/frequency.png)" in text


def test_private_and_create_pr_pass_through(bundle, hub):
    first = publish(bundle, private=True)
    assert hub.created[-1]["visibility"] == "private" and hub.repos[REPO].private and first.private
    main = hub.files(REPO)

    (bundle / "quality.json").write_text('{"perplexity": 8.0}')
    pr = publish(bundle, create_pr=True)

    commit = hub.commits[-1]
    assert commit.create_pr and commit.revision == "refs/pr/1"
    assert pr.pr_url == f"https://huggingface.co/{REPO}/discussions/1"
    assert hub.files(REPO) == main  # main untouched until the PR is merged
    assert hub.files(REPO, "refs/pr/1")["quality.json"] == b'{"perplexity": 8.0}'


def test_private_upload_into_an_existing_public_repo_is_refused(bundle, hub):
    hub.add_repo(REPO, {"old.txt": b"public"})
    state = hub.state()
    with pytest.raises(PublishError, match="already exists and is public"):
        publish(bundle, private=True)
    assert hub.state() == state and hub.commits == []


def test_publish_to_a_branch(bundle, hub):
    hub.add_repo(REPO, {"old.txt": b"x"})
    publish(bundle, revision="v1")
    assert hub.files(REPO) == {"old.txt": b"x"}
    assert "bundle.json" in hub.files(REPO, "v1") and hub.commits[-1].revision == "v1"
    with pytest.raises(PublishError, match="pull request is opened against main"):
        publish(bundle, revision="v1", create_pr=True)


def test_token_from_the_environment(bundle, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    publish(bundle, token=None)
    assert hub.commits and all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if "huggingface.co" in r.url)


# --- dry run ---------------------------------------------------------------------------------


def test_dry_run_uploads_nothing_and_prints_every_file(bundle, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = folder_digest(bundle)
    printed = []

    result = publish_bundle(bundle, REPO, dry_run=True, echo=printed.append)

    assert hub.requests == [] and hub.commits == [] and REPO not in hub.repos
    [out] = printed
    for rel, data in files_of(bundle).items():
        assert f"add {rel} " in out and f"{len(data):,} bytes" in out
    assert "add README.md" in out and result.card in out  # the card, whole
    assert "HF_TOKEN" in out and TOKEN not in out
    assert result.dry_run and result.commit is None and dict(result.files)["README.md"] == len(result.card)
    assert folder_digest(bundle) == before


# --- failures --------------------------------------------------------------------------------


def _wrong_token(hub):
    return TOKEN[:-1] + "X"


HUB_FAILURES = {
    # name: (set the fault up, expected words in the message)
    "401": (lambda hub: None, ("HTTP 401", "invalid or expired", "hf auth login")),
    "403": (lambda hub: hub.fail("POST", f"/{REPO}/commit/main", 403, headers={"X-Error-Message": "read-only token"}),
            ("HTTP 403", "write access")),
    "404": (lambda hub: hub.fail("POST", f"/{REPO}/preupload/main", 404,
                                 headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
            ("HTTP 404", "not found", "check the namespace")),
    "409": (lambda hub: hub.fail("POST", f"/{REPO}/commit/main", 409, headers={
        "X-Error-Message": "A commit has happened since. Please refresh and try again."}),
            ("HTTP 409", "conflict", "run publish again")),
    "500": (lambda hub: hub.fail("POST", f"/{REPO}/commit/main", 500, headers={
        "X-Error-Message": f"internal error (token {TOKEN})"}), ("HTTP 500", "try again later")),
    "network": (lambda hub: setattr(hub, "down", True), ("could not reach the Hub", "ConnectError")),
}


@pytest.mark.parametrize("failure", list(HUB_FAILURES))
def test_hub_errors_leave_repo_and_bundle_as_they_were(failure, bundle, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # a token from the environment must not leak either
    hub.add_repo(REPO, {"README.md": b"---\nlibrary_name: mlx\n---\nold", "old.txt": b"x"})
    setup, words = HUB_FAILURES[failure]
    setup(hub)
    state, before = hub.state(), folder_digest(bundle)

    with pytest.raises(PublishError) as err:
        publish(bundle, token=_wrong_token(hub) if failure == "401" else TOKEN)

    message = str(err.value)
    for word in words:
        assert word in message, message
    assert "nothing was committed" in message and "\n" not in message
    assert TOKEN not in message and _wrong_token(hub) not in message
    assert isinstance(err.value, ValueError)
    assert hub.state() == state and hub.commits == []  # the repo is as it was
    assert folder_digest(bundle) == before


def test_failed_lfs_upload_commits_nothing(bundle, hub):
    hub.add_repo(REPO, {"old.txt": b"x"})
    state = hub.state()
    hub.fail("PUT", "", 403, times=100)  # the storage host refuses every object

    with pytest.raises(PublishError, match="HTTP 403"):
        publish(bundle)
    assert hub.state() == state and hub.commits == []


def test_corrupted_bundle_is_refused_before_any_upload(bundle, hub):
    extent = read_layout(bundle / "layout.parquet")[5]
    path = bundle / extent.file
    data = bytearray(path.read_bytes())
    data[extent.offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(PublishError, match=r"refusing to publish a damaged bundle: .*checksum mismatch for layer "
                                           rf"{extent.layer} expert {extent.expert}"):
        publish(bundle)
    assert hub.requests == [] and REPO not in hub.repos


def test_offline_and_bad_repo_ids_fail_before_anything(bundle, hub, monkeypatch):
    for bad in ("tiny-moestream", "me/bad--name", "a/b/c", ""):
        with pytest.raises(PublishError, match="repo id"):
            publish_bundle(bundle, bad, token=TOKEN, echo=None)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        publish(bundle)
    assert hub.requests == []
    assert publish(bundle, dry_run=True).dry_run  # a dry run needs no network


def test_check_card_rejects_cards_the_hub_would_not_list():
    with pytest.raises(CardError, match="no YAML metadata"):
        check_card("# just text\n")
    with pytest.raises(CardError, match="does not parse"):
        check_card("---\ntags: [mlx\n---\n")
    with pytest.raises(CardError, match="library_name"):
        check_card("---\nlibrary_name: transformers\ntags: [mlx, moestream]\n---\n")
    with pytest.raises(CardError, match="lack moestream"):
        check_card("---\nlibrary_name: mlx\ntags: [mlx]\n---\n")
