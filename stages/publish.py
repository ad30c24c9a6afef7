"""publish: put a verified bundle on the Hugging Face Hub in one atomic commit.

Steps: verify every checksum of the local bundle (a damaged bundle is never uploaded), render
its model card, create the repo if needed, then one `create_commit` holding exactly the
bundle's files plus README.md. huggingface_hub negotiates each file's upload (inline, LFS or
Xet) before the commit; the commit itself is the only step that changes the repo, so a failure
anywhere leaves the repo as it was. The local bundle is only read: the card travels from
memory. Auth is huggingface_hub's own (the token argument, HF_TOKEN, or `hf auth login`), and
a token never appears in an error, a log line or the dry-run output.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2  # huggingface_hub 2.x talks HTTP through httpx2
import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..common.errors import MoestreamError
from ..common.hub import one_line, redact
from ..common.versions import package_version
from ..manifests.bundle import BUNDLE_JSON, BundleError
from ..manifests.open import Bundle, open_bundle
from .card import BENCH_FILE, PROFILE_DIR, QUALITY_FILE, CardError, check_card, fmt_size, render_card

CARD_FILE = "README.md"
_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN to a token with write access"


class PublishError(MoestreamError, ValueError):
    """Publishing failed; the message says what failed and what to do. Nothing was committed."""


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    nbytes: int
    local: Path | None  # None: the model card, uploaded from memory


@dataclass(frozen=True)
class PublishPlan:
    """What one commit will hold: the bundle's files (sorted) and then README.md."""

    bundle: Path
    repo_id: str
    files: tuple[UploadFile, ...]
    card: str
    skipped: tuple[str, ...] = ()  # files in the folder that are not part of the bundle

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    url: str
    revision: str
    dry_run: bool
    files: tuple[tuple[str, int], ...]  # (path in repo, bytes), README.md last
    total_bytes: int
    card: str
    commit: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    private: bool | None = None
    skipped: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        if self.dry_run:
            return f"dry run: nothing uploaded ({len(self.files)} files, {fmt_size(self.total_bytes)})"
        where = self.pr_url or self.commit_url or self.url
        return f"published {len(self.files)} files ({fmt_size(self.total_bytes)}) to {self.repo_id}: {where}"


# --- the steps -------------------------------------------------------------------------------


