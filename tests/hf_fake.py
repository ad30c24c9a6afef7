"""Offline stand-ins for the Hugging Face Hub, for tests that exercise real huggingface_hub code.

Two pieces, both faithful to huggingface_hub 2.x rather than mocks of our own code:

* `build_fake_cache` writes a repo into an HF cache folder in the exact on-disk layout that
  `snapshot_download` produces (`models--org--name/{blobs,snapshots,refs,trees}`), so downloads
  with HF_HUB_OFFLINE=1 find it.
* `FakeHub` is an `httpx2.MockTransport` handler that plays the Hub's side of the HTTP protocol
  (model info, tree listing, HEAD/GET `/resolve`, an LFS redirect to a CDN host, error codes,
  and a minimal `create_commit`: preupload + commit), installed with
  `huggingface_hub.set_client_factory`, so online code paths run without a network.
  By default every upload is "regular" (bytes inline in the commit); set `lfs_threshold` to
  have larger files negotiated the way the Hub does it: preupload says "lfs", the client
  asks the LFS batch endpoint, PUTs the bytes to a storage URL, verifies, and the commit only
  names the object (`lfsFile`). Xet uploads go through hf_xet's own (Rust) HTTP client, which
  no transport can reach: tests of LFS uploads use `disable_xet(monkeypatch)`.
  A repo's files are bytes, or `DiskFile`s served from disk in chunks (benchmarks whose
  checkpoints should not sit in the serving process's memory).

Use `hub_env(monkeypatch, tmp_path, offline=...)` first: huggingface_hub reads its environment
into module constants at import time, so setting env vars alone does nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httpx2
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

HUB = "https://huggingface.co"  # hub_env pins constants.ENDPOINT to it
CDN_HOST = "cdn-lfs.fake-hub.test"  # not a Hub host: huggingface_hub must drop auth there
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model", ".tiktoken")


# --- hashing, as git and the Hub do it -----------------------------------------------------


class DiskFile:
    """A repo file served from disk: its size and hashes computed once, by streaming; its bytes
    read when asked for, a chunk at a time."""

    CHUNK = 8 << 20

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        sha1, sha = hashlib.sha1(b"blob %d\0" % self.size), hashlib.sha256()
        for chunk in self.chunks(0, self.size):
            sha1.update(chunk)
            sha.update(chunk)
        self.sha1, self.sha256 = sha1.hexdigest(), sha.hexdigest()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        return b"".join(self.chunks(start, stop))

    def chunks(self, start: int, stop: int) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(start)
            while start < stop:
                chunk = f.read(min(self.CHUNK, stop - start))
                if not chunk:
                    return
                start += len(chunk)
                yield chunk


def git_blob_sha1(data: bytes | DiskFile) -> str:
    """The git object id of a file: what the Hub reports as `oid` and as a regular file's ETag."""
    if isinstance(data, DiskFile):
        return data.sha1
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes | DiskFile) -> str:
    return data.sha256 if isinstance(data, DiskFile) else hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def etag_of(path: str, data: bytes) -> str:
    """Blob name in the cache: the sha256 for LFS files, the git sha1 otherwise."""
    return sha256(data) if is_lfs(path) else git_blob_sha1(data)


def commit_hash_of(files: Mapping[str, bytes], parent: str | None = None) -> str:
    listing = json.dumps([parent, sorted((p, git_blob_sha1(d)) for p, d in files.items())])
    return hashlib.sha1(listing.encode()).hexdigest()


def tree_entry(path: str, data: bytes) -> dict:
    """One file as the Hub's `/tree` endpoint lists it."""
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    if is_lfs(path):
        entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
    return entry


# --- environment ---------------------------------------------------------------------------


