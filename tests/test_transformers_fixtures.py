"""Every family against transformers itself: checkpoints written by transformers' own
`save_pretrained` (tests/fixtures/transformers, made by scripts/make_transformers_fixtures.py with
tiny random weights widened to N(0, 0.2) so routing is decisive), with transformers' fp32 logits
saved beside them. Prepared at --expert-bits 16 and streamed by the runtime (float32), the logits
must match: relative L2 <= 1e-4 (measured: at most 8e-6) and the same argmax at every position;
and so must the unprepared checkpoint, loaded directly (its experts read from the source safetensors)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import moestream

FIXTURES = Path(__file__).parent / "fixtures" / "transformers"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())


def _compare(model, family: str) -> tuple[float, float]:
    ref = mx.load(str(FIXTURES / family / "reference.safetensors"))
    got = np.array(model(ref["input_ids"].astype(mx.int32)), dtype=np.float64)
    want = np.array(ref["logits"], dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want)), float((got.argmax(-1) == want.argmax(-1)).mean())


def test_the_fixtures_are_there():
    required = {"qwen3_moe", "qwen3_5_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_next", "glm4_moe",
                "deepseek_v2", "llama4", "ernie4_5_moe"}
    assert required <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_bundle_matches_transformers(family, tmp_path):
    moestream.prepare(FIXTURES / family, tmp_path / "bundle", engine="plain", expert_bits=16)
    budget = moestream.plan_memory(tmp_path / "bundle", expert_cache_share=0.3).budget_bytes
    with moestream.load(tmp_path / "bundle", dtype="float32", memory_budget=budget) as (model, _):
        rel, argmax = _compare(model, family)
        assert moestream.runtime_of(model).stats()["evictions"] > 0, "the budget holds part of the experts"
    assert rel <= 1e-4 and argmax == 1.0, f"{family}: relative L2 {rel:.2e}, argmax agreement {argmax:.3f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_unprepared_checkpoint_matches_transformers(family):
    with moestream.load(FIXTURES / family, dtype="float32") as (model, _):
        rel, argmax = _compare(model, family)
    assert rel <= 1e-4 and argmax == 1.0, f"{family}: relative L2 {rel:.2e}, argmax agreement {argmax:.3f}"


def test_a_group_size_that_does_not_divide_a_projection_is_refused_before_packing(tmp_path):
    """deepseek_v2's fixture has experts of intermediate size 16: no group size divides their
    down projection's input, so 4-bit is refused at once, naming the layer and what to use."""
    from moestream.common.errors import OptionsError

    with pytest.raises(OptionsError, match=r"layer 1 down_proj has input dimension 16, not a multiple of --group-size 64"):
        moestream.prepare(FIXTURES / "deepseek_v2", tmp_path / "b", engine="plain", expert_bits=4)
    assert not (tmp_path / "b").exists() and not any(tmp_path.iterdir())
