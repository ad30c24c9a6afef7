"""The family tables: one small module per MoE family (see base.py for what a table is)."""

from __future__ import annotations

from ...common.errors import MoestreamError
from . import deepseek_v3, gpt_oss, mixtral, olmoe, qwen3_5_moe, qwen3_moe
from .base import ExpertSlice, Family, ModelDims

FAMILIES: dict[str, Family] = {
    m.FAMILY.name: m.FAMILY for m in (qwen3_moe, qwen3_5_moe, mixtral, olmoe, deepseek_v3, gpt_oss)
}


class UnsupportedFamily(MoestreamError, ValueError):
    """The checkpoint is not a Mixture-of-Experts model moestream can prepare."""


def family_for_config(config: dict) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedFamily(
        f"model_type {model_type!r} is not a supported MoE family; supported: {supported}"
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnsupportedFamily(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["ExpertSlice", "FAMILIES", "Family", "ModelDims", "UnsupportedFamily", "family_for_config", "get_family"]