def hub_env(monkeypatch, tmp_path: Path, *, offline: bool, token: str | None = None) -> Path:
    """Point huggingface_hub at a private HF_HOME under tmp_path; return its hub cache folder.

    Patches both the environment (for subprocesses and code that reads it late) and
    `huggingface_hub.constants` (read once at import: HF_HUB_OFFLINE, HF_HUB_CACHE, HF_HOME,
    HF_TOKEN_PATH, ENDPOINT), and hides any real token of the machine running the tests.
    """
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", HUB)  # a machine's HF_ENDPOINT must not leak in
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        HUB + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return cache


# --- fake cache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedSnapshot:
    repo_folder: Path
    path: Path  # snapshots/<commit>
    commit: str


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def build_fake_cache(
    cache_dir: Path,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    ref: str | None = "main",
    commit: str | None = None,
    tree: Mapping[str, bytes] | None = None,
) -> CachedSnapshot:
    """Write `files` as one cached commit of `repo_id`, as `snapshot_download` leaves it.

    `ref` names the branch/tag pointing at the commit (None: reachable by hash only). `tree` is
    the full file listing of the commit on the "Hub", cached under trees/ (defaults to `files`;
    pass a superset to mimic an allow_patterns-filtered download).
    """
    commit = commit or commit_hash_of(files)
    folder = repo_folder(cache_dir, repo_id)
    snapshot = folder / "snapshots" / commit
    for path, data in files.items():
        blob = folder / "blobs" / etag_of(path, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        # Relative links, like huggingface_hub's _create_symlink: ../../blobs/<etag> (+ depth).
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no trailing newline, as the Hub client writes
    _write_tree_cache(folder, commit, tree if tree is not None else files)
    return CachedSnapshot(repo_folder=folder, path=snapshot, commit=commit)


def _write_tree_cache(folder: Path, commit: str, files: Mapping[str, bytes]) -> None:
    """trees/<commit>.json: the per-commit listing huggingface_hub >= 2.x caches (format 1)."""
    entries = {}
    for path, data in sorted(files.items()):
        entry = {"size": len(data), "blob_id": git_blob_sha1(data)}
        if is_lfs(path):
            entry.update(lfs_sha256=sha256(data), lfs_size=len(data))
        entries[path] = entry
    target = folder / "trees" / f"{commit}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"format_version": 1, "files": entries}, indent=1))


# --- fake Hub over HTTP --------------------------------------------------------------------


@dataclass
class FakeRepo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    private: bool = False
    gated: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    url: str
    authorization: str | None
    range: str | None


@dataclass(frozen=True)
class RecordedCommit:
    repo_id: str
    revision: str
    message: str
    added: dict[str, bytes]
    deleted: list[str]
    commit: str
    lfs: tuple[str, ...] = ()  # paths committed as LFS pointers (bytes uploaded beforehand)
    create_pr: bool = False
    description: str = ""


@dataclass
class _Fault:
    method: str
    path_suffix: str
    status: int | None  # None: serve the body but drop the connection after `cut_after` bytes
    times: int
    headers: dict[str, str]
    cut_after: int = 0


class FakeHub:
    """The Hub's side of the HTTP protocol, in memory. Use `with hub.installed(): ...`."""

    def __init__(self, token: str | None = None):
        self.token = token  # the one valid token; private/gated repos require it
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.commits: list[RecordedCommit] = []
        self._faults: list[_Fault] = []
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes, served by the CDN host
        self.down = False  # True: every request fails to connect, like a network outage
        self._lock = threading.Lock()  # snapshot_download calls in from 8 worker threads
        # None: every upload is "regular" (inline in the commit). An int: files of that many
        # bytes or more, and LFS_SUFFIXES files, go through the LFS batch/upload/verify protocol.
        self.lfs_threshold: int | None = None
        self.lfs_puts: list[str] = []  # sha256 of every object PUT to the storage host
        self.created: list[dict] = []  # payloads of accepted create_repo calls
        self._pr_count = 0

    # -- setup ---------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: Mapping[str, bytes], *, branch: str = "main",
                 private: bool = False, gated: bool = False) -> str:
        """Create a repo whose `branch` holds `files`; return the commit hash."""
        self.repos[repo_id] = FakeRepo(repo_id, private=private, gated=gated)
        return self.push(repo_id, files, branch=branch)

    def push(self, repo_id: str, files: Mapping[str, bytes], *, branch: str = "main") -> str:
        """Add a commit whose tree is exactly `files` on `branch`; return its hash."""
        repo = self.repos[repo_id]
        commit = commit_hash_of(files, parent=repo.refs.get(branch))
        repo.commits[commit] = dict(files)
        repo.refs[branch] = commit
        for path, data in files.items():
            if is_lfs(path):
                self._blobs[sha256(data)] = data
        return commit

    def fail(self, method: str, path_suffix: str, status: int, *, times: int = 1,
             headers: Mapping[str, str] | None = None) -> None:
        """Answer the next `times` requests `method ...path_suffix` with `status`."""
        self._faults.append(_Fault(method, path_suffix, status, times, dict(headers or {})))

    def drop_connection(self, path_suffix: str, *, after: int, times: int = 1) -> None:
        """Cut the next `times` GET bodies of `...path_suffix` after `after` bytes."""
        self._faults.append(_Fault("GET", path_suffix, None, times, {}, cut_after=after))

    def requested(self, method: str, path_suffix: str) -> list[RecordedRequest]:
        return [r for r in self.requests
                if r.method == method and httpx2.URL(r.url).path.endswith(path_suffix)]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The tree of `repo_id` at `revision` ({} for a repo without commits)."""
        repo = self.repos[repo_id]
        commit = repo.resolve(revision)
        return dict(repo.commits[commit]) if commit is not None else {}

    def state(self) -> dict:
        """Everything a commit could change: repos, their refs and trees (for before/after)."""
        return {rid: (repo.private, dict(repo.refs), {c: dict(f) for c, f in repo.commits.items()})
                for rid, repo in self.repos.items()}

    # -- wiring into huggingface_hub -----------------------------------------------------

    def client_factory(self) -> httpx2.Client:
        # Same client as huggingface_hub's default factory (its request hook enforces
        # HF_HUB_OFFLINE and tags requests), only the transport is ours.
        return httpx2.Client(transport=httpx2.MockTransport(self.handle),
                             event_hooks={"request": [hf_request_event_hook]},
                             follow_redirects=True, timeout=None)

    @contextmanager
    def installed(self) -> Iterator[FakeHub]:
        huggingface_hub.set_client_factory(self.client_factory)
        try:
            yield self
        finally:
            huggingface_hub.set_client_factory(default_client_factory)

    # -- HTTP ----------------------------------------------------------------------------

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        if self.down:
            raise httpx2.ConnectError("[Errno 111] Connection refused (fake hub is down)",
                                      request=request)
        auth = request.headers.get("authorization")
        self.requests.append(RecordedRequest(request.method, str(request.url), auth,
                                             request.headers.get("range")))
        fault = self._take_fault(request)
        if fault is not None and fault.status is not None:
            return httpx2.Response(fault.status, headers=fault.headers, json={"error": "fault"})
        response = self._route(request)
        if fault is not None:  # a connection drop: same response, body cut short
            return _cut(response, fault.cut_after)
        return response

    def _route(self, request: httpx2.Request) -> httpx2.Response:
        auth = request.headers.get("authorization")
        if request.url.host == CDN_HOST and request.method == "PUT":
            return self._lfs_put(request)
        if request.url.host == CDN_HOST:
            return self._cdn(request)
        if auth is not None and auth != f"Bearer {self.token}":
            return _error(401, message="Invalid credentials in Authorization header")
        parts = [unquote(p) for p in request.url.raw_path.decode().split("?")[0].split("/")[1:]]
        if parts[:2] == ["api", "models"]:
            return self._api(request, parts[2:])
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"]:
            return self._create_repo(request)
        if parts[:2] == ["api", "validate-yaml"]:
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            return self._lfs(request, f"{parts[0]}/{parts[1][:-len('.git')]}", parts[5])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(request, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return _error(404, message=f"fake hub: no route for {request.method} {request.url.path}")

    def _take_fault(self, request: httpx2.Request) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.times > 0 and request.method == fault.method
                        and request.url.path.endswith(fault.path_suffix)):
                    fault.times -= 1
                    return fault
        return None

    def _repo_for(self, request: httpx2.Request, repo_id: str) -> FakeRepo | httpx2.Response:
        repo = self.repos.get(repo_id)
        authorized = self.token is not None and request.headers.get("authorization") == (
            f"Bearer {self.token}")
        if repo is None or (repo.private and not authorized):
            # The real Hub answers 401 for anonymous callers and 404 otherwise; same error code.
            return _error(401 if not authorized else 404, code="RepoNotFound",
                          message="Repository not found")
        if repo.gated and not authorized:
            return _error(401, code="GatedRepo", message="Access to this model is restricted")
        return repo

    def _api(self, request: httpx2.Request, rest: list[str]) -> httpx2.Response:
        repo = self._repo_for(request, "/".join(rest[:2]))
        if isinstance(repo, httpx2.Response):
            return repo
        action, args = (rest[2], rest[3:]) if len(rest) > 2 else ("revision", ["main"])
        if action == "revision":
            return self._model_info(repo, "/".join(args))
        if action == "tree":
            return self._tree(repo, args[0], "/".join(args[1:]))
        if action == "preupload" and request.method == "POST":
            return self._preupload(request)
        if action == "branch" and request.method == "POST":
            return self._create_branch(request, repo, "/".join(args))
        if action == "commit" and request.method == "POST":
            return self._commit(request, repo, "/".join(args))
        return _error(404, message=f"fake hub: no API route {rest}")

    def _model_info(self, repo: FakeRepo, revision: str) -> httpx2.Response:
        commit = repo.resolve(revision)
        if commit is None and not repo.commits and revision == "main":
            # A repo just made by create_repo (the real Hub gives it a first commit; no files here)
            return httpx2.Response(200, json={
                "id": repo.repo_id, "modelId": repo.repo_id, "sha": None, "private": repo.private,
                "gated": False, "disabled": False, "siblings": []})
        if commit is None:
            return _error(404, code="RevisionNotFound", message=f"Invalid rev id: {revision}")
        siblings = [{"rfilename": p} for p in sorted(repo.commits[commit])]
        return httpx2.Response(200, json={
            "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": repo.private,
            "gated": "auto" if repo.gated else False, "disabled": False, "siblings": siblings})

    def _tree(self, repo: FakeRepo, revision: str, prefix: str) -> httpx2.Response:
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, code="RevisionNotFound", message=f"Invalid rev id: {revision}")
        files = repo.commits[commit]
        return httpx2.Response(200, json=[tree_entry(p, files[p]) for p in sorted(files)
                                          if not prefix or p.startswith(prefix + "/")])

    def _resolve(self, request: httpx2.Request, repo_id: str, revision: str,
                 path: str) -> httpx2.Response:
        repo = self._repo_for(request, repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, code="RevisionNotFound", message=f"Invalid rev id: {revision}")
        data = repo.commits[commit].get(path)
        if data is None:
            return _error(404, code="EntryNotFound", message=f"{path} does not exist",
                          headers={"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit}
        if is_lfs(path):
            # LFS files: a redirect to a signed CDN URL, metadata in X-Linked-* headers.
            headers.update({"X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'"{git_blob_sha1(data)}"',
                            "Location": f"https://{CDN_HOST}/blobs/{sha256(data)}"})
            return httpx2.Response(302, headers=headers)
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        return _content(request, data, headers)

    def _cdn(self, request: httpx2.Request) -> httpx2.Response:
        data = self._blobs.get(request.url.path.rsplit("/", 1)[-1])
        if data is None:
            return httpx2.Response(404, text="NoSuchKey")
        return _content(request, data, {"ETag": f'"{sha256(data)}"'})

    def _create_repo(self, request: httpx2.Request) -> httpx2.Response:
        payload = json.loads(request.content)
        repo_id = f"{payload['organization'] or 'user'}/{payload['name']}"
        if repo_id in self.repos:  # the Hub's 409 carries the repo's url (create_repo(exist_ok) reads it)
            return httpx2.Response(409, headers={"X-Error-Message": "You already created this model repo"},
                                   json={"error": "You already created this model repo",
                                         "url": f"{HUB}/{repo_id}"})
        self.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        self.created.append(payload)
        return httpx2.Response(200, json={"url": f"{HUB}/{repo_id}", "name": repo_id})

    def _commit(self, request: httpx2.Request, repo: FakeRepo, revision: str) -> httpx2.Response:
        lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                 for item in lines if item["key"] == "file"}
        lfs = [item["value"] for item in lines if item["key"] == "lfsFile"]
        for pointer in lfs:  # the Hub refuses a pointer to an object nobody uploaded
            data = self._blobs.get(pointer["oid"])
            if data is None or len(data) != pointer.get("size", len(data)):
                return _error(422, message=f"LFS object {pointer['oid']} of {pointer['path']} "
                                           "was not uploaded")
            added[pointer["path"]] = data
        deleted = [item["value"]["path"] for item in lines
                   if item["key"] in ("deletedFile", "deletedFolder")]
        create_pr = request.url.params.get("create_pr") == "1"
        pr_url = None
        if create_pr:  # a PR is a new ref refs/pr/N starting where the target branch is
            self._pr_count += 1
            target = repo.refs.get(revision)
            revision = f"refs/pr/{self._pr_count}"
            if target is not None:
                repo.refs[revision] = target
            pr_url = f"{HUB}/{repo.repo_id}/discussions/{self._pr_count}"
        base = repo.commits.get(repo.refs.get(revision, ""), {})
        files = {p: d for p, d in base.items()
                 if not any(p == x or p.startswith(x.rstrip("/") + "/") for x in deleted)}
        commit = self.push(repo.repo_id, {**files, **added}, branch=revision)
        self.commits.append(RecordedCommit(repo.repo_id, revision, header["summary"], added,
                                           deleted, commit, tuple(p["path"] for p in lfs),
                                           create_pr, header.get("description", "")))
        return httpx2.Response(200, json={"commitUrl": f"{HUB}/{repo.repo_id}/commit/{commit}",
                                          "commitOid": commit, "pullRequestUrl": pr_url})

    # -- additions for uploads: LFS negotiation, branches ---------------------------------

    def _preupload(self, request: httpx2.Request) -> httpx2.Response:
        if self.lfs_threshold is None:
            return _preupload(request)
        files = json.loads(request.content)["files"]
        return httpx2.Response(200, json={"files": [
            {"path": f["path"], "shouldIgnore": False, "oid": None,
             "uploadMode": "lfs" if f["size"] >= self.lfs_threshold or is_lfs(f["path"])
             else "regular"}
            for f in files]})

    def _lfs(self, request: httpx2.Request, repo_id: str, action: str) -> httpx2.Response:
        repo = self._repo_for(request, repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        payload = json.loads(request.content)
        if action == "verify":
            data = self._blobs.get(payload["oid"])
            if data is None or len(data) != payload["size"]:
                return _error(404, message=f"LFS object {payload['oid']} not found")
            return httpx2.Response(200, json={"message": "ok"})
        if action != "batch" or payload.get("operation") != "upload":
            return _error(404, message=f"fake hub: no LFS route {action}")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self._blobs:  # already stored: no actions, nothing to upload
                entry["actions"] = {
                    "upload": {"href": f"https://{CDN_HOST}/upload/{obj['oid']}"},
                    "verify": {"href": f"{HUB}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects},
                               headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, request: httpx2.Request) -> httpx2.Response:
        oid = request.url.path.rsplit("/", 1)[-1]
        data = request.content
        if sha256(data) != oid:
            return httpx2.Response(400, text="sha256 mismatch")
        with self._lock:
            self._blobs[oid] = data
            self.lfs_puts.append(oid)
        return httpx2.Response(200, headers={"ETag": f'"{oid}"'})

    def _create_branch(self, request: httpx2.Request, repo: FakeRepo, branch: str) -> httpx2.Response:
        if branch in repo.refs:
            return _error(409, message=f"Branch {branch} already exists")
        start = (json.loads(request.content or b"{}") or {}).get("startingPoint") or "main"
        if not repo.commits and start == "main":  # a new repo: the branch starts empty, like main
            return httpx2.Response(200, json={})
        commit = repo.resolve(start)
        if commit is None:
            return _error(404, code="RevisionNotFound", message=f"Invalid rev id: {start}")
        repo.refs[branch] = commit
        return httpx2.Response(200, json={})


def disable_xet(monkeypatch) -> None:
    """Make huggingface_hub upload LFS files over HTTP (the LFS protocol the fake speaks) rather
    than through hf_xet, whose Rust client cannot be given a transport."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _preupload(request: httpx2.Request) -> httpx2.Response:
    # Every file "regular": its bytes then travel base64-encoded inside the commit payload, so
    # uploads are recorded without emulating the LFS/Xet upload protocols.
    files = json.loads(request.content)["files"]
    return httpx2.Response(200, json={"files": [
        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
        for f in files]})


