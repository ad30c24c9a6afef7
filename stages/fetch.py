"""fetch: turn a source (a local checkpoint folder or a Hub repo id) into a local folder.

Downloads go through `huggingface_hub.snapshot_download`, so the HF cache layout, HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE, tokens and per-file resume all behave the way the user already
knows from transformers and mlx-lm. This module only adds what the pipeline needs on top: the
choice of files, a check that the result is a usable safetensors checkpoint, and errors that
say in one line what went wrong and what to do about it.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import CachedRepoTreeNotFoundError

from ..common.errors import MoestreamError
from ..common.hub import as_repo_id, download_snapshot
from ..manifests.safetensors_index import indexed_shards, weight_names

# What a checkpoint needs to be profiled, quantized and run: config, weights, tokenizer, chat
# template. Image/audio processor configs are left out on purpose (text models only).
CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "bundle.json",  # so that a moestream bundle given as the source is recognised and refused
)

# Hub patterns are fnmatch patterns where "*" also matches "/": "*.safetensors" would pull in
# e.g. gpt-oss's `original/*.safetensors`, a second full copy of the weights. mlx-lm and
# transformers only read the repo root, so subfolders are skipped by default.
SUBFOLDER_PATTERNS: tuple[str, ...] = ("*/*",)

# Weight formats we recognise but cannot read, to explain a "no safetensors" error.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")

# A snapshot folder is named by the full 40-hex commit hash it holds.
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class FetchError(MoestreamError, ValueError):
    """The source could not be resolved to a usable checkpoint folder; the message says why."""


@dataclass(frozen=True)
class FetchedSource:
    """A checkpoint folder on local disk, and where it came from (repo fields None if local)."""

    path: Path
    repo_id: str | None
    revision: str | None
    commit: str | None
    # weights=False: the weight files of the repo at this commit, not downloaded yet (the index's
    # shards, else the root *.safetensors); () when they are in `path`
    weight_files: tuple[str, ...] = ()


def fetch_source(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    allow_patterns: Sequence[str] | None = CHECKPOINT_PATTERNS,
    ignore_patterns: Sequence[str] | None = SUBFOLDER_PATTERNS,
    required: Sequence[str] = ("config.json",),
    token: str | bool | None = None,
    progress: bool = True,
    weights: bool = True,
) -> FetchedSource:
    """Resolve `source` to a local checkpoint folder, downloading it from the Hub if needed.

    An existing directory is used as it is. A string of the form "org/name" is a Hub repo id,
    downloaded (or found in the HF cache) at `revision` (branch, tag or commit; default main).
    weights=False downloads everything of a repo but its *.safetensors weights, which are then
    fetched shard by shard as they are needed (stages/shards.py); the result names them.
    Raises FetchError for anything else and for every download or validation failure.
    """
    if not str(source).strip():  # Path("") is ".", which would quietly mean the current folder
        raise FetchError("empty source: expected a checkpoint folder or a Hub repo id (org/name)")
    local = Path(source).expanduser()
    if local.is_dir():  # a local folder wins over a repo id of the same name, as in transformers
        return _use_local_folder(local, revision=revision, required=required,
                                 allow_patterns=allow_patterns)
    repo_id = as_repo_id(source, local, FetchError, "checkpoint folder")
    later = not weights and _wants_safetensors(allow_patterns)
    if later:  # the weights' names come from the index or the repo's file listing instead
        ignore_patterns = [*(ignore_patterns or ()), "*.safetensors"]
    snapshot = download_snapshot(repo_id, revision=revision, error=FetchError, cache_dir=cache_dir,
                                 allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                 token=token, progress=progress)
    where = f"{repo_id} (snapshot {snapshot})"
    files = lambda: _repo_files(repo_id, snapshot, cache_dir)  # noqa: E731
    _check_checkpoint(snapshot, where=where, required=required, other_files=files,
                      allow_patterns=() if later else allow_patterns)  # (): no weights in the folder to check
    commit = snapshot.name if _COMMIT_HASH.fullmatch(snapshot.name) else None
    shards = _weights_to_fetch(snapshot, where=where, repo_files=files()) if later else ()
    return FetchedSource(path=snapshot, repo_id=repo_id,
                         revision=revision or constants.DEFAULT_REVISION, commit=commit, weight_files=shards)


# --- sources -------------------------------------------------------------------------------


def _use_local_folder(path: Path, *, revision, required, allow_patterns) -> FetchedSource:
    if revision is not None:
        # A folder has no revisions; silently ignoring one would record a wrong provenance.
        raise FetchError(f"{path} is a local folder: a revision ({revision!r}) only applies "
                         "to Hub repo ids")
    path = path.resolve()
    _check_checkpoint(path, where=str(path), required=required, allow_patterns=allow_patterns,
                      other_files=lambda: [p.name for p in path.iterdir()])
    return FetchedSource(path=path, repo_id=None, revision=None, commit=None)


# --- validation ----------------------------------------------------------------------------


def _check_checkpoint(folder: Path, *, where: str, required, allow_patterns, other_files) -> None:
    """Raise FetchError unless `folder` holds the required files and safetensors weights."""
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FetchError(f"{where} lacks {', '.join(missing)}: not a Hugging Face model checkpoint")
    if _wants_safetensors(allow_patterns):
        _check_safetensors(folder, where=where, other_files=other_files)


def _wants_safetensors(allow_patterns) -> bool:
    if allow_patterns is None:
        return True
    return any(fnmatch.fnmatch("model.safetensors", pattern) for pattern in allow_patterns)


def _check_safetensors(folder: Path, *, where: str, other_files) -> None:
    if not any(p.is_file() for p in folder.glob("*.safetensors")):  # is_file: no dangling links
        others = sorted(f for f in other_files() if f.endswith(_OTHER_WEIGHT_SUFFIXES))
        more = ", ..." if len(others) > 3 else ""
        found = f" (it has {', '.join(others[:3])}{more})" if others else ""
        raise FetchError(f"{where} has no *.safetensors weights{found}: moestream reads "
                         "safetensors checkpoints only; use a safetensors copy of the model")
    _check_index(folder, where=where)


def _check_index(folder: Path, *, where: str) -> None:
    """A sharded checkpoint must have every shard its index names (catches partial copies)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise FetchError(f"{where}: malformed model.safetensors.index.json ({err})") from err
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise FetchError(f"{where} is incomplete: model.safetensors.index.json names "
                         f"{len(missing)} missing shard(s): {', '.join(missing[:3])}")


