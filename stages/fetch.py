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

import httpx2  # huggingface_hub 2.x talks HTTP through httpx2 (a fork of httpx), not httpx
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from ..runtime.hub import one_line, redact, root_cause

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
)

# Hub patterns are fnmatch patterns where "*" also matches "/": "*.safetensors" would pull in
# e.g. gpt-oss's `original/*.safetensors`, a second full copy of the weights. mlx-lm and
# transformers only read the repo root, so subfolders are skipped by default.
SUBFOLDER_PATTERNS: tuple[str, ...] = ("*/*",)

# Weight formats we recognise but cannot read, to explain a "no safetensors" error.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")

# A snapshot folder is named by the full 40-hex commit hash it holds.
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")

_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


class FetchError(ValueError):
    """The source could not be resolved to a usable checkpoint folder; the message says why."""


@dataclass(frozen=True)
class FetchedSource:
    """A checkpoint folder on local disk, and where it came from (repo fields None if local)."""

    path: Path
    repo_id: str | None
    revision: str | None
    commit: str | None


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
) -> FetchedSource:
    """Resolve `source` to a local checkpoint folder, downloading it from the Hub if needed.

    An existing directory is used as it is. A string of the form "org/name" is a Hub repo id,
    downloaded (or found in the HF cache) at `revision` (branch, tag or commit; default main).
    Raises FetchError for anything else and for every download or validation failure.
    """
    if not str(source).strip():  # Path("") is ".", which would quietly mean the current folder
        raise FetchError("empty source: expected a checkpoint folder or a Hub repo id (org/name)")
    local = Path(source).expanduser()
    if local.is_dir():  # a local folder wins over a repo id of the same name, as in transformers
        return _use_local_folder(local, revision=revision, required=required,
                                 allow_patterns=allow_patterns)
    repo_id = _as_repo_id(source, local)
    snapshot = _download(repo_id, revision=revision, cache_dir=cache_dir,
                         allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                         token=token, progress=progress)
    where = f"{repo_id} (snapshot {snapshot})"
    _check_checkpoint(snapshot, where=where, required=required, allow_patterns=allow_patterns,
                      other_files=lambda: _repo_files(repo_id, snapshot, cache_dir))
    commit = snapshot.name if _COMMIT_HASH.fullmatch(snapshot.name) else None
    return FetchedSource(path=snapshot, repo_id=repo_id,
                         revision=revision or constants.DEFAULT_REVISION, commit=commit)


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


def _as_repo_id(source: str | Path, local: Path) -> str:
    """Return `source` as a Hub repo id, or raise a FetchError saying what was tried."""
    if local.exists():
        raise FetchError(f"{source}: is a file; expected a checkpoint folder or a Hub repo id "
                         "(org/name)")
    if isinstance(source, Path):  # a Path is meant as a path, never as a repo id
        raise FetchError(f"{source}: no such local folder")
    # Only "org/name" is accepted: a bare word is far more likely a mistyped local folder than
    # one of the few legacy un-namespaced Hub repos.
    reason = "expected the form org/name" if source.count("/") != 1 else _repo_id_problem(source)
    if reason:
        raise FetchError(f"{source}: no such local folder, and not a Hugging Face repo id "
                         f"({reason})")
    return source


def _repo_id_problem(repo_id: str) -> str | None:
    try:
        validate_repo_id(repo_id)  # the Hub client's own rules, so we never drift from them
    except HFValidationError as err:
        return one_line(str(err))
    return None


# --- download ------------------------------------------------------------------------------


class _NoProgressBars(hf_tqdm):
    """huggingface_hub's tqdm, always disabled.

    Passed as `tqdm_class` instead of calling `disable_progress_bars()`, which flips a global
    switch for the whole process (and every other library's downloads) and is not thread safe.
    """

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _download(repo_id, *, revision, cache_dir, allow_patterns, ignore_patterns, token,
              progress) -> Path:
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
            token=token,
            tqdm_class=None if progress else _NoProgressBars,
        )
    except (OSError, httpx2.HTTPError) as err:  # HfHubHTTPError and LocalEntryNotFound are OSErrors
        message = _explain(err, repo_id=repo_id, revision=revision, cache_dir=cache_dir)
        raise FetchError(redact(message, token)) from err
    return Path(snapshot)


