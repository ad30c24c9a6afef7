"""Quantized source checkpoints, each against mlx-lm loading that very checkpoint (the reference):

- MLX codes (`mlx_lm.convert` output, uniform and per-layer mixed recipes): experts repacked bit for
  bit, resident weights kept quantized, logits identical;
- MXFP4 (gpt-oss's `*_blocks` / `*_scales`): kept as MXFP4 (no requantization), logits identical;
  `--expert-bits 16` dequantizes;
- fp8 e4m3 with 128x128 block scales (DeepSeek-V3 style): dequantized as mlx-lm does, logits identical.

The quantized checkpoints are made here from synth ones with mlx-lm's own convert, MLX's own
mx.quantize(mode="mxfp4") and mx.to_fp8, written in the layouts the Hub repos use."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

import moestream
from moestream.manifests.bundle import unpack_extent
from moestream.manifests.corrections import correct_model
from moestream.manifests.open import open_bundle
from moestream.manifests.safetensors_index import index_folder
from moestream.stages.prepare import RequantizeWarning

PROMPT = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8] * 6  # 72 tokens: the sorted path too


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]]) -> None:
    """name -> (safetensors dtype, shape, raw bytes): any dtype, F8_E4M3 included."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, data in tensors.values():
            f.write(data)


def _source_tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _bytes(a: mx.array) -> bytes:
    a = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    return np.array(a).tobytes()


def _copy_meta(src: Path, dst: Path, config: dict) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config))