def _content(request: httpx2.Request, data: bytes, headers: dict[str, str]) -> httpx2.Response:
    """File bytes for GET, honouring `Range: bytes=N-` (what resumed downloads send) and
    `bytes=N-M` (what header reads send: huggingface_hub's get_safetensors_metadata, ours)."""
    headers = {**headers, "Content-Length": str(len(data)), "Accept-Ranges": "bytes"}
    if request.method == "HEAD":
        return httpx2.Response(200, headers=headers)
    wanted = _range(request.headers.get("range"), len(data))
    if wanted is None and isinstance(data, DiskFile):
        return httpx2.Response(200, headers=headers, stream=_DiskStream(data, 0, len(data)))
    if wanted is None:
        return httpx2.Response(200, headers=headers, content=data)
    start, end = wanted
    if start >= len(data):
        return httpx2.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
    headers.update({"Content-Length": str(end + 1 - start),
                    "Content-Range": f"bytes {start}-{end}/{len(data)}"})
    if isinstance(data, DiskFile):
        return httpx2.Response(206, headers=headers, stream=_DiskStream(data, start, end + 1))
    return httpx2.Response(206, headers=headers, content=data[start:end + 1])


class _DiskStream(httpx2.SyncByteStream):
    """Bytes [start, stop) of a DiskFile, a chunk at a time."""

    def __init__(self, data: DiskFile, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop

    def __iter__(self) -> Iterator[bytes]:
        yield from self.data.chunks(self.start, self.stop)


class _CutStream(httpx2.SyncByteStream):
    """A body that stops after `n` bytes with the error a dropped connection raises."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.n]
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete body")


def _cut(response: httpx2.Response, n: int) -> httpx2.Response:
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    headers["Content-Length"] = response.headers.get("content-length", str(len(response.content)))
    return httpx2.Response(response.status_code, headers=headers,
                           stream=_CutStream(response.content, n))


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a `bytes=N-` or `bytes=N-M` range (M past the end: the end), or None
    for no range (a whole-file answer)."""
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header[len("bytes="):].partition("-")
    start = int(first or 0)
    end = min(int(last), size - 1) if last else size - 1
    return None if (start, end) == (0, size - 1) and not last else (start, end)


def _error(status: int, *, code: str | None = None, message: str,
           headers: Mapping[str, str] | None = None) -> httpx2.Response:
    """An error the way the Hub sends it: X-Error-Code / X-Error-Message drive the client."""
    extra = {"X-Error-Message": message, **(headers or {})}
    if code is not None:
        extra["X-Error-Code"] = code
    return httpx2.Response(status, headers=extra, json={"error": message})
