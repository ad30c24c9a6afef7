"""The bundle format, version 1: what the files are, how an expert extent is packed, and a
validating reader. This module (with layout.py) is the only code that knows the format.

A bundle is untrusted input (it may come from the Hub): `open_bundle` checks the format version,
that every path stays inside the bundle, every extent lies inside its file and overlaps no
other, and that sizes agree with shapes, dtypes and bits; `verify_bundle` also checks every
checksum. Any violation is a `BundleError` naming the file and the row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import xxhash

from ..common.errors import MoestreamError
from .tensors import DTYPES, from_buffer, nbytes_of

FORMAT_NAME = "moestream-bundle"
# 2: every extent also carries a fast checksum (xxh3-64) that the reader checks on every read.
# 1 is still read, without that per-read check (docs/bundle-format.md says why the change).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
EXTENT_ALIGNMENT = 16 * 1024  # extents start on 16 KiB boundaries: O_DIRECT-friendly on every OS
TENSOR_ALIGNMENT = 64  # tensors inside an extent, so views are aligned for any dtype / SIMD

BUNDLE_JSON = "bundle.json"
CONFIG_JSON = "config.json"
RESIDENT_FILE = "resident.safetensors"
LAYOUT_FILE = "layout.parquet"
EXPERTS_DIR = "experts"
CODECS = ("none", "zstd")
QUANT_MODES = ("affine", "mxfp4")  # mxfp4: 4-bit codes, one uint8 e8m0 scale per 32, no biases


class BundleError(MoestreamError, ValueError):
    """The bundle is malformed or does not match its manifest; the message names where."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside an expert extent, named relative to the layer's switch module."""

    name: str  # e.g. "gate_proj.weight", "gate_proj.scales", "down_proj.bias"
    offset: int  # within the (decoded) extent
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    bits: int | None = None  # set on the three tensors of a quantized projection
    group_size: int | None = None
    mode: str | None = None


@dataclass(frozen=True)
class ExpertExtent:
    layer: int
    expert: int
    file: str  # relative to the bundle root, e.g. "experts/layer_003.bin"
    offset: int
    nbytes: int  # bytes on disk
    checksum: str  # "sha256:<hex>" of the bytes on disk (verify: the full check)
    codec: str
    raw_nbytes: int  # decoded size (== nbytes for codec "none")
    tensors: tuple[TensorEntry, ...] = field(default_factory=tuple)
    # per-MiB xxh3 digests of the bytes on disk, checked on every read (v2; see fast_checksum)
    fast_checksum: str | None = None

    @property
    def label(self) -> str:
        return f"layer {self.layer} expert {self.expert} ({self.file} @ {self.offset})"


def sha256_hex(data) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


FAST_CHECKSUM = "xxh3_64"  # one digest of the whole extent (the first format 2 bundles)
BLOCK_CHECKSUM = "xxh3_64/1MiB"  # one digest per MiB of the extent, concatenated (written now)
CHECK_BLOCK_BYTES = 1 << 20
_DIGEST_HEX = 16


def fast_checksum(data) -> str:
    """The per-read checksum of an extent: xxh3-64 (~60 GB/s per core here; sha256: 1.8) of each
    1 MiB block. Blocks, not one digest of the whole extent: the reader's threads each read a share
    of a layer's experts, and each block is hashed by the thread that completes it, right after its
    read, instead of one thread hashing whole experts after the last share arrives (on the H200 that
    tail cost 5-9% of decode speed)."""
    return f"{BLOCK_CHECKSUM}:{''.join(_block_digests(data, CHECK_BLOCK_BYTES))}"


def _block_digests(data, block: int) -> list[str]:
    """The xxh3-64 hex digest of each `block` bytes of data (one, of nothing, for no data)."""
    view = memoryview(data).cast("B")
    return [xxhash.xxh3_64_hexdigest(view[a : a + block]) for a in range(0, max(len(view), 1), block)]


@dataclass(frozen=True)
class BlockChecksums:
    """An extent's fast checksum, parsed: the digest of each `block_bytes` block of its bytes on
    disk (a whole-extent digest is one block as large as the extent)."""

    block_bytes: int
    digests: tuple[str, ...]

    def block_matches(self, index: int, data) -> bool:
        return xxhash.xxh3_64_hexdigest(data) == self.digests[index]

    def matches(self, data) -> bool:
        return tuple(_block_digests(data, self.block_bytes)) == self.digests


