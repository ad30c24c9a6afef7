"""Where each tensor of a safetensors checkpoint lives: file, byte offset, dtype, shape.

We parse the safetensors header ourselves instead of using `safe_open(...).get_slice`: the
numpy/MLX backends of `safetensors` cannot hand out bfloat16 slices, and the runtime's
CheckpointStore needs the raw byte range of one expert anyway (to read it with its own
O_DIRECT reader). One expert of a stacked [E, ...] tensor is a contiguous run of rows, so the
byte range is exact and memory stays bounded by one expert.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..common.errors import MoestreamError
from .tensors import SAFETENSORS_DTYPES, from_buffer, itemsize

MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(MoestreamError, ValueError):
    """A source checkpoint that cannot be read as it claims to be."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # our dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int

    def rows_range(self, start: int, stop: int) -> tuple[int, int]:
        """(absolute offset, nbytes) of rows [start, stop) along axis 0."""
        row = self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0
        return self.offset + start * row, (stop - start) * row


def header_length(prefix: bytes, size: int, where) -> int:
    """The header length a safetensors file's first 8 bytes give, checked against the file's size."""
    if len(prefix) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (hlen,) = struct.unpack("<Q", prefix[:8])
    if hlen > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{where}: safetensors header length {hlen} is not plausible")
    return hlen


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header, checking every entry lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        hlen = header_length(f.read(8), size, path)
        return parse_header(path, f.read(hlen), size)


def parse_header(path: Path, header: bytes, size: int) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file of `size` bytes whose header (the JSON after the 8-byte
    length) is `header`, checking every entry lies inside the file. `path` is where the file is,
    or will be: a shard not downloaded yet is indexed from its header alone."""
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = entries.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    base = 8 + len(header)
    out, ranges = {}, []
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry_fields(path, name, entry)
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {name[:200]!r} has data_offsets [{begin}, {end}] past the end "
                                  f"of the file ({size} bytes)")
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the data")
    return out


def _entry_fields(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry's dtype, shape and data offsets, each checked."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name[:200]!r}: header entry is not an object")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name[:200]!r} has dtype {str(entry.get('dtype'))[:40]!r}, which moestream "
            f"does not read (supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name[:200]!r} has a bad shape {str(shape)[:80]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name[:200]!r} has bad data_offsets {str(offsets)[:80]}")
    begin, end = offsets
    shape = tuple(shape)
    if end - begin != itemsize(dtype) * math.prod(shape):
        raise CheckpointError(
            f"{path}: tensor {name[:200]!r} {dtype}{list(shape)} has data_offsets "
            f"[{begin}, {end}] inconsistent with its shape"
        )
    return dtype, shape, begin, end


def indexed_shards(index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names, sorted, each once."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None


def weight_names(names: list[str]) -> list[str]:
    """Without an index, the weight files among a folder's top-level file names:
    `model*.safetensors` (as transformers and mlx-lm look for them), else every `*.safetensors`."""
    found = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    return [n for n in found if n.startswith("model")] or found


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards its `model.safetensors.index.json` names, else
    `weight_names` of the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / s for s in indexed_shards(index)]
    return [folder / n for n in weight_names([p.name for p in folder.iterdir() if p.is_file()])]


def index_folder(folder: Path, headers: Mapping[str, tuple[bytes, int]] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint's weight files (shards included).

    headers: {weight file name: (its header, its size in bytes)} for weight files that are not in
    `folder` yet (a Hub checkpoint fetched shard by shard): those are indexed from their headers,
    each tensor's `file` being where the shard will be. Without an index file, the weight files
    are then the ones named there."""
    headers = headers or {}
    files = weight_files(folder)
    if headers and not (folder / "model.safetensors.index.json").is_file():
        files = [folder / name for name in sorted(headers)]
    missing = [f.name for f in files if f.name not in headers and not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: model.safetensors.index.json names shards that are missing: {missing[:3]}")
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (moestream reads safetensors only)")
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        found = parse_header(path, *headers[path.name]) if path.name in headers else read_header(path)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(f"{folder}: tensor {name!r} appears in {tensors[name].file.name} and {path.name}")
            tensors[name] = info
    return tensors


def read_bytes(info_file: Path, offset: int, nbytes: int) -> bytes:
    fd = os.open(info_file, os.O_RDONLY)
    try:
        data = os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)
    if len(data) != nbytes:
        raise CheckpointError(f"{info_file}: short read at offset {offset} ({len(data)} of {nbytes} bytes)")
    return data


def read_tensor(info: TensorInfo) -> mx.array:
    return from_buffer(read_bytes(info.file, info.offset, info.nbytes), info.dtype, info.shape)


