"""Router lookahead: predicting layer l+1's experts with its own router on layer l's input."""

from __future__ import annotations

import pytest

import moestream
from moestream.runtime.measure.lookahead import measure_lookahead

TOKENS = [3, 17, 42, 7, 99, 5, 23, 64, 11, 2, 31, 8] * 8


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_lookahead_counts_are_consistent(family, bundle_dir):
    model, _ = moestream.load(bundle_dir(family))
    stats = measure_lookahead(model, TOKENS)
    k = moestream.runtime_of(model).experts_per_token
    n_moe = len(moestream.runtime_of(model).store.layers)
    assert stats.routed == len(TOKENS) * k * (n_moe - 1)  # every layer after the first is predicted
    assert stats.predicted == stats.routed
    assert 0 <= stats.hits <= stats.routed
    assert 0.0 <= stats.recall <= 1.0


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_router_of_picks_the_experts_the_block_routes(family, bundle_dir):
    """router_of(block)(x) on a layer's own MoE input gives exactly the experts that block routes."""
    import mlx.core as mx
    import numpy as np

    from moestream.runtime.model.lookahead import router_of
    from moestream.runtime.model.modules import resolve_module

    model, _ = moestream.load(bundle_dir(family))
    rt = moestream.runtime_of(model)
    seen = []

    def observe(layer, x, indices):
        block = resolve_module(model, rt.store.layers[layer].rpartition(".")[0])
        mine = np.array(router_of(block)(x)).reshape(-1, indices.shape[-1])
        theirs = np.array(indices).reshape(mine.shape[0], -1)
        seen.append(all(set(a.tolist()) == set(b.tolist()) for a, b in zip(mine, theirs, strict=True)))

    rt.streamer.observers.append(observe)
    model(mx.array([TOKENS[:24]]))
    assert seen and all(seen)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_prefetch_keeps_results_exact_and_counts_use(family, bundle_dir):
    import mlx.core as mx

    from moestream.common.units import parse_bytes  # noqa: F401

    probe, _ = moestream.load(bundle_dir(family))
    p = moestream.runtime_of(probe).plan
    budget = p.resident_bytes + p.kv_reserve_bytes + p.buffer_bytes + 3 * p.min_layer_bytes
    plain, _ = moestream.load(bundle_dir(family), memory_budget=budget)
    fetching, _ = moestream.load(bundle_dir(family), memory_budget=budget, prefetch=True)
    for start in range(0, 48, 4):  # decode-sized calls
        x = mx.array([TOKENS[start : start + 4]])
        a, b = plain(x), fetching(x)
        assert mx.array_equal(a, b)
    s = moestream.stats(fetching)
    assert s["prefetch_issued"] > 0 and 0 < s["prefetch_used"] <= s["prefetch_issued"]
    assert s["expert_cache_peak_bytes"] <= s["cache_capacity_bytes"]
    assert moestream.stats(plain)["prefetch_issued"] == 0