def check_bundle(path: str | Path) -> Bundle:
    """Open the bundle and check every checksum; a PublishError says what is wrong."""
    try:
        return open_bundle(Path(path), verify=True)
    except BundleError as err:
        raise PublishError(f"{path}: refusing to publish a damaged bundle: {err}") from err


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PublishError(f"{repo_id!r} is not a Hub repo id: expected the form namespace/name "
                           "(your user name or an organization, then the repo name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"{repo_id!r} is not a valid Hub repo id: {one_line(str(err))}") from None
    return repo_id


def check_options(repo_id: str, *, create_pr: bool = False, revision: str | None = None) -> None:
    """Refuse what cannot work before anything is read or sent."""
    check_repo_id(repo_id)
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise PublishError(f"a pull request is opened against {constants.DEFAULT_REVISION}; "
                           f"drop --revision {revision} or --create-pr")


def dry_run_result(plan: PublishPlan, *, private: bool = False, revision: str | None = None) -> PublishResult:
    return PublishResult(
        repo_id=plan.repo_id, url=f"{constants.ENDPOINT}/{plan.repo_id}",
        revision=revision or constants.DEFAULT_REVISION, dry_run=True,
        files=tuple((f.path_in_repo, f.nbytes) for f in plan.files), total_bytes=plan.total_bytes,
        card=plan.card, private=private, skipped=plan.skipped,
    )


def bundle_files(bundle: Bundle) -> tuple[list[str], list[str]]:
    """(files to upload, files left out): bundle.json, every file bundle.json lists, and the
    optional results (profile/, quality.json, bench.json). A README.md in the folder is left out
    unless bundle.json lists it (then it is part of the checksummed bundle and is kept as is)."""
    root = bundle.root
    listed = set(bundle.meta["files"])
    optional = {QUALITY_FILE, BENCH_FILE}
    keep, skipped = [], []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if rel == BUNDLE_JSON or rel in listed or rel in optional or (
                rel.startswith(PROFILE_DIR + "/") and not any(p.startswith(".") for p in Path(rel).parts)):
            if not path.is_file():  # a dangling link (open_bundle checked the listed files' links)
                raise PublishError(f"{root}: {rel} is not a readable file")
            keep.append(rel)
        elif rel != CARD_FILE:
            skipped.append(rel)
    missing = sorted(listed - set(keep))
    if missing:  # open_bundle checked they exist: only a concurrent change gets here
        raise PublishError(f"{root}: {', '.join(missing[:3])} listed in {BUNDLE_JSON} but missing")
    return keep, skipped


def plan_upload(bundle: Bundle, repo_id: str, *, license: str | None = None) -> PublishPlan:
    """The commit's content: the bundle's files and a generated model card (unless the bundle
    itself lists README.md among its checksummed files: then that one is uploaded unchanged)."""
    check_repo_id(repo_id)
    names, skipped = bundle_files(bundle)
    files = [UploadFile(rel, (bundle.root / rel).stat().st_size, bundle.root / rel) for rel in names]
    size = sum(f.nbytes for f in files)
    try:
        if CARD_FILE in names:
            card = (bundle.root / CARD_FILE).read_text()
            check_card(card)
        else:
            card = render_card(bundle, repo_id, license=license, download_bytes=size)
            files.append(UploadFile(CARD_FILE, len(card.encode()), None))
    except CardError as err:
        raise PublishError(f"{bundle.root}: {err}") from err
    return PublishPlan(bundle.root, repo_id, tuple(files), card, tuple(skipped))


def format_plan(plan: PublishPlan, *, private: bool, create_pr: bool, revision: str | None,
                token: str | bool | None) -> str:
    """What a dry run prints: the operations, where they go, which credentials, and the card."""
    width = max(len(f.path_in_repo) for f in plan.files)
    target = "a pull request against " if create_pr else ""
    lines = [
        f"dry run: nothing is uploaded. A real run makes one commit to {target}"
        f"{constants.ENDPOINT}/{plan.repo_id} (branch {revision or constants.DEFAULT_REVISION}; "
        f"{'private' if private else 'visibility: the namespace default'} if the repo is created), authenticated by {_token_source(token)}:",
    ]
    for f in plan.files:
        note = "  (model card, generated)" if f.local is None else ""
        lines.append(f"  add {f.path_in_repo:<{width}}  {f.nbytes:>15,} bytes{note}")
    lines.append(f"  {len(plan.files)} files, {plan.total_bytes:,} bytes ({fmt_size(plan.total_bytes)})")
    if plan.skipped:
        lines.append(f"  not part of the bundle, left out: {', '.join(plan.skipped)}")
    lines += [f"--- {CARD_FILE} ---", plan.card.rstrip("\n"), f"--- end of {CARD_FILE} ---"]
    return "\n".join(lines)


def commit_plan(plan: PublishPlan, *, private: bool = False, create_pr: bool = False,
                token: str | bool | None = None, revision: str | None = None,
                commit_message: str | None = None) -> PublishResult:
    """Create the repo if needed and upload the plan in one commit; PublishError on any failure."""
    repo_id = plan.repo_id
    check_options(repo_id, create_pr=create_pr, revision=revision)
    api = HfApi(token=token, library_name="moestream", library_version=package_version("moestream") or "unknown")
    step = "creating the repo"
    try:
        # private=None (not False) lets a new repo follow the namespace's default visibility
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        actual_private = None
        if private:  # an existing public repo stays public: never upload a private bundle there
            step = "checking the repo's visibility"
            actual_private = api.repo_info(repo_id).private
            if actual_private is False:
                raise PublishError(f"{repo_id} already exists and is public, and a private upload was asked "
                                   "for: nothing was uploaded; make the repo private on the Hub first, or "
                                   "publish under another name")
        if revision not in (None, constants.DEFAULT_REVISION):
            step = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the bundle"
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                         path_or_fileobj=str(f.local) if f.local else plan.card.encode())
                      for f in plan.files]
        with warnings.catch_warnings():  # layout.parquet is part of a model, not a dataset
            warnings.filterwarnings("ignore", message=".*commit a data file.*", category=UserWarning)
            info = api.create_commit(
                repo_id, operations, commit_message=commit_message or _commit_message(plan),
                commit_description=_commit_description(plan), revision=revision, create_pr=create_pr,
            )
    except PublishError:
        raise
    except Exception as err:  # from the Hub client: HTTP, network, LFS/Xet upload, YAML check
        cause, where = _unwrap(err)
        if where:  # e.g. "Error while uploading 'experts/layer_001.bin' to the Hub."
            step = f"{step}: {where}"
        # `from None`: the chained upstream error could echo whatever the server said
        raise PublishError(redact(_explain(cause, repo_id=repo_id, step=step, revision=revision),
                                   token)) from None
    return PublishResult(
        repo_id=repo_id, url=f"{constants.ENDPOINT}/{repo_id}", revision=revision or constants.DEFAULT_REVISION,
        dry_run=False, files=tuple((f.path_in_repo, f.nbytes) for f in plan.files),
        total_bytes=plan.total_bytes, card=plan.card, commit=info.oid, commit_url=info.commit_url,
        pr_url=info.pr_url, private=actual_private,
        skipped=plan.skipped,
    )