def make_mxfp4(src: Path, dst: Path) -> Path:
    """gpt-oss as published: experts as MXFP4 blocks and scales, W @ x, gate/up rows interleaved."""
    out = {}
    for name, v in _source_tensors(src).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = v.swapaxes(-1, -2)  # transformers' bf16 layout is x @ W; the Hub's MXFP4 is W @ x
            codes, scales = mx.quantize(w.reshape(-1, w.shape[-1]), group_size=32, bits=4, mode="mxfp4")
            blocks = codes.view(mx.uint8).reshape(*w.shape[:-1], w.shape[-1] // 32, 16)
            out[f"{name}_blocks"] = ("U8", blocks.shape, _bytes(blocks))
            out[f"{name}_scales"] = ("U8", (*w.shape[:-1], w.shape[-1] // 32), _bytes(scales))
        else:
            out[name] = ("BF16", v.shape, _bytes(v))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "self_attn"]}
    _copy_meta(src, dst, config)
    _write_safetensors(dst / "model.safetensors", out)
    return dst


def make_fp8(src: Path, dst: Path) -> Path:
    """DeepSeek-V3 as published: every Linear weight but embeddings, head and routers in fp8 e4m3
    with one float32 scale per 128x128 block (`weight_scale_inv`)."""
    out = {}
    for name, v in _source_tensors(src).items():
        linear = name.endswith(".weight") and v.ndim == 2 and not any(
            k in name for k in ("embed", "lm_head", "norm", "mlp.gate."))
        if not linear:
            out[name] = ("BF16" if v.dtype == mx.bfloat16 else "F32", v.shape, _bytes(v))
            continue
        m, n = v.shape
        pm, pn = -m % 128, -n % 128
        blocks = mx.pad(v.astype(mx.float32), [(0, pm), (0, pn)]).reshape((m + pm) // 128, 128, (n + pn) // 128, 128)
        scale = mx.maximum(mx.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
        q = mx.to_fp8((blocks / scale[:, None, :, None]).reshape(m + pm, n + pn)[:m, :n])
        out[name] = ("F8_E4M3", q.shape, _bytes(q))
        out[f"{name}_scale_inv"] = ("F32", scale.shape, _bytes(scale))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    _copy_meta(src, dst, config)
    _write_safetensors(dst / "model.safetensors", out)
    return dst


def make_mlx(src: Path, dst: Path, **convert_options) -> Path:
    from mlx_lm import convert

    convert(str(src), str(dst), quantize=True, **convert_options)
    return dst


def _mlx_lm(checkpoint: Path):
    model, config = load_model(Path(checkpoint))
    correct_model(model, config)
    model.set_dtype(mx.float32)
    return model


def _assert_same_logits(bundle: Path, reference, tol: float = 1e-5) -> None:
    prompt = mx.array([PROMPT])
    want = reference(prompt)
    budget = moestream.plan_memory(bundle, expert_cache_share=0.3).budget_bytes
    for memory_budget in (None, budget):
        with moestream.load(bundle, dtype="float32", memory_budget=memory_budget) as (model, _):
            got = model(prompt)
        diff, scale = float(mx.abs(got - want).max()), float(mx.abs(want).max())
        assert diff <= tol * scale, f"budget={memory_budget}: max |diff| {diff} vs max |logit| {scale}"


@pytest.mark.parametrize("recipe", [{"q_bits": 4, "q_group_size": 32}, {"quant_predicate": "mixed_3_6"}])
def test_mlx_quantized_checkpoint_is_repacked_bit_for_bit(tmp_path, synth_dir, recipe):
    src = make_mlx(synth_dir("qwen3_moe"), tmp_path / "mlx", **recipe)
    meta = moestream.prepare(src, tmp_path / "bundle", engine="plain").meta
    assert meta["experts"]["plan"] in ("uniform", "per-expert") and meta["resident"]["bits"] is not None
    stored = _source_tensors(src)
    bundle = open_bundle(tmp_path / "bundle", verify=True)
    for layer, path in bundle.layers.items():
        extent = bundle.extent(layer, 3)
        with open(bundle.path(extent.file), "rb") as f:
            f.seek(extent.offset)
            packed = unpack_extent(f.read(extent.nbytes), extent.tensors)
        for name, arr in packed.items():
            assert _bytes(arr) == _bytes(stored[f"{path}.{name}"][3]), f"layer {layer} {name}"
    resident = mx.load(str(tmp_path / "bundle" / "resident.safetensors"))
    assert resident["model.embed_tokens.weight"].dtype == mx.uint32, "resident weights stay quantized"
    _assert_same_logits(tmp_path / "bundle", _mlx_lm(src))


def test_requantizing_a_quantized_source_is_explicit_and_warns(tmp_path, synth_dir):
    src = make_mlx(synth_dir("qwen3_moe"), tmp_path / "mlx", q_bits=4, q_group_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moestream.prepare(src, tmp_path / "b8", engine="plain", expert_bits=8, group_size=64)
    assert [w.category for w in caught].count(RequantizeWarning) == 1
    assert "requantizes" in str(next(w for w in caught if w.category is RequantizeWarning).message)
    assert open_bundle(tmp_path / "b8").meta["experts"]["bits"] == 8


def test_mxfp4_experts_stay_mxfp4_and_match_mlx_lm(tmp_path, synth_dir):
    src = make_mxfp4(synth_dir("gpt_oss"), tmp_path / "mxfp4")
    assert any(i.name.endswith("_blocks") for i in index_folder(src).values())
    meta = moestream.prepare(src, tmp_path / "bundle", engine="plain").meta
    assert meta["experts"]["mode"] == "mxfp4" and meta["experts"]["bits"] == 4
    entry = open_bundle(tmp_path / "bundle").extent(0, 0).tensors
    assert {t.name for t in entry} >= {"gate_proj.weight", "gate_proj.scales", "down_proj.bias"}
    assert not any(t.name.endswith(".biases") for t in entry), "mxfp4 has no affine biases"
    _assert_same_logits(tmp_path / "bundle", _mlx_lm(src))
    # source precision: the same values, dequantized (computed by gather_mm instead of gather_qmm)
    moestream.prepare(src, tmp_path / "b16", engine="plain", expert_bits=16)
    assert open_bundle(tmp_path / "b16").meta["experts"]["bits"] == 16
    _assert_same_logits(tmp_path / "b16", _mlx_lm(src), tol=1e-3)


def test_fp8_block_scaled_checkpoint_is_dequantized_as_mlx_lm_does(tmp_path, synth_dir):
    src = make_fp8(synth_dir("deepseek_v3"), tmp_path / "fp8")
    assert any(i.dtype == "float8_e4m3" for i in index_folder(src).values())
    meta = moestream.prepare(src, tmp_path / "bundle", engine="plain").meta
    assert meta["experts"]["bits"] == 16, "fp8 experts are dequantized by default: MLX does not compute e4m3 blocks"
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert "quantization_config" not in config and "quantization" not in config
    _assert_same_logits(tmp_path / "bundle", _mlx_lm(src))
    moestream.prepare(src, tmp_path / "b4", engine="plain", expert_bits=4)
    assert open_bundle(tmp_path / "b4").meta["experts"]["bits"] == 4
    _assert_same_logits(src, _mlx_lm(src))  # the unprepared checkpoint, its experts read and dequantized per call