def _weights_to_fetch(snapshot: Path, *, where: str, repo_files: list[str]) -> tuple[str, ...]:
    """The weight files of a snapshot whose weights are not downloaded: the shards its
    model.safetensors.index.json names (each checked to be in the repo), else the root
    model*.safetensors (else every root *.safetensors), as transformers and mlx-lm look for them."""
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = indexed_shards(index)
        missing = [s for s in shards if s not in repo_files]
        if missing and any(f.endswith(".safetensors") for f in repo_files):  # else: no listing to check against
            raise FetchError(f"{where} is incomplete: model.safetensors.index.json names {len(missing)} shard(s) "
                             f"the repo does not have: {', '.join(missing[:3])}")
        return tuple(shards)
    found = tuple(weight_names(repo_files))
    if not found:
        others = sorted(f for f in repo_files if f.endswith(_OTHER_WEIGHT_SUFFIXES))
        more = ", ..." if len(others) > 3 else ""
        has = f" (it has {', '.join(others[:3])}{more})" if others else ""
        raise FetchError(f"{where} has no *.safetensors weights{has}: moestream reads "
                         "safetensors checkpoints only; use a safetensors copy of the model")
    return found


def _repo_files(repo_id: str, snapshot: Path, cache_dir) -> list[str]:
    """All files of the repo at this commit, from the tree listing the download cached."""
    try:
        tree = huggingface_hub.get_cached_repo_tree(repo_id, revision=snapshot.name,
                                                    cache_dir=cache_dir)
        return [entry.path for entry in tree]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return [p.name for p in snapshot.iterdir()]  # older caches have no tree listing
