"""A Hub checkpoint's weight shards, downloaded as the steps need them and dropped once used.

Preparing by repo id first fetches only config, tokenizer and `model.safetensors.index.json`
(stages/fetch.py with weights=False). The tensor index comes from each shard's safetensors
header, read with two small HTTP range requests through huggingface_hub's client (the way its
`get_safetensors_metadata` reads them, which keeps neither the header's length nor the file's
size, both needed for byte offsets), or from the file where the cache already has it. Each tensor
then points where its shard will be in the HF cache snapshot once downloaded.

Every step that reads tensors first makes sure their shards are there: `hf_hub_download` of that
file at the pinned commit (the HF cache, resumable, HF_HUB_OFFLINE honoured). With
`drop_source_shards`, after a step every downloaded shard all of whose tensors are used is
deleted from the cache (its snapshot link, and its blob unless another snapshot links to it): a
shard's expert tensors are used once their layers are packed (their file and resume sidecar are
in the staging folder), its resident tensors once they are kept aside in the work folder (a
copy of their bytes, a few percent of a shard: the resident weights are written at the end, from
those copies) or the resident weights are written. A rerun downloads what it lacks.

Disk use (the staging or bundle folder, the work folder and this commit's shards in the cache) is
sampled after every download and every step into the work folder, so that steps in other
processes (Dask workers) count too; the preparation reports the largest sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import huggingface_hub
from filelock import FileLock
from huggingface_hub import constants
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from ..common.files import atomic_path, tree_bytes, write_json_atomic
from ..common.hub import explain, is_transient, redact
from ..manifests.checkpoint import SourceCheckpoint
from ..manifests.safetensors_index import CheckpointError, TensorInfo, header_length
from .fetch import FetchedSource, FetchError
from .pack import layer_file

try:  # huggingface_hub 2.x talks HTTP through httpx2 (a fork of httpx); 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx as _http

HEADER_PROBE = 100_000  # the first range read: most headers fit in it (huggingface_hub reads as much)
RESIDENT_DIR = "resident"  # in the work folder: resident tensors of dropped shards
DISK_SAMPLES = "disk-samples"  # in the work folder: one line of bytes in use per sample
COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class HubShards:
    """The weight shards of a Hub checkpoint at one commit, and which tensors each holds."""

    repo_id: str
    commit: str
    snapshot: Path  # the HF cache snapshot folder: where each shard is once downloaded
    headers: dict[str, tuple[bytes, int]]  # shard -> (its safetensors header, its size in bytes)
    layers: dict[int, tuple[str, ...]]  # MoE layer -> the shards holding its expert tensors
    resident: dict[str, tuple[tuple[int, int], ...]]  # shard -> (offset, nbytes) of each resident tensor
    drop: bool  # delete each shard once used

    def path(self, shard: str) -> Path:
        return self.snapshot / shard

    def present(self, shard: str) -> bool:
        return self.path(shard).is_file()

    @property
    def resident_only(self) -> list[str]:
        """Shards holding resident tensors and no expert tensor (embeddings, output head...)."""
        with_experts = {s for shards in self.layers.values() for s in shards}
        return [s for s in self.headers if s in self.resident and s not in with_experts]

    @property
    def cache_dir(self) -> Path:
        return self.snapshot.parents[2]  # <cache>/models--org--name/snapshots/<commit>


def read_headers(fetched: FetchedSource, token: str | bool | None = None) -> dict[str, tuple[bytes, int]]:
    """{shard: (safetensors header, file size)} for every weight file of a source fetched without
    its weights: from the cache where a shard is there, else by HTTP range requests."""
    out = {}
    for name in fetched.weight_files:
        path = fetched.path / name
        if path.is_file():
            size = path.stat().st_size
            with open(path, "rb") as f:
                out[name] = (f.read(header_length(f.read(8), size, path)), size)
            continue
        try:
            out[name] = _remote_header(fetched.repo_id, fetched.commit, name, token)
        except (OSError, _http.HTTPError) as err:  # HfHubHTTPError and OfflineModeIsEnabled are OSErrors
            raise _fetch_error(err, fetched.repo_id, fetched.commit, name, f"the header of {name}", token) from None
    return out


def _remote_header(repo_id: str, commit: str, name: str, token) -> tuple[bytes, int]:
    url = huggingface_hub.hf_hub_url(repo_id, name, revision=commit)
    headers = build_hf_headers(token=token)
    where = f"{repo_id}/{name}@{commit[:12]}"
    first, size = _get_range(url, headers, 0, HEADER_PROBE - 1)
    hlen = header_length(first, size, where)
    header = first[8:8 + hlen] if 8 + hlen <= len(first) else _get_range(url, headers, 8, 8 + hlen - 1)[0]
    if len(header) != hlen:
        raise CheckpointError(f"{where}: the Hub sent {len(header)} of the header's {hlen} bytes")
    return header, size


def _get_range(url: str, headers: dict, start: int, end: int) -> tuple[bytes, int]:
    """Bytes [start, end] of the file at `url` (fewer at its end), and the file's size."""
    response = get_session().get(url, headers={**headers, "Range": f"bytes={start}-{end}"},
                                 timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
    hf_raise_for_status(response)
    if response.status_code == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit():
            return response.content, int(total)
    return response.content[start:end + 1], len(response.content)  # the whole file came: no range support


def _fetch_error(err: BaseException, repo_id: str, commit: str, name: str, what: str, token) -> FetchError:
    failure = FetchError(redact(f"{what}: {explain(err, repo_id, commit)}", token))
    failure.transient = is_transient(err)
    return failure


def hub_shards(fetched: FetchedSource, headers: dict[str, tuple[bytes, int]], ckpt: SourceCheckpoint,
               drop: bool) -> HubShards:
    """Which shards hold each layer's expert tensors and which byte ranges of each shard the
    resident weights read, from the checkpoint indexed by `headers`."""

    def stored(name: str) -> list[TensorInfo]:  # what reading a (logical) tensor reads
        q = ckpt.quantized.get(name)
        info = ckpt.tensors.get(name)
        return list(q.parts.values()) if q is not None else [info] if info is not None else []

    layers = {}
    for layer, rules in ckpt.experts.rules.items():
        names = {t for rule in rules.values() for t in rule.tensors}
        layers[layer] = tuple(sorted({i.file.name for n in names for i in stored(n)}))
    resident: dict[str, set[tuple[int, int]]] = {}
    for name in ckpt.resident_names():
        for info in stored(name):
            resident.setdefault(info.file.name, set()).add((info.offset, info.nbytes))
    return HubShards(fetched.repo_id, fetched.commit, fetched.path.absolute(), headers, layers,
                     {s: tuple(sorted(r)) for s, r in resident.items()}, drop)


# ----------------------------------------------------------------------------- download


def fetch_shards(hub: HubShards, shards: Iterable[str], downloaded: Callable[[], None] | None = None) -> None:
    """Make sure `shards` are in the cache: each one missing is downloaded (hf_hub_download at the
    pinned commit), `downloaded()` called after each."""
    for name in shards:
        if hub.present(name):
            continue
        try:
            huggingface_hub.hf_hub_download(hub.repo_id, name, revision=hub.commit, cache_dir=hub.cache_dir)
        except (OSError, _http.HTTPError) as err:
            raise _fetch_error(err, hub.repo_id, hub.commit, name, f"shard {name}", None) from None
        if downloaded is not None:
            downloaded()


# ----------------------------------------------------------------------------- drop


def layer_packed(staging: Path, layer: int) -> bool:
    """The layer's expert file and its resume sidecar are staged (by this run or an earlier one:
    a sidecar of other options makes the layer's shards look used; its step downloads them again)."""
    return (staging / layer_file(layer)).is_file() and (staging / (layer_file(layer) + ".json")).is_file()


def drop_used(hub: HubShards, staging: Path, work: Path, resident_written: bool = False) -> list[str]:
    """Delete every shard in the cache whose expert tensors are all packed, its resident tensors
    first kept aside unless the resident weights are written. Returns the shards deleted."""
    dropped = []
    work.mkdir(parents=True, exist_ok=True)
    with FileLock(work / ".lock"):  # steps run in threads and processes at once
        for name in hub.headers:
            if not hub.present(name):
                continue
            if not all(layer_packed(staging, layer) for layer, shards in hub.layers.items() if name in shards):
                continue
            if not resident_written and hub.resident.get(name) and stashed(hub, work, name) is None:
                stash(hub, work, name)
            delete_from_cache(hub, name)
            dropped.append(name)
    return dropped


def stash(hub: HubShards, work: Path, shard: str) -> None:
    """Copy the shard's resident tensors into the work folder (bytes, then the map that marks
    the copy complete)."""
    folder = work / RESIDENT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ranges, at = [], 0
    with atomic_path(folder / f"{shard}.bin") as tmp, open(hub.path(shard), "rb") as src, open(tmp, "wb") as dst:
        for offset, nbytes in hub.resident[shard]:
            ranges.append((offset, nbytes, at))
            src.seek(offset)
            left = nbytes
            while left:
                chunk = src.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{hub.path(shard)}: ends inside a tensor at offset {offset}")
                dst.write(chunk)
                left -= len(chunk)
            at += nbytes
    write_json_atomic(folder / f"{shard}.json", {"commit": hub.commit, "ranges": ranges})


def stashed(hub: HubShards, work: Path, shard: str) -> dict[int, int] | None:
    """{offset in the shard: offset in the copy} of a shard's resident tensors kept aside (from this
    commit: an interrupted run may have prepared another), or None."""
    path = work / RESIDENT_DIR / f"{shard}.json"
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    if kept.get("commit") != hub.commit:
        return None
    return {offset: at for offset, _, at in kept["ranges"]}


def delete_from_cache(hub: HubShards, shard: str) -> None:
    """The shard's snapshot link and its blob (unless another snapshot of the repo links to it)."""
    link = hub.path(shard)
    blob = link.resolve()
    link.unlink(missing_ok=True)
    blobs = hub.snapshot.parents[1] / "blobs"
    if blob.parent != blobs.resolve():
        return  # no blob of its own (a cache without symlinks holds the file itself)
    for other in hub.snapshot.parent.glob("*/**/*"):
        if other.is_symlink() and other.resolve() == blob:
            return
    blob.unlink(missing_ok=True)


def resident_view(ckpt: SourceCheckpoint, hub: HubShards, work: Path) -> tuple[SourceCheckpoint, list[str]]:
    """The checkpoint with its resident tensors read from the copies kept aside where a shard was
    dropped, and the shards the resident weights still need from the cache."""
    moved: dict[tuple[str, int], tuple[Path, int]] = {}
    needed = []
    for shard in hub.resident:
        kept = stashed(hub, work, shard)
        if kept is None:
            needed.append(shard)
            continue
        copy = work / RESIDENT_DIR / f"{shard}.bin"
        moved.update({(shard, offset): (copy, at) for offset, at in kept.items()})
    if not moved:
        return ckpt, needed

    def move(info: TensorInfo) -> TensorInfo:
        to = moved.get((info.file.name, info.offset)) if info.file.parent == hub.snapshot else None
        return info if to is None or not info.nbytes else replace(info, file=to[0], offset=to[1])

    tensors = {name: move(info) for name, info in ckpt.tensors.items()}
    quantized = {name: replace(q, parts={k: move(v) for k, v in q.parts.items()}) for name, q in ckpt.quantized.items()}
    return replace(ckpt, tensors=tensors, quantized=quantized), needed


# ----------------------------------------------------------------------------- disk use


def shard_bytes(hub: HubShards) -> int:
    """Bytes of this commit's shards in the cache (each blob once)."""
    blobs = {}
    for name in hub.headers:
        try:
            blob = hub.path(name).resolve(strict=True)
            blobs[blob] = blob.stat().st_size
        except (FileNotFoundError, OSError):
            pass
    return sum(blobs.values())


def record_disk(work: Path, folders: Iterable[Path], hub: HubShards | None) -> int:
    """Sample the disk in use (folders, and the source's shards in the cache) into the work folder."""
    nbytes = sum(tree_bytes(f) for f in folders) + (shard_bytes(hub) if hub is not None else 0)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / DISK_SAMPLES, "a") as f:  # one short append per sample: whole lines, whoever writes
        f.write(f"{nbytes}\n")
    return nbytes


def peak_disk(work: Path) -> int | None:
    path = work / DISK_SAMPLES
    if not path.is_file():
        return None
    samples = [int(line) for line in path.read_text().split() if line.isdigit()]
    return max(samples, default=None)
