"""Trace replay through the real cache and reader, and the profile-driven cache policies."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from moestream.manifests.open import open_bundle
from moestream.manifests.profile import TraceArrays, arrays_to_table, trace_arrays
from moestream.runtime.cache.expert_cache import ExpertCache
from moestream.runtime.cache.policies import (
    FrequencyPriorPolicy,
    FrequencyTable,
    HotSetPolicy,
    LRFUPolicy,
    LRUPolicy,
    configure_policy,
    make_policy,
)
from moestream.runtime.io.reader import ExtentReader
from moestream.runtime.measure.replay import replay
from moestream.runtime.model.streaming import ExpertStreamer


def _skewed_trace(seed: int, tokens: int, layers, E: int = 16, k: int = 4):
    """Token-major rows with popular experts and some next-token reuse, like a real router's."""
    rng = np.random.default_rng(seed)
    p = np.linspace(3, 0.2, E) ** 2
    p /= p.sum()
    rows, prev = [], {}
    for tok in range(tokens):
        for layer in layers:
            if layer in prev and rng.random() < 0.4:
                keep = list(rng.choice(prev[layer], 2, replace=False))
                rest = [e for e in rng.choice(E, E, replace=False, p=p) if e not in keep][: k - 2]
                ex = np.array(keep + rest)
            else:
                ex = rng.choice(E, k, replace=False, p=p)
            prev[layer] = ex
            rows.append((0, tok, layer, ex))
    n = len(rows)
    t = TraceArrays(np.zeros(n, int), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                    np.array([r[3] for r in rows]), None, None, E, list(layers))
    return arrays_to_table(t)


def _simple_lru(trace, sizes: dict, offsets: dict, capacity: int):
    """A plain LRU over (layer, expert) keys, written from the runtime's contract: per layer step,
    look every distinct routed expert up (hits refresh), then insert the misses in file order,
    evicting least recently used keys that this step does not hold."""
    t = trace_arrays(trace)
    lru: OrderedDict = OrderedDict()
    used = hits = misses = 0
    missed_per_step = []
    for layer, row in zip(t.layer.tolist(), t.experts.tolist(), strict=True):
        held, missed = set(), []
        for e in sorted(set(row)):
            key = (layer, e)
            if key in lru:
                hits += 1
                lru.move_to_end(key)
                held.add(key)
            else:
                misses += 1
                missed.append(key)
        missed.sort(key=lambda key: offsets[key])
        for key in missed:
            while used + sizes[key] > capacity:
                victim = next(x for x in lru if x not in held)
                used -= lru.pop(victim)
            lru[key] = sizes[key]
            used += sizes[key]
            held.add(key)
        missed_per_step.append(missed)
    return hits / (hits + misses), missed_per_step


@pytest.fixture(scope="module")
def tiny(bundle_dir):
    path = bundle_dir("qwen3_moe")
    b = open_bundle(path)
    from moestream.runtime.io.stores import BundleStore

    store = BundleStore(b, None)
    sizes = {key: store.nbytes(*key) for key in b.extents}
    offsets = {key: (x.file, x.offset) for key, x in b.extents.items()}
    return path, b, sizes, offsets


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_replay_lru_hit_rate_equals_simple_lru_and_reads_exactly_the_missed_extents(tiny, budget, monkeypatch):
    path, b, sizes, offsets = tiny
    trace = _skewed_trace(0, 120, sorted(b.layers))
    capacity = int(budget * sum(sizes.values()))
    want_rate, want_missed = _simple_lru(trace, sizes, offsets, capacity)

    calls = []
    orig = ExtentReader.read

    def spy(self, requests):
        calls.append([(r.path, r.offset, r.nbytes) for r in requests])
        return orig(self, requests)

    monkeypatch.setattr(ExtentReader, "read", spy)
    [row] = replay(path, trace, budgets=[budget], policies=["lru"], io_mode="buffered")
    assert row["capacity_bytes"] == capacity and not row["clamped"]
    assert row["hit_rate"] == pytest.approx(want_rate, abs=1e-12)
    want_calls = [[(str(b.path(b.extent(*k).file)), b.extent(*k).offset, b.extent(*k).nbytes) for k in m]
                  for m in want_missed if m]
    assert calls == want_calls  # one batched read per layer step with misses, exactly those extents
    missed_bytes = sum(n for c in want_calls for _, _, n in c)
    assert row["requested_bytes"] == missed_bytes
    assert row["bytes_read"] == missed_bytes  # buffered: no alignment padding, no gaps read
    assert row["reads"] == sum(len(c) for c in want_calls)  # these extents never touch: no coalescing


