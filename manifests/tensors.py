"""Dtypes and raw-byte conversions shared by the bundle format and checkpoint reading.

MLX arrays are the unit of computation, but bytes on disk are handled with numpy, which has no
bfloat16: bf16 travels as its uint16 bit pattern and is reinterpreted (never converted) in MLX.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

# name -> (bytes per element, numpy dtype carrying the bits, mlx dtype)
DTYPES: dict[str, tuple[int, np.dtype, mx.Dtype]] = {
    "bfloat16": (2, np.dtype(np.uint16), mx.bfloat16),
    "float16": (2, np.dtype(np.float16), mx.float16),
    "float32": (4, np.dtype(np.float32), mx.float32),
    "uint32": (4, np.dtype(np.uint32), mx.uint32),
    "uint8": (1, np.dtype(np.uint8), mx.uint8),
    "int8": (1, np.dtype(np.int8), mx.int8),
    "int32": (4, np.dtype(np.int32), mx.int32),
    # fp8 e4m3 (source checkpoints only): carried as its bytes; mx.from_fp8 gives the values
    "float8_e4m3": (1, np.dtype(np.uint8), mx.uint8),
}

# safetensors' dtype names -> ours
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "U32": "uint32",
    "U8": "uint8",
    "I8": "int8",
    "I32": "int32",
    "F8_E4M3": "float8_e4m3",
}


def dtype_name(dtype: mx.Dtype) -> str:
    for name, (_, _, mdt) in DTYPES.items():
        if mdt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")


def itemsize(name: str) -> int:
    return DTYPES[name][0]


def nbytes_of(dtype: str, shape) -> int:
    return itemsize(dtype) * math.prod(shape)


def to_numpy_bits(arr: mx.array) -> np.ndarray:
    """The array's exact bytes as a numpy array (bf16 as uint16 bit patterns)."""
    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return np.asarray(arr)


def from_buffer(buf, dtype: str, shape) -> mx.array:
    """An MLX array (a copy) of `dtype` and `shape` from raw bytes."""
    _, np_dtype, mx_dtype = DTYPES[dtype]
    bits = np.frombuffer(buf, dtype=np_dtype, count=math.prod(shape)).reshape(shape)
    arr = mx.array(bits)
    return arr.view(mx_dtype) if dtype == "bfloat16" else arr


def from_numpy_bits(bits: np.ndarray, dtype: str) -> mx.array:
    arr = mx.array(np.ascontiguousarray(bits))
    return arr.view(mx.bfloat16) if dtype == "bfloat16" else arr
