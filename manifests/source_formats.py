"""Quantized tensors in a source checkpoint, seen as the float tensors they stand for.

Big MoE models ship quantized: fp8 e4m3 with 128x128 block scales (`W` + `W_scale_inv`;
DeepSeek-V3/R1, Kimi-K2, GLM-4.5, MiniMax-M2, Qwen3 FP8), MXFP4 (`X_blocks` + `X_scales`; gpt-oss),
or MLX's own formats (`mlx_lm.convert` output as on mlx-community: `X.weight` uint32 codes +
`X.scales` (+ `X.biases` for affine), bits and group size in config.json's `quantization`, per
module where the recipe is mixed). Each group of stored tensors becomes one *logical* tensor with
the float shape it stands for, so that deriving the expert layout works the same on every format;
reading a logical tensor either dequantizes it (to bfloat16, as mlx-lm does) or hands back its
packed parts, sliced by rows, where MLX computes that format as it is (mxfp4, MLX affine).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from .safetensors_index import CheckpointError, TensorInfo

FP8_BLOCK = 128
MXFP4_GROUP = 32


@dataclass(frozen=True)
class QuantizedTensor:
    """A logical float tensor stored quantized."""

    kind: str  # "fp8" (e4m3 + block scale_inv), "mxfp4" (blocks + e8m0 scales), "mlx" (MLX codes)
    parts: dict[str, TensorInfo]  # fp8: weight, scale_inv; mxfp4: blocks, scales; mlx: weight, scales[, biases]
    bits: int
    group_size: int
    mode: str  # the MLX quantization mode: "affine", "mxfp4" (fp8: "fp8", which MLX does not compute)

    @property
    def native(self) -> bool:
        """MLX's gather_qmm computes this format as it is stored."""
        return self.kind in ("mxfp4", "mlx")


def _logical(name: str, base: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
    return replace(base, name=name, dtype="bfloat16", shape=tuple(shape), nbytes=0)


def logical_tensors(tensors: dict[str, TensorInfo], config: dict) -> tuple[dict[str, TensorInfo], dict[str, QuantizedTensor]]:
    """(every tensor as a float tensor: quantized groups replaced by one logical tensor each,
    {logical name: how it is stored})."""
    out, quantized = dict(tensors), {}
    mlx_recipe = config.get("quantization") or (config.get("text_config") or {}).get("quantization")
    for name, info in tensors.items():
        if info.dtype == "float8_e4m3" and f"{name}_scale_inv" in tensors:
            q = QuantizedTensor("fp8", {"weight": info, "scale_inv": tensors[f"{name}_scale_inv"]}, 8, FP8_BLOCK, "fp8")
            out.pop(f"{name}_scale_inv")
            out[name] = _logical(name, info, info.shape)
        elif name.endswith("_blocks") and info.dtype == "uint8" and f"{name[:-7]}_scales" in tensors:
            base, scales = name[:-7], tensors[f"{name[:-7]}_scales"]
            q = QuantizedTensor("mxfp4", {"blocks": info, "scales": scales}, 4, MXFP4_GROUP, "mxfp4")
            out.pop(name)
            out.pop(f"{base}_scales")
            shape = (*info.shape[:-2], info.shape[-2] * info.shape[-1] * 2)  # two 4-bit codes per byte
            out[base] = _logical(base, info, shape)
            name = base
        elif (name.endswith(".weight") and info.dtype == "uint32" and mlx_recipe
              and f"{name[:-7]}.scales" in tensors):
            q = _mlx_quantized(name, info, tensors, mlx_recipe)
            for part in ("scales", "biases"):
                out.pop(f"{name[:-7]}.{part}", None)
            out[name] = _logical(name, info, (*info.shape[:-1], info.shape[-1] * 32 // q.bits))
        else:
            continue
        quantized[name] = q
    return out, quantized


def _mlx_quantized(name: str, info: TensorInfo, tensors: dict[str, TensorInfo], recipe: dict) -> QuantizedTensor:
    """MLX codes: bits and group size from config.json's quantization (per module where mixed),
    checked against the stored shapes (mlx-lm infers them the same way)."""
    module = name[:-7]
    own = recipe.get(module) if isinstance(recipe.get(module), dict) else {}
    scales = tensors[f"{module}.scales"]
    bits = own.get("bits") or recipe.get("bits")
    mode = own.get("mode") or recipe.get("mode", "affine")
    words, groups = info.shape[-1], scales.shape[-1]
    in_dims = words * 32 // bits if bits else 0
    group = in_dims // groups if groups else 0
    want = own.get("group_size") or (None if own else recipe.get("group_size"))
    if not bits or words * 32 % bits or not group or in_dims % groups or (want and want != group):
        raise CheckpointError(f"{name}: {words} uint32 words and {groups} scales per row do not agree with config.json's "
                              f"quantization (bits {bits}, group size {want})")
    parts = {"weight": info, "scales": scales}
    if f"{module}.biases" in tensors:
        parts["biases"] = tensors[f"{module}.biases"]
    elif mode == "affine":
        raise CheckpointError(f"{module}: affine MLX quantization without {module}.biases")
    return QuantizedTensor("mlx", parts, int(bits), int(group), mode)


def dequantize_fp8(weight: mx.array, scale_inv: mx.array) -> mx.array:
    """fp8 e4m3 with one scale per 128x128 block, to bfloat16: the same arithmetic as mlx-lm's
    DeepSeek-V3 sanitize (pad to whole blocks, scale, crop)."""
    w = mx.from_fp8(weight, dtype=mx.bfloat16)
    *lead, m, n = w.shape
    pad_m, pad_n = (-m) % FP8_BLOCK, (-n) % FP8_BLOCK
    w = mx.pad(w, [(0, 0)] * len(lead) + [(0, pad_m), (0, pad_n)])
    w = w.reshape(*lead, (m + pad_m) // FP8_BLOCK, FP8_BLOCK, (n + pad_n) // FP8_BLOCK, FP8_BLOCK)
    w = (w * scale_inv[..., :, None, :, None]).reshape(*lead, m + pad_m, n + pad_n)
    return w[..., :m, :n].astype(mx.bfloat16)


def mxfp4_parts(blocks: mx.array, scales: mx.array) -> tuple[mx.array, mx.array]:
    """gpt-oss's MXFP4 (`_blocks` [..., n, 16] uint8, `_scales` [..., n] uint8) as MLX's mxfp4
    quantized weight (uint32 codes) and scales, bit for bit (as mlx-lm's gpt-oss sanitize)."""
    return blocks.view(mx.uint32).flatten(-2), scales


def dequantize(q: QuantizedTensor, parts: dict[str, mx.array]) -> mx.array:
    """A quantized tensor's values (its parts already read): bfloat16, or for MLX codes the dtype
    of their scales, as mlx-lm computes them."""
    if q.kind == "fp8":
        return dequantize_fp8(parts["weight"], parts["scale_inv"])
    if q.kind == "mxfp4":
        w, s = mxfp4_parts(parts["blocks"], parts["scales"])
        return mx.dequantize(w, s, None, group_size=q.group_size, bits=q.bits, mode="mxfp4").astype(mx.bfloat16)
    return mx.dequantize(parts["weight"], parts["scales"], parts.get("biases"), group_size=q.group_size, bits=q.bits,
                         mode=q.mode)