def test_replay_direct_mode_and_every_policy_runs(tiny):
    path, b, sizes, _ = tiny
    cal, held = _skewed_trace(1, 60, sorted(b.layers)), _skewed_trace(2, 40, sorted(b.layers))
    rows = replay(path, held, budgets=[0.05, 0.4], policies=["lru", "lfu", "hot", "prior", "lrfu", "opt"],
                  profile=cal, io_mode="direct")
    assert len(rows) == 12
    assert all(r["clamped"] for r in rows if r["budget"] == 0.05)  # below one layer's k experts
    for r in rows:
        assert r["lookups"] == r["hits"] + r["misses"] > 0
        assert r["bytes_read"] >= r["requested_bytes"] > 0  # direct: 4 KiB-aligned reads
    at = {r["policy"]: r["hit_rate"] for r in rows if r["budget"] == 0.4}
    assert at["opt"] >= max(at.values()) - 1e-12  # Belady's offline choice is the ceiling here
    with pytest.raises(ValueError, match="needs a routing profile"):
        replay(path, held, budgets=[0.4], policies=["hot"])


class _FakeStore:
    layers = {0: "x", 1: "y"}

    def nbytes(self, layer, expert):
        return 100

    def quant(self, layer, expert):
        return {}

    def read(self, layer, experts):
        return {e: object() for e in experts}


def test_hot_set_policy_never_evicts_the_hot_experts():
    rng = np.random.default_rng(3)
    E, k = 16, 4
    share = {layer: np.linspace(1, 0.05, E) for layer in (0, 1)}
    policy = HotSetPolicy(FrequencyTable(share), hot_fraction=0.5)
    capacity = 1200  # 12 experts of 100 bytes; one layer's working set is 4
    configure_policy(policy, capacity, lambda key: 100, reserve_bytes=k * 100)
    assert len(policy.hot) == 6 and policy.hot == {(layer, e) for layer in (0, 1) for e in range(3)}
    removed = []
    orig = policy.on_remove
    policy.on_remove = lambda key: (removed.append(key), orig(key))[1]
    cache = ExpertCache(capacity, policy)
    streamer = ExpertStreamer(_FakeStore(), cache)
    p = np.linspace(1, 0.05, E) / np.linspace(1, 0.05, E).sum()
    for _ in range(400):
        for layer in (0, 1):
            experts = sorted(rng.choice(E, k, replace=False, p=p).tolist())
            streamer.acquire(layer, experts)
            streamer.release(layer, experts)
    assert removed and not set(removed) & policy.hot
    assert all(key in cache for key in policy.hot)  # every hot expert got in and stayed

    # a hot set larger than the cache allows is cut to capacity - reserve
    big = HotSetPolicy(FrequencyTable(share), hot_fraction=1.0)
    configure_policy(big, capacity, lambda key: 100, reserve_bytes=k * 100)
    assert len(big.hot) == 8


def test_profile_policies_by_name_and_their_choices(tmp_path):
    share = {0: np.array([0.9, 0.1, 0.5, 0.05])}
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("prior", share), FrequencyPriorPolicy)
    assert isinstance(make_policy("lrfu", share, half_life=2.0), LRFUPolicy)
    assert isinstance(make_policy("hot", share, hot_fraction=0.25), HotSetPolicy)
    with pytest.raises(ValueError, match="unknown cache policy 'nope'.*hot"):
        make_policy("nope")
    with pytest.raises(ValueError, match="needs a routing profile"):
        make_policy("lrfu")

    prior = make_policy("prior", share)
    for e in (0, 1, 2, 3):
        prior.on_insert((0, e))
    assert prior.victim(lambda key: True) == (0, 3)
    assert prior.victim(lambda key: key != (0, 3)) == (0, 1)

    # lrfu: a burst of recent use outweighs a slightly higher prior; with time the prior wins again
    lrfu = LRFUPolicy(FrequencyTable({0: np.array([0.30, 0.25, 0.9, 0.9])}), half_life=1.0, experts_per_token=1)
    lrfu.on_insert((0, 0))
    lrfu.on_insert((0, 1))
    for _ in range(3):
        lrfu.on_access((0, 1))
    assert lrfu.victim(lambda key: True) == (0, 0)
    for _ in range(20):
        lrfu.on_insert((0, 2)) if (0, 2) not in lrfu._slot else lrfu.on_access((0, 2))
    assert lrfu.victim(lambda key: key in {(0, 0), (0, 1)}) == (0, 1)

    # a profile folder's frequency.parquet is a profile too
    from moestream.manifests.profile import write_aggregates
    from moestream.stages.profile import aggregate

    agg = aggregate(_skewed_trace(4, 30, [0, 1]))
    write_aggregates(agg, tmp_path)
    table = FrequencyTable.load(tmp_path)
    layer, expert = np.unravel_index(np.argmax(agg.share), agg.share.shape)
    assert table.ranking()[0] == (agg.layers[layer], expert)
    assert sum(table.share[0]) == pytest.approx(4.0)  # k experts per token
    from_trace = FrequencyTable.load(_skewed_trace(4, 30, [0, 1]))
    for layer in (0, 1):
        np.testing.assert_allclose(table.share[layer], from_trace.share[layer])
