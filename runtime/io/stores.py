"""Expert stores: where the runtime gets one layer's experts from.

`BundleStore` reads packed extents of a prepared bundle; `CheckpointStore` reads experts
straight from a source checkpoint's safetensors through the family table, so an unprepared
checkpoint (one larger than memory included) runs the same way. Both read through the same
ExtentReader (O_DIRECT, coalescing) and return MLX arrays in the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ...manifests.bundle import (
    BlockChecksums,
    BundleError,
    ExpertExtent,
    TensorEntry,
    extent_views,
    parse_fast_checksum,
    unpack_extent,
)
from ...manifests.checkpoint import SourceCheckpoint, finish_slice
from ...manifests.open import Bundle
from ...manifests.tensors import DTYPES
from .reader import DEFAULT_POOL_BYTES, ExtentReader, ReadRequest
from .staging import StagingPool, bytes_at, host_buffers


@dataclass(frozen=True)
class ProjectionQuant:
    """How a projection of an expert is stored: None bits means plain (unquantized) weights."""

    bits: int | None
    group_size: int | None
    mode: str | None


def cast_floats(arrays: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    if dtype is None:
        return arrays
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in arrays.items()}


def _entry_nbytes(t: TensorEntry, dtype: mx.Dtype | None) -> int:
    if dtype is not None and t.dtype in ("bfloat16", "float16", "float32"):
        return t.nbytes // DTYPES[t.dtype][0] * dtype.size
    return t.nbytes


READ_INTO = ("arrays", "host")


class ExtentCheck:
    """An extent's per-block fast checksums, in the form the reader checks as blocks arrive."""

    def __init__(self, label: str, sums: BlockChecksums):
        self.label, self.sums, self.block_bytes = label, sums, sums.block_bytes

    def check(self, index: int, data) -> None:
        if not self.sums.block_matches(index, data):
            raise BundleError(f"{self.label}: the bytes read do not match the extent's checksum (block {index} "
                              f"of {self.block_bytes} bytes): the bundle's expert file is damaged; "
                              "`moestream verify` checks every extent")


