"""Staging buffers: where expert bytes land on their way from the disk to the GPU.

MLX's CUDA backend gives host-made arrays managed (unified) memory. By default the driver migrates
a managed page to whichever processor touched it last, so an expert read by the disk (a host
write) and then used by a kernel moves its pages to the GPU by page faults, and reusing that memory
for the next read faults them back: both ways at a few GB/s, which is slower than the copies it
replaces. So on CUDA the reader fills a small pool of staging arrays that are advised to live in
host memory and be mapped for the GPU (`cudaMemAdvise`: preferred location host, accessed by the
device): the disk writes them without faults, and one GPU copy per expert, in the I/O thread,
moves the bytes into device memory over the bus. The pool's arrays are allocated once and reused.

Without the CUDA runtime (CPU backend, Apple silicon's unified memory), the pool still works; the
advice is simply not given.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import mlx.core as mx
import numpy as np

from .reader import ALIGN

# cudaMemoryAdvise and cudaMemLocationType values (cuda_runtime_api.h / driver_types.h)
_ADVISE_SET_PREFERRED_LOCATION = 3
_ADVISE_SET_ACCESSED_BY = 5
_LOCATION_DEVICE = 1
_LOCATION_HOST = 2
_CPU_DEVICE_ID = -1  # cudaCpuDeviceId, in the pre-13 int-device form


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CudaAdvice:
    """`cudaMemAdvise` through ctypes, from the CUDA runtime MLX itself loaded; `available` is
    False (and `why` says why) when there is none or it refuses."""

    def __init__(self, lib=None):
        """lib: the CUDA runtime (default: found as MLX loaded it, when MLX runs on CUDA)."""
        self.available, self.why, self._lib, self._struct = False, "", None, True
        if os.environ.get("MOESTREAM_CUDA_ADVICE", "1") == "0":
            self.why = "disabled by MOESTREAM_CUDA_ADVICE=0"
            return
        if lib is None:
            if not mlx_uses_cuda():
                self.why = "MLX is not running on CUDA"
                return
            lib = _load_cudart()
        if lib is None:
            self.why = "libcudart not found"
            return
        version = ctypes.c_int(0)
        if lib.cudaRuntimeGetVersion(ctypes.byref(version)) != 0:
            self.why = "cudaRuntimeGetVersion failed"
            return
        # CUDA 13 takes a cudaMemLocation by value; 12.x has that form as cudaMemAdvise_v2
        if version.value >= 13000:
            self._advise = lib.cudaMemAdvise
        elif hasattr(lib, "cudaMemAdvise_v2"):
            self._advise = lib.cudaMemAdvise_v2
        else:
            self._advise, self._struct = lib.cudaMemAdvise, False
        self._advise.restype = ctypes.c_int
        self._lib, self.available, self.version = lib, True, version.value

    def host_resident(self, address: int, nbytes: int) -> bool:
        """Keep [address, +nbytes) of managed memory in host RAM, mapped for GPU 0."""
        if not self.available:
            return False
        ptr, n = ctypes.c_void_p(address), ctypes.c_size_t(nbytes)
        if self._struct:
            a = self._advise(ptr, n, _ADVISE_SET_PREFERRED_LOCATION, _MemLocation(_LOCATION_HOST, 0))
            b = self._advise(ptr, n, _ADVISE_SET_ACCESSED_BY, _MemLocation(_LOCATION_DEVICE, 0))
        else:
            a = self._advise(ptr, n, _ADVISE_SET_PREFERRED_LOCATION, ctypes.c_int(_CPU_DEVICE_ID))
            b = self._advise(ptr, n, _ADVISE_SET_ACCESSED_BY, ctypes.c_int(0))
        if a or b:
            self.available, self.why = False, f"cudaMemAdvise returned {a or b}"
            return False
        return True


def mlx_uses_cuda() -> bool:
    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


def _load_cudart():
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:  # already loaded by MLX: dlopen by soname finds it
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for base in sys.path:
        for path in sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*"))):
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
    return None


_advice: CudaAdvice | None = None
_advice_lock = threading.Lock()


def cuda_advice() -> CudaAdvice:
    global _advice
    with _advice_lock:
        if _advice is None:
            _advice = CudaAdvice()
        return _advice


def host_buffers(sizes: list[int]) -> list[tuple[mx.array, np.ndarray]]:
    """One read target per size: (a uint8 MLX array made on the CPU stream, i.e. host-writable
    memory, managed memory on CUDA; the ALIGN-aligned numpy view of `size` bytes of it). One eval
    for the batch. Zero-filled as uint32 words, twice as fast as byte by byte: MLX has no
    uninitialised arrays."""
    raws = [mx.view(mx.zeros((-(-(n + ALIGN) // 4),), mx.uint32, stream=mx.cpu), mx.uint8, stream=mx.cpu)
            for n in sizes]
    mx.eval(raws)
    out = []
    for n, raw in zip(sizes, raws, strict=True):
        host = np.array(raw, copy=False)
        skip = -host.ctypes.data % ALIGN
        out.append((raw, host[skip : skip + n]))
    return out


def bytes_at(target: tuple[mx.array, np.ndarray], view, nbytes: int) -> mx.array:
    """The bytes of `view` (a slice of the target's memory) as a lazy uint8 MLX slice of it."""
    raw, _ = target
    start = np.frombuffer(view, dtype=np.uint8).ctypes.data - np.array(raw, copy=False).ctypes.data
    return raw[start : start + nbytes]


class StagingPool:
    """Reusable host-writable MLX uint8 arrays for reads that are copied to the device.

    take(n) -> (slot, aligned writable view of n bytes); give(slot) once the bytes have been copied
    out (the GPU copy evaluated). At most `max_idle_bytes` of idle slots are kept; more are made
    when a read needs more at once (a prefill group, several batches in flight) and dropped when
    given back. Making a slot is not free: fresh memory is zero-filled and faulted in (on CUDA,
    managed memory, then advised), in the thread that starts the read, before any byte of it is
    read; so a caller that knows its reads will be larger for a while raises the limit for that
    while (limit_idle).
    """

    def __init__(self, max_idle_bytes: int):
        self.max_idle_bytes = max_idle_bytes
        self._free: list[tuple[mx.array, np.ndarray]] = []
        self._idle = 0
        self._lock = threading.Lock()
        self.allocations = 0
        self.advised = 0

    def take(self, n: int) -> tuple[tuple[mx.array, np.ndarray], memoryview]:
        with self._lock:
            fits = [s for s in self._free if n <= s[1].nbytes <= 2 * n + (1 << 20)]
            if fits:
                slot = min(fits, key=lambda s: s[1].nbytes)
                self._free.remove(slot)
                self._idle -= slot[1].nbytes
                return slot, memoryview(slot[1])[:n]
            self.allocations += 1
        size = -(-n // ALIGN) * ALIGN
        slot = host_buffers([size])[0]
        if cuda_advice().host_resident(slot[1].ctypes.data, size):
            self.advised += 1
        return slot, memoryview(slot[1])[:n]

    def limit_idle(self, nbytes: int) -> None:
        """Keep at most nbytes of idle slots from now on, dropping the largest idle ones beyond it."""
        with self._lock:
            self.max_idle_bytes = nbytes
            self._free.sort(key=lambda s: s[1].nbytes)
            while self._free and self._idle > nbytes:
                self._idle -= self._free.pop()[1].nbytes

    def close(self) -> None:
        """Drop the idle slots and keep none from now on."""
        with self._lock:
            self.max_idle_bytes = 0
            self._free.clear()
            self._idle = 0

    def give(self, slot) -> None:
        with self._lock:
            if self._idle + slot[1].nbytes <= self.max_idle_bytes:
                self._free.append(slot)
                self._idle += slot[1].nbytes
