"""Write: assemble the bundle in its staging folder (config, tokenizer, resident weights,
layout, bundle.json), verify it, and only then rename it into place."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from ..common.files import atomic_path, is_temporary, replace_dir, write_atomic, write_json_atomic
from ..common.versions import tool_versions
from ..manifests.bundle import (
    BUNDLE_JSON,
    CONFIG_JSON,
    EXPERTS_DIR,
    EXTENT_ALIGNMENT,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUT_FILE,
    RESIDENT_FILE,
    ExpertExtent,
    expert_bytes_per_token,
    file_sha256,
)
from ..manifests.checkpoint import SourceCheckpoint
from ..manifests.layout import write_layout
from ..manifests.open import Bundle, open_bundle
from .pack import is_sidecar
from .quantize import ExpertRecipe

TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
ROUTER_SUFFIXES = ("mlp.gate", "block_sparse_moe.gate", "mlp.router", "shared_expert_gate")


@dataclass(frozen=True)
class SourceInfo:
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None


def staging_dir(out: Path) -> Path:
    """Deterministic, so that a rerun after an interruption finds the finished layers."""
    return out.parent / f".{out.name}.partial"


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for path in sorted(src.glob(pattern)):
            write_atomic(dst / path.name, path.read_bytes())
            copied.append(path.name)
    return copied


def quantize_resident(weights: dict, model, bits: int, group_size: int) -> dict:
    """Optionally store resident Linear/Embedding weights at `bits` (never routers/gates)."""
    modules = dict(model.named_modules())
    out = {}
    for name, w in weights.items():
        path = name[: -len(".weight")] if name.endswith(".weight") else None
        module = modules.get(path) if path else None
        quantizable = (
            module is not None and hasattr(module, "to_quantized") and w.ndim == 2
            and w.shape[-1] % group_size == 0 and not path.endswith(ROUTER_SUFFIXES)
        )
        if not quantizable:
            out[name] = w
            continue
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        out[name], out[f"{path}.scales"], out[f"{path}.biases"] = wq, scales, biases
    return out


def write_resident(ckpt: SourceCheckpoint, staging: Path, resident_bits: int | None, group_size: int) -> tuple[dict, int]:
    model = ckpt.build_mlx_model()
    weights = ckpt.resident_weights(model)
    config = copy.deepcopy(ckpt.mlx_config())
    # fp8 and MXFP4 resident tensors were dequantized; MLX codes stay as they are, with the source's
    # own recipe (mlx-lm applies it the same way when it loads the bundle's resident weights)
    for cfg in (config, config.get("text_config") or {}):
        cfg.pop("quantization_config", None)
        cfg.pop("quantization", None)
    kept = ckpt.resident_quantization()
    if kept:
        config["quantization"] = kept
    if resident_bits:
        weights = quantize_resident(weights, model, resident_bits, group_size)
        config["quantization"] = {"group_size": group_size, "bits": resident_bits, "mode": "affine"}
        config["quantization_config"] = config["quantization"]
    with atomic_path(staging / RESIDENT_FILE) as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    nbytes = sum(w.nbytes for w in weights.values())
    return config, nbytes


def write_bundle(
    ckpt: SourceCheckpoint,
    staging: Path,
    extents: list[ExpertExtent],
    recipe: ExpertRecipe,
    source: SourceInfo,
    resident_bits: int | None = None,
    order: str = "identity",
    profile_summary: dict | None = None,
) -> dict:
    """Write everything but the expert files into `staging`; return bundle.json's content."""
    config, resident_bytes = write_resident(ckpt, staging, resident_bits, recipe.group_size)
    write_json_atomic(staging / CONFIG_JSON, config)
    copy_tokenizer(ckpt.folder, staging)
    write_layout(staging / LAYOUT_FILE, extents)
    dims = ckpt.dims
    layers = ckpt.expert_layers
    weights = [t for e in extents for t in e.tensors if t.name.endswith(".weight")]
    bits_used = sorted({t.bits or 16 for t in weights})
    modes = sorted({t.mode for t in weights if t.mode})
    groups = sorted({t.group_size for t in weights if t.group_size})
    files = {}
    for path in sorted(staging.rglob("*")):
        rel = path.relative_to(staging).as_posix()
        if path.is_file() and is_temporary(path.name):
            path.unlink()  # left by an interrupted run
        elif path.is_file() and rel != BUNDLE_JSON and not is_sidecar(rel):
            # expert files are covered extent by extent in layout.parquet: hashing them whole too
            # would make every verify read the experts twice
            checksum = None if rel.startswith("experts/") else file_sha256(path)
            files[rel] = {"nbytes": path.stat().st_size, "checksum": checksum}
    expert_bytes = sum(e.nbytes for e in extents)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source": asdict(source),
        "family": ckpt.family,
        "model_type": ckpt.config.get("model_type"),
        "experts": {
            "num_experts": dims.num_experts,
            "experts_per_token": dims.experts_per_token,
            "num_moe_layers": len(layers),
            "bits": bits_used[0] if len(bits_used) == 1 else "mixed",
            "bits_used": bits_used,
            "group_size": (groups[0] if len(groups) == 1 else "mixed") if groups else recipe.group_size,
            "mode": modes[0] if len(modes) == 1 else ("mixed" if modes else None),
            "plan": "uniform" if len(bits_used) == 1 else "per-expert",
        },
        "layers": [{"layer": layer, "module": ckpt.module_path(layer)} for layer in layers],
        "resident": {"bits": (config.get("quantization") or {}).get("bits"), "nbytes": resident_bytes},
        "layout": {
            "extent_alignment": EXTENT_ALIGNMENT,
            "order": order,
            "expert_bytes": expert_bytes,
            "expert_bytes_per_token": expert_bytes_per_token(extents, dims.experts_per_token, len(layers)),
        },
        "files": files,
        "tools": tool_versions(),
    }
    if profile_summary is not None:
        meta["profile"] = profile_summary
    write_json_atomic(staging / BUNDLE_JSON, meta)
    return meta


def finalize(staging: Path, out: Path, overwrite: bool = False) -> Bundle:
    """Verify the staged bundle, drop the resume sidecars, then rename it into place."""
    open_bundle(staging, verify=True)
    for sidecar in staging.glob(f"{EXPERTS_DIR}/*.json"):
        sidecar.unlink()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    replace_dir(staging, out)
    return open_bundle(out)