def parse_fast_checksum(value: str, nbytes: int) -> BlockChecksums:
    """The digests of a `fast_checksum` value for an extent of nbytes; ValueError naming what is
    wrong when it is malformed."""
    scheme, sep, hexes = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not sep or scheme not in (FAST_CHECKSUM, BLOCK_CHECKSUM):
        raise ValueError(f"fast_checksum {str(value)[:40]!r} is not '{BLOCK_CHECKSUM}:<hex>' or '{FAST_CHECKSUM}:<hex>'")
    block = CHECK_BLOCK_BYTES if scheme == BLOCK_CHECKSUM else max(nbytes, 1)
    blocks = -(-max(nbytes, 1) // block)
    if len(hexes) != blocks * _DIGEST_HEX or not all(c in "0123456789abcdef" for c in hexes):
        raise ValueError(f"fast_checksum holds {len(hexes)} characters, {blocks} digest(s) of {_DIGEST_HEX} "
                         f"lowercase hex digits expected for {nbytes} bytes")
    return BlockChecksums(block, tuple(hexes[i : i + _DIGEST_HEX] for i in range(0, len(hexes), _DIGEST_HEX)))


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def next_extent_offset(offset: int, nbytes: int) -> int:
    """The layout rule of expert files: extents follow one another, each starting on the first
    EXTENT_ALIGNMENT boundary after the previous one ends (zero padding between)."""
    return align(offset + nbytes, EXTENT_ALIGNMENT)


def extent_offsets(sizes) -> list[int]:
    """Where extents of these sizes start when packed in this order into one file."""
    offsets, offset = [], 0
    for n in sizes:
        offsets.append(offset)
        offset = next_extent_offset(offset, int(n))
    return offsets


# ---------------------------------------------------------------- packing one expert


@dataclass(frozen=True)
class PackedTensor:
    """A tensor ready to pack: its bytes plus what the entry records about it."""

    name: str
    data: bytes
    dtype: str
    shape: tuple[int, ...]
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None


def pack_extent(tensors: list[PackedTensor]) -> tuple[bytes, tuple[TensorEntry, ...]]:
    """Concatenate tensors (each 64-byte aligned) into one extent's bytes, and their entries."""
    parts, entries, offset = [], [], 0
    for t in tensors:
        pad = align(offset, TENSOR_ALIGNMENT) - offset
        if pad:
            parts.append(b"\0" * pad)
            offset += pad
        entries.append(TensorEntry(t.name, offset, len(t.data), t.dtype, tuple(t.shape), t.bits, t.group_size, t.mode))
        parts.append(t.data)
        offset += len(t.data)
    return b"".join(parts), tuple(entries)


def unpack_extent(buf, entries: tuple[TensorEntry, ...]) -> dict[str, mx.array]:
    """The MLX arrays of one decoded extent (copies: the buffer may be reused afterwards)."""
    view = memoryview(buf)
    return {e.name: from_buffer(view[e.offset : e.offset + e.nbytes], e.dtype, e.shape) for e in entries}


def extent_views(data: mx.array, start: int, entries: tuple[TensorEntry, ...]) -> dict[str, mx.array]:
    """The tensors of one raw extent that sits in the uint8 MLX array `data` from byte `start`,
    as views of it (no copy: slices, bit casts and reshapes of contiguous memory share it).
    Tensors are TENSOR_ALIGNMENT-aligned inside the extent, so the views are aligned for any
    dtype when `start` is."""
    return {
        e.name: data[start + e.offset : start + e.offset + e.nbytes].view(DTYPES[e.dtype][2]).reshape(e.shape)
        for e in entries
    }


# ---------------------------------------------------------------- checks on one row


def check_tensor_entry(entry: TensorEntry, raw_nbytes: int) -> str | None:
    """What is wrong with one tensor entry, or None."""
    if entry.dtype not in DTYPES:
        return f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}"
    if any((not isinstance(s, int)) or s < 0 for s in entry.shape):
        return f"tensor {entry.name!r} has a bad shape {list(entry.shape)}"
    if entry.offset % TENSOR_ALIGNMENT:
        return f"tensor {entry.name!r} at offset {entry.offset} is not {TENSOR_ALIGNMENT}-byte aligned as packing leaves it"
    if entry.offset < 0 or entry.offset + entry.nbytes > raw_nbytes:
        return f"tensor {entry.name!r} [{entry.offset}, +{entry.nbytes}) lies outside the extent of {raw_nbytes} bytes"
    if nbytes_of(entry.dtype, entry.shape) != entry.nbytes:
        return (
            f"tensor {entry.name!r} is {entry.nbytes} bytes but {entry.dtype}{list(entry.shape)} "
            f"needs {nbytes_of(entry.dtype, entry.shape)}"
        )
    if entry.bits is not None:
        if entry.mode not in QUANT_MODES:
            return f"tensor {entry.name!r} has unsupported quantization mode {entry.mode!r}"
        allowed = ((4,), (32,)) if entry.mode == "mxfp4" else ((2, 3, 4, 5, 6, 8), (32, 64, 128))
        if entry.bits not in allowed[0] or entry.group_size not in allowed[1]:
            return (f"tensor {entry.name!r} has unsupported bits={entry.bits} group_size={entry.group_size} "
                    f"for mode {entry.mode}")
    return None


