"""Installed versions, for provenance (bundle.json, model cards, commit messages)."""

from __future__ import annotations

from importlib import metadata


def package_version(dist: str = "moestream") -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tool_versions(dists=("moestream", "mlx", "mlx-lm", "safetensors", "pyarrow")) -> dict[str, str | None]:
    return {dist: package_version(dist) for dist in dists}