@dataclass(frozen=True)
class _Attempt:
    """What was being fetched, for error messages."""

    repo_id: str
    rev: str
    cache: Path

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.rev}"

    @property
    def url(self) -> str:
        return f"{constants.ENDPOINT}/{self.repo_id}"


def _explain(err: Exception, *, repo_id: str, revision: str | None, cache_dir) -> str:
    """One line saying what failed and what to do, from a huggingface_hub / network error."""
    attempt = _Attempt(repo_id, revision or constants.DEFAULT_REVISION,
                       Path(cache_dir or constants.HF_HUB_CACHE).expanduser())
    return (_explain_access(err, attempt) or _explain_unreachable(err, attempt)
            or _explain_other(err, attempt))


def _explain_access(err: Exception, at: _Attempt) -> str | None:
    """The Hub answered, and said no."""
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return (f"{at.repo_id} is a gated repo: accept its conditions at {at.url} and "
                f"{_LOGIN_HINT} with an account that has access")
    if isinstance(err, RevisionNotFoundError):
        return f"{at.repo_id} has no revision {at.rev!r} (expected a branch, tag or commit hash)"
    if isinstance(err, RepositoryNotFoundError):
        return (f"{at.repo_id}: no such local folder, and no such repo on the Hub ({at.url}); "
                f"if it is private, {_LOGIN_HINT}")
    if isinstance(err, DisabledRepoError):
        return f"{at.repo_id} has been disabled on the Hub"
    if isinstance(err, HfHubHTTPError) and _status(err) == 401:
        return (f"the Hub refused the credentials while fetching {at.repo_id} (HTTP 401): the "
                f"token is invalid or expired; {_LOGIN_HINT}")
    if isinstance(err, HfHubHTTPError) and _status(err) == 403:
        return (f"access to {at.repo_id} is forbidden (HTTP 403): the token lacks permission; "
                f"{_LOGIN_HINT} with a token that can read it")
    return None


def _explain_unreachable(err: Exception, at: _Attempt) -> str | None:
    """The Hub could not be used (offline, network, outage) and the cache could not stand in."""
    if isinstance(err, IncompleteSnapshotError):  # before LocalEntryNotFoundError: a subclass
        offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        return (f"the cached snapshot of {at.name} in {at.cache} is incomplete and the Hub "
                f"cannot be reached{offline}: {one_line(str(err))}")
    if not isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return None
    if constants.is_offline_mode():
        return (f"HF_HUB_OFFLINE is set and {at.name} is not in the cache at {at.cache}; unset "
                "HF_HUB_OFFLINE to download it, or point HF_HUB_CACHE at a cache that has it")
    return (f"could not reach the Hub ({constants.ENDPOINT}) to fetch {at.name}, and it is not "
            f"in the cache at {at.cache}: {root_cause(err)}")


def _explain_other(err: Exception, at: _Attempt) -> str:
    detail = one_line(str(err))
    if isinstance(err, HfHubHTTPError):
        return f"the Hub returned HTTP {_status(err)} while fetching {at.name}: {detail}"
    if isinstance(err, (httpx2.HTTPError, ConnectionError)):
        return (f"network error while fetching {at.name} from {constants.ENDPOINT}: "
                f"{type(err).__name__}: {detail}")
    return f"could not fetch {at.name} into {at.cache}: {type(err).__name__}: {detail}"


def _status(err: HfHubHTTPError) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)








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


def _repo_files(repo_id: str, snapshot: Path, cache_dir) -> list[str]:
    """All files of the repo at this commit, from the tree listing the download cached."""
    try:
        tree = huggingface_hub.get_cached_repo_tree(repo_id, revision=snapshot.name,
                                                    cache_dir=cache_dir)
        return [entry.path for entry in tree]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return [p.name for p in snapshot.iterdir()]  # older caches have no tree listing
