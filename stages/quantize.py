"""Hybrid quantization: routed experts to low bits, everything else left as it is.

An expert's projections are quantized one expert at a time with `mx.quantize` in the source
dtype. Quantization groups run along each row, so quantizing expert e alone gives exactly the
rows mlx-lm's `nn.quantize` produces for `switch_mlp.<proj>.weight[e]` of the stacked tensor.
"source" keeps an expert as the checkpoint stores it where MLX computes that format (MLX codes,
MXFP4: packed as they are, bit for bit), and at source precision otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..common.errors import OptionsError
from ..manifests.bundle import PackedTensor
from ..manifests.tensors import dtype_name, to_numpy_bits

EXPERT_BITS = (2, 3, 4, 8, 16, "source")  # 16: the source precision; source: as stored
GROUP_SIZES = (32, 64, 128)
PROJECTION_ORDER = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")


@dataclass(frozen=True)
class ExpertRecipe:
    """How routed experts are stored; `bits` is the default a plan can override per expert."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self):
        if self.bits not in EXPERT_BITS:
            raise OptionsError(f"expert bits must be one of {', '.join(map(str, EXPERT_BITS))}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise OptionsError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.mode != "affine":
            raise OptionsError(f"only the 'affine' quantization mode is made here, got {self.mode!r}")


def _packed(name: str, arr: mx.array, bits=None, group_size=None, mode=None) -> PackedTensor:
    bits_arr = to_numpy_bits(arr)
    return PackedTensor(name, bits_arr.tobytes(), dtype_name(arr.dtype), tuple(arr.shape), bits, group_size, mode)


def quantize_expert(tensors: dict[str, mx.array], bits: int | str, recipe: ExpertRecipe, where: str,
                    stored: dict | None = None) -> list[PackedTensor]:
    """One expert's tensors, weights quantized to `bits` (16 = as they are), ready to pack.
    bits "source": the projections in `stored` (projection -> QuantizedTensor: how the source
    stores it) are already MLX codes and scales and are packed as they are; the rest as they are."""
    out, stored = [], stored or {}
    for name in sorted(tensors, key=_tensor_order):
        arr = tensors[name]
        proj = name.rsplit(".", 1)[0]
        if proj in stored and name.endswith((".weight", ".scales", ".biases")):
            q = stored[proj]
            out.append(_packed(name, arr, q.bits, q.group_size, q.mode))
            continue
        if bits in (16, "source") or not name.endswith(".weight"):
            out.append(_packed(name, arr))
            continue
        if arr.ndim != 2 or arr.shape[-1] % recipe.group_size:
            raise ValueError(
                f"{where} {name}: shape {list(arr.shape)} cannot be quantized with group size "
                f"{recipe.group_size} (the input dimension must be a multiple of it)"
            )
        wq, scales, biases = mx.quantize(arr, group_size=recipe.group_size, bits=bits, mode=recipe.mode)
        proj = name[: -len(".weight")]
        q = dict(bits=bits, group_size=recipe.group_size, mode=recipe.mode)
        out += [_packed(name, wq, **q), _packed(f"{proj}.scales", scales, **q), _packed(f"{proj}.biases", biases, **q)]
    return out


def _tensor_order(name: str) -> tuple[int, str]:
    proj = name.split(".")[0]
    return (PROJECTION_ORDER.index(proj) if proj in PROJECTION_ORDER else len(PROJECTION_ORDER), name)
