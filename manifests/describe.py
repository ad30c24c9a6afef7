"""A bundle's description, as `moestream inspect --json` and `moestream.inspect` give it."""

from __future__ import annotations

from pathlib import Path

from .bundle import FORMAT_VERSION
from .open import open_bundle


def describe_bundle(path: str | Path) -> dict:
    bundle = open_bundle(path)
    meta = bundle.meta
    experts = meta["experts"]
    return {
        "path": str(Path(path)),
        "format": meta["format"],
        "format_version": meta.get("format_version", FORMAT_VERSION),
        "family": meta["family"],
        "model_type": meta.get("model_type"),
        "source": meta.get("source", {}),
        "layers": bundle.config.get("num_hidden_layers", bundle.config.get("text_config", {}).get("num_hidden_layers")),
        "moe_layers": len(bundle.layers),
        "experts": experts["num_experts"],
        "experts_per_token": experts["experts_per_token"],
        "expert_bits": experts["bits"],
        "group_size": experts["group_size"],
        "expert_bytes": bundle.expert_bytes,
        "resident_bytes": meta["resident"]["nbytes"],
        "resident_bits": meta["resident"]["bits"],
        "expert_bytes_per_token": meta["layout"]["expert_bytes_per_token"],
        "layout_order": meta["layout"]["order"],
        "tools": meta.get("tools", {}),
    }