def publish_bundle(
    bundle: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    echo: Callable[[str], None] | None = print,
) -> PublishResult:
    """Verify `bundle`, write its model card and upload both to `repo_id` in one commit.

    `dry_run` verifies and prints the operations and the card through `echo`, and contacts
    nobody. Raises PublishError (a ValueError) with a one-line message on every failure; the
    local bundle is never modified.
    """
    check_options(repo_id, create_pr=create_pr, revision=revision)
    if not dry_run and constants.is_offline_mode():  # before hashing a bundle of hundreds of GB
        raise PublishError(f"cannot publish {repo_id} while HF_HUB_OFFLINE is set; unset it and run again, "
                           "or use a dry run")
    verified = check_bundle(bundle)
    plan = plan_upload(verified, repo_id, license=license)
    if dry_run:
        if echo is not None:
            echo(format_plan(plan, private=private, create_pr=create_pr, revision=revision, token=token))
        return dry_run_result(plan, private=private, revision=revision)
    result = commit_plan(plan, private=private, create_pr=create_pr, token=token, revision=revision,
                         commit_message=commit_message)
    if echo is not None:
        echo(result.summary())
    return result


# --- commit text -----------------------------------------------------------------------------


def _commit_message(plan: PublishPlan) -> str:
    return f"Upload moestream bundle ({len(plan.files)} files, {fmt_size(plan.total_bytes)})"


def _commit_description(plan: PublishPlan) -> str:
    return (f"Published with moestream {package_version('moestream') or 'unknown'} from a verified bundle: every checksum in "
            f"{BUNDLE_JSON} and layout.parquet was checked before the upload.")


# --- errors ----------------------------------------------------------------------------------


def _explain(err: Exception, *, repo_id: str, step: str, revision: str | None) -> str:
    """One line: what failed, and what to do. Nothing was committed in any of these cases."""
    status = _status(err)
    detail = _server_message(err)
    nothing = "nothing was committed"
    if isinstance(err, OfflineModeIsEnabled) or (constants.is_offline_mode() and status is None):
        return (f"cannot publish {repo_id} while HF_HUB_OFFLINE is set ({step}); unset it and run again "
                f"({nothing})")
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no branch {revision!r} ({step}): {detail}; {nothing}"
    if status == 401:
        return (f"the Hub refused the credentials while {step} for {repo_id} (HTTP 401): the token is missing, "
                f"invalid or expired; {_LOGIN_HINT} ({nothing})")
    if status == 403:
        return (f"the token may not write to {repo_id} (HTTP 403 while {step}): it is read-only or has no write "
                f"access to the namespace {repo_id.split('/')[0]}; {_LOGIN_HINT} ({nothing})")
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        return (f"{repo_id} was not found while {step} (HTTP 404): check the namespace and name, and that the "
                f"token can see the repo; {_LOGIN_HINT} ({nothing})")
    if status == 409:
        return (f"the Hub reported a conflict while {step} for {repo_id} (HTTP 409: {detail}): the repo changed "
                f"meanwhile or an operation on it is in progress; {nothing}; run publish again")
    if status == 429:
        return f"the Hub is rate limiting requests (HTTP 429 while {step}); {nothing}; wait a while and run again"
    if status is not None and status >= 500:
        return (f"the Hub failed while {step} for {repo_id} (HTTP {status}: {detail}); {nothing}; "
                "try again later")
    if status is not None:
        return f"the Hub returned HTTP {status} while {step} for {repo_id}: {detail}; {nothing}"
    if isinstance(err, (httpx2.HTTPError, ConnectionError)):
        return (f"could not reach the Hub ({constants.ENDPOINT}) while {step}: {type(err).__name__}: "
                f"{one_line(str(err))}; check the network and run again ({nothing})")
    if isinstance(err, ValueError):  # e.g. the Hub rejected the card's YAML, or an LFS object
        return f"the Hub rejected the upload while {step} for {repo_id}: {one_line(str(err))}; {nothing}"
    return f"publishing to {repo_id} failed while {step}: {type(err).__name__}: {one_line(str(err))}; {nothing}"


def _unwrap(err: BaseException) -> tuple[BaseException, str | None]:
    """The HTTP/network error inside the client's wrappers (an LFS upload failure comes as a
    RuntimeError naming the file, caused by the HTTP error), and the wrapper's own words."""
    outer, seen = err, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (HfHubHTTPError, httpx2.HTTPError, OSError)):
            return err, (one_line(str(outer)).rstrip(".") if outer is not err else None)
        err = err.__cause__ or err.__context__
    return outer, None


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None) if isinstance(err, HfHubHTTPError) else None


def _server_message(err: Exception) -> str:
    """The Hub's own short reason (X-Error-Message), else the first line of the error."""
    response = getattr(err, "response", None)
    if response is not None:
        message = response.headers.get("X-Error-Message")
        if message:
            return one_line(message)
    return one_line(str(err))




def _token_source(token: str | bool | None) -> str:
    """Where the credentials come from, never what they are."""
    if token is False:
        return "no token (token=False)"
    if isinstance(token, str):
        return "the token passed in"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token in HF_TOKEN"
    if huggingface_hub.get_token():
        return "the stored login (hf auth login)"
    return "no token found (a real run needs `hf auth login` or HF_TOKEN)"

