"""Talking to the Hugging Face Hub the way its users expect, and saying in one line what failed.

Checkpoints (stages/fetch.py) and bundles (runtime/io/hub.py) are both fetched with
`huggingface_hub.snapshot_download`, so the HF cache, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE,
tokens and resumable downloads behave as users know them from mlx-lm and transformers. This
module holds what both need: recognising a repo id, the download call, and turning the Hub
client's errors (often a paragraph of advice around a network error) into one line that says
what failed and what to do, with any token redacted.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub import errors as _errors
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

try:  # huggingface_hub 2.x talks HTTP through httpx2 (a fork of httpx); 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - huggingface_hub 1.x (as on some machines the runtime runs on)
    import httpx as _http


class _NeverRaised(Exception):
    """Stands for an error class this huggingface_hub version does not have."""


def _error(name: str) -> type[BaseException]:
    return getattr(_errors, name, _NeverRaised)


DisabledRepoError, GatedRepoError, HfHubHTTPError = _error("DisabledRepoError"), _error("GatedRepoError"), _error("HfHubHTTPError")
HFValidationError, IncompleteSnapshotError = _error("HFValidationError"), _error("IncompleteSnapshotError")
LocalEntryNotFoundError, OfflineModeIsEnabled = _error("LocalEntryNotFoundError"), _error("OfflineModeIsEnabled")
RepositoryNotFoundError, RevisionNotFoundError = _error("RepositoryNotFoundError"), _error("RevisionNotFoundError")

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def as_repo_id(source: str | Path, local: Path, error: type[Exception], what: str) -> str:
    """`source` as a Hub repo id ("org/name"), or `error` saying what was tried. `local` is the
    source as a path (which does not exist as a folder); `what` names the folder expected."""
    if local.exists():
        raise error(f"{source}: is a file; expected a {what} or a Hub repo id (org/name)")
    if isinstance(source, Path):  # a Path is meant as a path, never as a repo id
        raise error(f"{source}: no such local folder")
    # Only "org/name": a bare word is far more likely a mistyped local folder than one of the
    # few legacy un-namespaced Hub repos.
    if source.count("/") != 1:
        raise error(f"{source}: no such local folder, and not a Hugging Face repo id (expected the form org/name)")
    try:
        validate_repo_id(source)  # the Hub client's own rules, so we never drift from them
    except HFValidationError as err:
        raise error(f"{source}: no such local folder, and not a Hugging Face repo id ({one_line(str(err))})") from None
    return source


class NoProgressBars(hf_tqdm):
    """huggingface_hub's tqdm, always disabled: passed as `tqdm_class` instead of calling
    `disable_progress_bars()`, a process-wide switch that is not thread safe."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def download_snapshot(repo_id: str, *, revision: str | None, error: type[Exception], allow_patterns=None,
                      ignore_patterns=None, cache_dir=None, token=None, force_download: bool = False,
                      progress: bool = True) -> Path:
    """`snapshot_download`, with its failures raised as `error` in one line (token redacted)."""
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
            token=token, force_download=force_download, tqdm_class=None if progress else NoProgressBars,
        )
    except (OSError, _http.HTTPError) as err:  # HfHubHTTPError and LocalEntryNotFound are OSErrors
        failure = error(redact(explain(err, repo_id, revision, cache_dir), token))
        failure.transient = is_transient(err)
        raise failure from None
    return Path(path)


def is_transient(err: BaseException) -> bool:
    """Whether trying again later may succeed: the network or the Hub failed, not the request."""
    if isinstance(err, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, DisabledRepoError)):
        return False
    if isinstance(err, HfHubHTTPError):
        return (http_status(err) or 0) >= 500 or http_status(err) == 429
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return not constants.is_offline_mode()  # the Hub was unreachable; offline is a choice
    return isinstance(err, (_http.HTTPError, ConnectionError))


def explain(err: Exception, repo_id: str, revision: str | None, cache_dir=None) -> str:
    """One line saying what failed and what to do, from a huggingface_hub or network error."""
    name = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    url = f"{constants.ENDPOINT}/{repo_id}"
    status = http_status(err)
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return f"{repo_id} is a gated repo: accept its conditions at {url} and {LOGIN_HINT} with an account that has access"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} (expected a branch, tag or commit hash)"
    if isinstance(err, RepositoryNotFoundError):
        return f"{repo_id}: no such local folder, and no such repo on the Hub ({url}); if it is private, {LOGIN_HINT}"
    if isinstance(err, DisabledRepoError):
        return f"{repo_id} has been disabled on the Hub"
    if isinstance(err, HfHubHTTPError) and status == 401:
        return (f"the Hub refused the credentials while fetching {repo_id} (HTTP 401): the token is invalid or "
                f"expired; {LOGIN_HINT}")
    if isinstance(err, HfHubHTTPError) and status == 403:
        return f"access to {repo_id} is forbidden (HTTP 403): the token lacks permission; {LOGIN_HINT} with a token that can read it"
    offline = constants.is_offline_mode()
    if isinstance(err, IncompleteSnapshotError):  # before LocalEntryNotFoundError: a subclass
        return (f"the cached snapshot of {name} in {cache} is incomplete and the Hub cannot be reached"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {one_line(str(err))}")
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if offline:
            return (f"HF_HUB_OFFLINE is set and {name} is not in the cache at {cache}; unset HF_HUB_OFFLINE to "
                    "download it, or point HF_HUB_CACHE at a cache that has it")
        return f"could not reach the Hub ({constants.ENDPOINT}) to fetch {name}, and it is not in the cache at {cache}: {root_cause(err)}"
    if isinstance(err, HfHubHTTPError):
        return f"the Hub returned HTTP {status} while fetching {name}: {one_line(str(err))}; try again later"
    if isinstance(err, (_http.HTTPError, ConnectionError)):
        return f"network error while fetching {name} from {constants.ENDPOINT}: {type(err).__name__}: {one_line(str(err))}"
    return f"could not fetch {name} into {cache}: {type(err).__name__}: {one_line(str(err))}"


def http_status(err: BaseException) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def root_cause(err: BaseException) -> str:
    """The innermost cause, in one line ("ConnectError: connection refused", ...)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {one_line(str(err))}"


def one_line(text: str, limit: int = 300) -> str:
    """The first non-blank line of an error text, at most `limit` characters."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def redact(message: str, token: str | bool | None) -> str:
    """Never let a token reach a log or a terminal, whatever the upstream error text holds."""
    secrets = {token if isinstance(token, str) else None, os.environ.get("HF_TOKEN"),
               os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    try:
        secrets.add(huggingface_hub.get_token())
    except Exception:  # noqa: BLE001 - an unreadable token file must not hide the real error
        pass
    for secret in secrets:
        if secret and len(secret) >= 4:
            message = message.replace(secret, "***")
    return message
