"""Bundles by Hub repo id: `resolve_bundle("org/name")` -> a verified bundle folder in the HF cache.

A local folder is returned as it is. A repo id is fetched with huggingface_hub (so the HF cache,
HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, tokens and resumable downloads behave as users know them
from mlx-lm and transformers) in two steps: `bundle.json` first, which says what the bundle is
made of, then exactly the files it lists (plus README.md and the optional results; `profile/`
only when asked) at the same commit. The snapshot is then verified (structure and every checksum),
because a bundle from the Hub is untrusted input.

Verification reads every byte, which for a large model takes minutes, so a successful one is
remembered outside the HF cache, in `<moestream cache>/verified/<org>--<name>/<commit>.json`
(moestream cache: $MOESTREAM_CACHE, else $XDG_CACHE_HOME/moestream, else ~/.cache/moestream),
together with the size, mtime and inode of every file it covered: a later load of the same
commit skips the hashing unless a file changed since.

This module is part of the runtime: it imports neither Prefect nor moestream.stages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from huggingface_hub import constants

from ...common.errors import MoestreamError
from ...common.files import write_json_atomic
from ...common.hub import as_repo_id, download_snapshot
from ...manifests.bundle import BUNDLE_JSON, FORMAT_VERSION, BundleError, read_bundle_json
from ...manifests.open import open_bundle

logger = logging.getLogger(__name__)

# Besides what bundle.json lists: the model card and the optional results (small files).
EXTRA_FILES = ("README.md", "quality.json", "bench.json")
PROFILE_PATTERN = "profile/*"
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class HubError(MoestreamError, ValueError):
    """A bundle could not be fetched from the Hub (or found in the cache); the message says why."""


def resolve_bundle(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    include_profile: bool = False,
    force_download: bool = False,
    progress: bool = True,
) -> Path:
    """A local bundle folder for `source`: a folder as it is, or a Hub repo id downloaded and verified.

    `revision` (branch, tag or commit; default main) and `cache_dir` (default: the HF cache) apply
    to repo ids. Raises HubError when the bundle cannot be fetched (no such repo, no access, offline
    and not cached, network), BundleError when the repo is not a moestream bundle or its files do
    not match their checksums.
    """
    if not str(source).strip():
        raise HubError("empty source: expected a bundle folder or a Hub repo id (org/name)")
    local = Path(source).expanduser()
    if local.is_dir():  # a local folder wins over a repo id of the same name
        if revision is not None:
            raise HubError(f"{source} is a local folder: a revision ({revision!r}) only applies to Hub repo ids")
        return local
    repo_id = as_repo_id(source, local, HubError, "bundle folder")
    # snapshot_download, not hf_hub_download, for bundle.json too: with the network down it falls back
    # to the cache at once, where hf_hub_download first retries for ~20 s.
    snapshot = _download_snapshot(repo_id, revision, patterns=[BUNDLE_JSON], cache_dir=cache_dir, token=token,
                                  force_download=force_download, progress=False)
    commit = snapshot.name
    if not _COMMIT_HASH.fullmatch(commit):
        raise HubError(f"{repo_id}: unexpected cache layout at {snapshot} (not a snapshots/<commit> folder)")
    where = f"{repo_id}@{commit[:12]}"
    if not (snapshot / BUNDLE_JSON).is_file():
        raise BundleError(
            f"{repo_id}@{revision or constants.DEFAULT_REVISION} is not a moestream bundle: it has no {BUNDLE_JSON}; "
            f"if it is a model checkpoint, make a bundle from it first (moestream prepare {repo_id} --out DIR)"
        )
    try:
        meta = read_bundle_json(snapshot)
    except BundleError as err:
        raise BundleError(f"{where} is not a moestream bundle (format {FORMAT_VERSION}): {err}") from None
    snapshot = _download_snapshot(repo_id, commit, patterns=_patterns(meta, where, include_profile),
                                  cache_dir=cache_dir, token=token, force_download=force_download,
                                  progress=progress)
    _verify_once(repo_id, commit, snapshot)
    return snapshot


# --- what to fetch -----------------------------------------------------------------------------


def _literal(path: str) -> str:
    """An fnmatch pattern matching exactly `path` (bundle.json is untrusted: no wildcards from it)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _patterns(meta: dict, where: str, include_profile: bool) -> list[str]:
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and k for k in files):
        raise BundleError(f"{where}: {BUNDLE_JSON} 'files' must map paths to sizes and checksums")
    patterns = [_literal(p) for p in (BUNDLE_JSON, *EXTRA_FILES, *sorted(files))]
    if include_profile:
        patterns.append(PROFILE_PATTERN)
    return list(dict.fromkeys(patterns))


# --- download ------------------------------------------------------------------------------------


def _download_snapshot(repo_id, revision, *, patterns, cache_dir, token, force_download, progress) -> Path:
    return download_snapshot(repo_id, revision=revision, error=HubError, allow_patterns=patterns, cache_dir=cache_dir,
                             token=token, force_download=force_download, progress=progress)


# --- verification, once per commit ------------------------------------------------------------


def verified_cache_dir() -> Path:
    """Where successful verifications are remembered (outside the HF cache)."""
    base = os.environ.get("MOESTREAM_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moestream"
    return Path(base).expanduser() / "verified"


def _marker(repo_id: str, commit: str) -> Path:
    return verified_cache_dir() / repo_id.replace("/", "--") / f"{commit}.json"


def _fingerprint(snapshot: Path, meta: dict) -> dict[str, list[int]]:
    """size, mtime and inode of every file verification covers (through the cache's links)."""
    out = {}
    for rel in sorted({BUNDLE_JSON, *meta["files"]}):
        st = os.stat(snapshot / rel)
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _verify_once(repo_id: str, commit: str, snapshot: Path) -> None:
    marker = _marker(repo_id, commit)
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = None
    where = f"{repo_id}@{commit[:12]} (cached at {snapshot})"
    try:
        if recorded and recorded.get("snapshot") == str(snapshot):
            try:
                if recorded.get("files") == _fingerprint(snapshot, read_bundle_json(snapshot)):
                    logger.debug("%s: verified before, files unchanged", where)
                    return
            except OSError:
                pass  # a file went missing: open_bundle below says which
        logger.info("verifying %s: checking every checksum once", where)
        bundle = open_bundle(snapshot, verify=True)
    except BundleError as err:
        marker.unlink(missing_ok=True)
        raise BundleError(
            f"{where} failed verification: {err}; download it again (force_download=True, or remove it with "
            f"`hf cache rm model/{repo_id}`); if a fresh copy fails too, the bundle on the Hub is damaged"
        ) from None
    record = {"repo_id": repo_id, "commit": commit, "snapshot": str(snapshot),
              "files": _fingerprint(snapshot, bundle.meta)}
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, record)
    except OSError as err:  # a read-only home only costs a re-verification next time
        logger.warning("could not record the verification of %s in %s: %s", where, marker, err)