def check_quantized_shapes(extent: ExpertExtent) -> str | None:
    """For each quantized projection: weight, scales and biases must describe the same matrix."""
    by_name = {t.name: t for t in extent.tensors}
    for t in extent.tensors:
        if t.bits is None or not t.name.endswith(".weight"):
            continue
        proj = t.name[: -len(".weight")]
        if t.dtype != "uint32" or len(t.shape) != 2:
            return f"quantized {t.name!r} must be a 2-D uint32 tensor, got {t.dtype}{list(t.shape)}"
        in_dims = t.shape[1] * 32 // t.bits
        if t.shape[1] * 32 % t.bits or in_dims % t.group_size:
            return f"quantized {t.name!r}: {t.shape[1]} words of {t.bits} bits do not make whole groups of {t.group_size}"
        want = (t.shape[0], in_dims // t.group_size)
        parts = ("scales", "biases") if t.mode == "affine" else ("scales",)
        if t.mode != "affine" and f"{proj}.biases" in by_name:
            return f"{proj}.biases: mode {t.mode} has no biases"
        for part in parts:
            other = by_name.get(f"{proj}.{part}")
            if other is None:
                return f"quantized {t.name!r} has no {proj}.{part}"
            if tuple(other.shape) != want or other.bits != t.bits or other.group_size != t.group_size:
                return (
                    f"{proj}.{part} {list(other.shape)} (bits={other.bits}, group={other.group_size}) does not "
                    f"match {t.name!r}: want {list(want)} (bits={t.bits}, group={t.group_size})"
                )
    return None


def check_extent(extent: ExpertExtent) -> str | None:
    if extent.codec not in CODECS:
        return f"unknown codec {extent.codec!r} (known: {', '.join(CODECS)})"
    if extent.nbytes <= 0 or extent.offset < 0 or extent.raw_nbytes <= 0:
        return f"bad extent [{extent.offset}, +{extent.nbytes}) raw {extent.raw_nbytes}"
    if extent.codec == "none" and extent.raw_nbytes != extent.nbytes:
        return f"codec 'none' but nbytes {extent.nbytes} != raw_nbytes {extent.raw_nbytes}"
    if not extent.tensors:
        return "the extent lists no tensors"
    if extent.fast_checksum is not None:
        try:
            parse_fast_checksum(extent.fast_checksum, extent.nbytes)
        except ValueError as e:
            return str(e)
    for t in extent.tensors:
        problem = check_tensor_entry(t, extent.raw_nbytes)
        if problem:
            return problem
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in extent.tensors)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            return f"tensors {first!r} and {second!r} overlap"
    return check_quantized_shapes(extent)


# ---------------------------------------------------------------- paths


