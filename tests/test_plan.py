"""Mixed precision: a measured bit plan under a size budget, packed and streamed correctly."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import build_bundle
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import load_model

import moestream
from moestream.manifests.open import open_bundle
from moestream.stages.bits import BitPlan, allocate, expert_errors, quantized_nbytes

PROMPT = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8] * 4


def test_allocate_spends_bits_where_error_per_byte_is_largest():
    sizes = {k: {2: 100, 4: 200, 8: 400} for k in ("hot", "cold")}
    errors = {"hot": {2: 100.0, 4: 10.0, 8: 1.0}, "cold": {2: 1.0, 4: 0.1, 8: 0.01}}
    plan = allocate(errors, sizes, 300)
    assert plan.bits == {"hot": 4, "cold": 2} and plan.expert_bytes == 300
    assert allocate(errors, sizes, 10_000).bits == {"hot": 8, "cold": 8}
    with pytest.raises(ValueError, match="below the smallest plan"):
        allocate(errors, sizes, 150)


def test_measured_errors_fall_with_bits(synth_dir):
    errors, sizes = expert_errors(synth_dir("qwen3_moe"), PROMPT * 4, bits_options=(2, 4, 8))
    for key, e in errors.items():
        assert e[2] > e[4] > e[8] >= 0, key
        assert sizes[key][2] < sizes[key][4] < sizes[key][8]
    assert quantized_nbytes((64, 128), 4, 64) == 64 * 128 // 2 + 2 * 64 * 2 * 2


def _dequantized_reference(checkpoint, plan, group_size=64):
    """mlx-lm's model with each expert's weights replaced by its own quantize->dequantize at the
    plan's width (quantized from the bf16 source), computing in float32."""
    ref, _ = load_model(checkpoint)
    for name, module in ref.named_modules():
        if isinstance(module, SwitchLinear):
            layer = int(name.split(".")[2])
            w = module.weight
            rows = []
            for e in range(w.shape[0]):
                b = plan[(layer, e)]
                q, scales, biases = mx.quantize(w[e], group_size=group_size, bits=b)  # in the source dtype
                # dequantized in float32, as the runtime computes (scales cast to float32 first)
                rows.append(mx.dequantize(q, scales.astype(mx.float32), biases.astype(mx.float32),
                                          group_size=group_size, bits=b))
            module.weight = mx.stack(rows)
    ref.set_dtype(mx.float32)
    return ref


@pytest.mark.parametrize("budget", [None, "small"])
def test_mixed_bit_bundle_streams_like_the_dequantized_reference(tmp_path, synth_dir, budget):
    src = synth_dir("qwen3_moe")
    plan = {(layer, e): (2, 4, 8)[(layer + e) % 3] for layer in range(3) for e in range(16)}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(BitPlan(plan, 0, 0.0).to_json()))
    bundle = build_bundle(src, tmp_path / "mixed", bits=4, bits_plan=plan_file)
    assert open_bundle(bundle).meta["experts"]["bits"] == "mixed"
    ref = _dequantized_reference(src, plan)
    memory_budget = moestream.plan_memory(bundle).minimum_bytes if budget else None
    model, _ = moestream.load(bundle, memory_budget=memory_budget)
    a, b = ref(mx.array([PROMPT])), model(mx.array([PROMPT]))
    # gather_qmm vs dequantized matmul: same math, different summation order
    assert float(mx.abs(a - b).max()) <= 1e-4 * float(mx.abs(a).max())


def test_plan_round_trips_json(tmp_path):
    p = BitPlan({(0, 1): 2, (3, 4): 8}, 123, 0.5)
    assert BitPlan.from_json(p.to_json()) == p