class BundleStore:
    """Experts of a prepared bundle.

    read_into="arrays" (the default): each missed extent is read straight into the memory of an
    MLX array made for it, and its tensors are views of that array: the expert's bytes are
    written once, by the disk, and never copied. "host": read into the reader's host buffers,
    then copied into MLX arrays (`mx.array(numpy)`: a copy that holds the GIL, so the reader
    threads' copies run one at a time); kept to measure against.
    stage_on_device: read into reusable staging arrays (on CUDA advised to stay in host memory,
    mapped for the GPU: see staging.py) and copy each expert into device memory with one GPU op
    in the I/O thread, so that moving the bytes to the GPU overlaps the other reads instead of
    landing, as page faults, on the layer's compute.
    """

    def __init__(self, bundle: Bundle, reader: ExtentReader, dtype: mx.Dtype | None = None,
                 read_into: str = "arrays", stage_on_device: bool = False, check_reads: bool = True):
        if read_into not in READ_INTO:
            raise ValueError(f"read_into must be one of {READ_INTO}, got {read_into!r}")
        self.bundle, self.reader, self.dtype = bundle, reader, dtype
        self.read_into, self.stage_on_device = read_into, stage_on_device
        # every extent's fast checksum (format 2) on every read from disk: a damaged expert is an
        # error naming it, never a wrong token
        self.check_reads = check_reads
        self._checks: dict = {}
        self.staging = StagingPool(DEFAULT_POOL_BYTES)
        self._idle_bytes = DEFAULT_POOL_BYTES
        self._quant: dict = {}  # per-call lookups, computed once per expert
        self._nbytes: dict = {}

    @property
    def layers(self) -> dict[int, str]:
        return self.bundle.layers

    def close(self) -> None:
        self.staging.close()

    def limit_idle_buffers(self, nbytes: int) -> None:
        """Keep at most nbytes of idle read buffers (host buffers, staging slots) between reads:
        what a memory budget counts for them."""
        self._idle_bytes = nbytes
        self.reader.limit_idle_buffers(nbytes)
        self.staging.limit_idle(nbytes)

    def keep_buffers_for(self, nbytes: int) -> None:
        """Keep idle staging slots for reads of up to nbytes at once (at least limit_idle_buffers'
        bytes): while a forward pass reads more than one layer's experts at a time (a prefill's
        groups, a batch's misses), each read takes the slots the one before gave back instead of
        making new ones. A smaller nbytes drops what is beyond it."""
        self.staging.limit_idle(max(self._idle_bytes, nbytes))

    def quant(self, layer: int, expert: int) -> dict[str, ProjectionQuant]:
        key = (layer, expert)
        if key not in self._quant:
            e = self.bundle.extent(layer, expert)
            self._quant[key] = {t.name.rsplit(".", 1)[0]: ProjectionQuant(t.bits, t.group_size, t.mode)
                                for t in e.tensors if t.name.endswith(".weight")}
        return self._quant[key]

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes the expert takes in memory once loaded (in the compute dtype)."""
        key = (layer, expert)
        if key not in self._nbytes:
            self._nbytes[key] = sum(_entry_nbytes(t, self.dtype) for t in self.bundle.extent(layer, expert).tensors)
        return self._nbytes[key]

    def read(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        extents: list[ExpertExtent] = sorted((self.bundle.extent(layer, e) for e in experts), key=lambda x: (x.file, x.offset))
        requests = [ReadRequest(str(self.bundle.path(x.file)), x.offset, x.nbytes, x.label, self._check(x))
                    for x in extents]
        if self.read_into == "host" or any(x.codec != "none" for x in extents):
            return self._read_host(extents, requests)
        if self.stage_on_device:
            return self._read_staged(extents, requests)
        return self._read_arrays(extents, requests)

    def _check(self, x: ExpertExtent) -> ExtentCheck | None:
        """What the reader checks an extent's bytes against as they arrive (None: not checked)."""
        if not self.check_reads or x.fast_checksum is None:
            return None
        key = (x.layer, x.expert)
        if key not in self._checks:
            self._checks[key] = ExtentCheck(x.label, parse_fast_checksum(x.fast_checksum, x.nbytes))
        return self._checks[key]

    def _finish(self, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
        arrays = cast_floats(arrays, self.dtype)
        # MLX streams belong to the thread that made them: materialise the views and casts in
        # the I/O thread, so that the main thread receives plain arrays with nothing left to run.
        mx.eval(list(arrays.values()))
        return arrays

    def _read_arrays(self, extents, requests) -> dict[int, dict[str, mx.array]]:
        """Straight into one fresh MLX array per extent; the tensors are views of it."""
        targets: dict[int, tuple[mx.array, np.ndarray]] = {}  # request index -> its target

        def into(needs: list[tuple[int, int]]) -> list[memoryview]:
            for (i, _), target in zip(needs, host_buffers([n for _, n in needs]), strict=True):
                targets[i] = target
            return [memoryview(targets[i][1]) for i, _ in needs]

        def convert(i: int, buf) -> dict[str, mx.array]:  # runs in the I/O thread that finished it
            x = extents[i]
            with mx.stream(mx.cpu):  # views only: no data moves
                arrays = extent_views(bytes_at(targets.pop(i), buf, x.nbytes), 0, x.tensors)
            return self._finish(arrays)

        arrays = self.reader.read(requests, convert, into)
        return {x.expert: a for x, a in zip(extents, arrays, strict=True)}

    def _read_staged(self, extents, requests) -> dict[int, dict[str, mx.array]]:
        """Into reusable staging arrays, then one GPU copy per expert (in the I/O thread) into
        device memory, whose views the tensors are; the staging array is reused at once."""
        slots: dict[int, tuple] = {}

        def into(needs: list[tuple[int, int]]) -> list[memoryview]:
            views = []
            for i, n in needs:
                slots[i], view = self.staging.take(n)
                views.append(view)
            return views

        def convert(i: int, buf) -> dict[str, mx.array]:
            x, slot = extents[i], slots.pop(i)
            try:
                staged = bytes_at(slot, buf, x.nbytes) + mx.array(0, mx.uint8)  # the copy
                mx.eval(staged)
            finally:
                self.staging.give(slot)
            return self._finish(extent_views(staged, 0, x.tensors))

        try:
            arrays = self.reader.read(requests, convert, into)
        finally:
            for slot in slots.values():  # a failed read: its slots were never converted
                self.staging.give(slot)
        return {x.expert: a for x, a in zip(extents, arrays, strict=True)}

    def _read_host(self, extents, requests) -> dict[int, dict[str, mx.array]]:
        """Into the reader's host buffers, then copied into MLX arrays (zstd extents, and the
        "host" mode kept to measure against)."""

        def convert(i: int, buf) -> dict[str, mx.array]:
            x = extents[i]
            if x.codec == "zstd":
                buf = _unzstd(x, buf)
            arrays = unpack_extent(buf, x.tensors)
            if self.stage_on_device:
                arrays = {k: v + mx.array(0, v.dtype) for k, v in arrays.items()}
            return self._finish(arrays)

        arrays = self.reader.read(requests, convert)
        return {x.expert: a for x, a in zip(extents, arrays, strict=True)}


def _unzstd(x: ExpertExtent, buf) -> bytes:
    """A zstd extent's bytes, never more than its row says (a frame may claim 2**40)."""
    import zstandard

    try:
        size = zstandard.frame_content_size(buf)
        if size != x.raw_nbytes:
            raise BundleError(f"{x.label}: its zstd frame holds {size} bytes, layout.parquet says {x.raw_nbytes}")
        return zstandard.ZstdDecompressor().decompress(buf, max_output_size=x.raw_nbytes)
    except zstandard.ZstdError as e:
        raise BundleError(f"{x.label}: not a zstd frame ({e})") from None


class CheckpointStore:
    def __init__(self, ckpt: SourceCheckpoint, reader: ExtentReader, dtype: mx.Dtype | None = None):
        self.ckpt, self.reader, self.dtype = ckpt, reader, dtype
        self._layers = {layer: ckpt.module_path(layer) for layer in ckpt.expert_layers}
        self._slices: dict = {}  # per-call lookups, computed once per expert (as in BundleStore)
        self._nbytes: dict = {}

    @property
    def layers(self) -> dict[int, str]:
        return self._layers

    def limit_idle_buffers(self, nbytes: int) -> None:
        """Keep at most nbytes of the reader's idle host buffers between reads."""
        self.reader.limit_idle_buffers(nbytes)

    def keep_buffers_for(self, nbytes: int) -> None:
        """Nothing to keep: a checkpoint's experts are read into the reader's pooled buffers, with no
        staging (BundleStore.keep_buffers_for)."""

    def _expert_slices(self, layer: int, expert: int):
        key = (layer, expert)
        if key not in self._slices:
            self._slices[key] = self.ckpt.expert_slices(layer, expert)
        return self._slices[key]

    def quant(self, layer: int, expert: int) -> dict[str, ProjectionQuant]:
        return {n.rsplit(".", 1)[0]: ProjectionQuant(None, None, None)
                for n in self._expert_slices(layer, expert) if n.endswith(".weight")}

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes the expert's tensors take in memory (not the bytes read: a fused gate_up row is
        read once and kept as two halves)."""
        key = (layer, expert)
        if key not in self._nbytes:
            total = 0
            for s in self._expert_slices(layer, expert).values():
                info = self.ckpt.tensors[s.tensor]
                item = DTYPES[info.dtype][0]
                total += slice_numel(s, info) * (self.dtype.size if self.dtype is not None else item)
            self._nbytes[key] = total
        return self._nbytes[key]

    def read(self, layer: int, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        plan = []  # (expert, name, slice, tensor info, index of its byte range)
        ranges: dict[tuple, int] = {}  # each byte range read once, e.g. the gate_up row both halves come from
        requests = []
        out: dict[int, dict[str, mx.array]] = {e: {} for e in experts}
        for e in experts:
            slices = self._expert_slices(layer, e)
            if any(s.tensor in self.ckpt.quantized for s in slices.values()):
                out[e] = self.ckpt.read_expert(layer, e)  # quantized source: dequantized (bfloat16)
                continue
            for name, s in slices.items():
                info, offset, nbytes = self.ckpt.slice_range(s)
                key = (str(info.file), offset, nbytes)
                if key not in ranges:
                    ranges[key] = len(requests)
                    requests.append(ReadRequest(*key, f"layer {layer} expert {e} {s.tensor}"))
                plan.append((e, name, s, info, ranges[key]))
        bufs = self.reader.read(requests) if requests else []
        for e, name, s, info, i in plan:
            out[e][name] = finish_slice(s, info, bufs[i])
        return {e: cast_floats(t, self.dtype) for e, t in out.items()}


def slice_numel(s, info) -> int:
    """Elements of the tensor an ExpertSlice yields (shape arithmetic only)."""
    shape = list(info.shape if s.expert is None else info.shape[1:])
    shape[s.axis] = len(range(*slice(s.start, s.stop, s.step).indices(shape[s.axis])))
    return math.prod(shape)