def hf_cache_blobs(root: Path) -> Path | None:
    """`<repo>/blobs` when `root` is a Hugging Face cache snapshot (`<repo>/snapshots/<commit>`):
    huggingface_hub links every snapshot file to its blob there; repo content cannot make them."""
    real_root = root.resolve()
    if real_root.parent.name != "snapshots":
        return None
    blobs = real_root.parent.parent / "blobs"
    return blobs if blobs.is_dir() else None


def safe_path(root: Path, rel: str, what: str) -> Path:
    """`root/rel`, refusing absolute paths, `..`, and symlinks that lead outside the bundle."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or os.path.isabs(rel):
        raise BundleError(f"{what}: path {rel!r} is absolute or empty; bundle paths must be relative")
    parts = Path(rel).parts
    if ".." in parts or "\\" in rel:
        raise BundleError(f"{what}: path {rel!r} escapes the bundle")
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents and real.parent != hf_cache_blobs(root):
        raise BundleError(f"{what}: path {rel!r} resolves outside the bundle (symlink to {real})")
    return path


# ---------------------------------------------------------------- bundle.json


MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def _depth(value, limit: int, depth: int = 0) -> int:
    if depth > limit:
        return depth
    if isinstance(value, dict):
        return max((_depth(v, limit, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((_depth(v, limit, depth + 1) for v in value), default=depth + 1)
    return depth


def read_json(path: Path, what: str, top: type = dict):
    """A JSON file of the bundle: size- and depth-limited, `top` at the top."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise BundleError(f"{what}: {size} bytes; more than the {MAX_JSON_BYTES} a bundle's JSON may have")
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{what}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except OSError as e:
        raise BundleError(f"{what}: cannot be read ({e.strerror or e})") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BundleError(f"{what}: nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(value, top):
        raise BundleError(f"{what}: expected a JSON {top.__name__}, got {type(value).__name__}")
    return value


def read_bundle_json(root: Path) -> dict:
    path = root / BUNDLE_JSON
    if path.is_symlink() and hf_cache_blobs(root) is None:
        raise BundleError(f"{path}: a link; {BUNDLE_JSON} must be a file of the bundle itself")
    if not path.is_file():
        raise BundleError(f"{root}: no {BUNDLE_JSON}; not a moestream bundle")
    safe_path(root, BUNDLE_JSON, BUNDLE_JSON)
    meta = read_json(path, str(path), object)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this moestream reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade moestream or "
            "re-prepare the bundle"
        )
    return meta


def extent_to_dict(e: ExpertExtent) -> dict:
    # by hand: dataclasses.asdict deep-copies and was a sixth of the pack stage's time
    return {
        "layer": e.layer, "expert": e.expert, "file": e.file, "offset": e.offset, "nbytes": e.nbytes,
        "checksum": e.checksum, "codec": e.codec, "raw_nbytes": e.raw_nbytes, "fast_checksum": e.fast_checksum,
        "tensors": [
            {"name": t.name, "offset": t.offset, "nbytes": t.nbytes, "dtype": t.dtype, "shape": list(t.shape),
             "bits": t.bits, "group_size": t.group_size, "mode": t.mode}
            for t in e.tensors
        ],
    }


def extent_from_dict(d: dict) -> ExpertExtent:
    tensors = tuple(
        TensorEntry(
            name=t["name"], offset=int(t["offset"]), nbytes=int(t["nbytes"]), dtype=t["dtype"],
            shape=tuple(int(s) for s in t["shape"]), bits=t.get("bits"), group_size=t.get("group_size"),
            mode=t.get("mode"),
        )
        for t in d["tensors"]
    )
    return ExpertExtent(
        layer=int(d["layer"]), expert=int(d["expert"]), file=d["file"], offset=int(d["offset"]),
        nbytes=int(d["nbytes"]), checksum=d["checksum"], codec=d["codec"], raw_nbytes=int(d["raw_nbytes"]),
        tensors=tensors, fast_checksum=d.get("fast_checksum"),
    )


def expert_bytes_per_token(extents: list[ExpertExtent], experts_per_token: int, num_layers: int) -> int:
    """Expert bytes read per token with nothing cached: k mean-sized experts in every MoE layer."""
    if not extents:
        return 0
    mean = sum(e.nbytes for e in extents) / len(extents)
    return int(math.ceil(mean * experts_per_token * num_layers))
