import pytest

from moestream.runtime.cache.expert_cache import CacheFullError, ExpertCache
from moestream.runtime.cache.policies import BASE_POLICIES as POLICIES
from moestream.runtime.cache.policies import LFUPolicy, LRUPolicy


def _fill(cache, keys, nbytes=10):
    for k in keys:
        cache.put(k, f"v{k}", nbytes)


def test_lru_evicts_least_recently_used():
    c = ExpertCache(30, "lru")
    _fill(c, "abc")
    assert c.get("a") == "va"  # a is now the most recent: b goes first
    c.put("d", "vd", 10)
    assert {k for k in "abcd" if k in c} == {"a", "c", "d"}
    c.put("e", "ve", 10)
    assert "c" not in c and "a" in c
    assert c.stats()["evictions"] == 2


def test_lfu_evicts_least_frequently_used_ties_by_recency():
    c = ExpertCache(30, "lfu")
    _fill(c, "abc")
    for _ in range(3):
        c.get("a")
    c.get("b")  # counts: a=4, b=2, c=1
    c.put("d", "vd", 10)
    assert "c" not in c  # lowest count
    c.put("e", "ve", 10)  # d=1 is now the lowest
    assert "d" not in c
    c.get("e")  # e=2 ties with b=2; b was used less recently
    c.put("f", "vf", 10)
    assert "b" not in c and {"a", "e", "f"} == {k for k in "abcdef" if k in c}


def test_byte_bound_respected_and_peak_tracked():
    c = ExpertCache(100)
    for i in range(20):
        c.put(i, i, 7 + i % 5)
        assert c.stats()["expert_cache_bytes"] <= 100
    s = c.stats()
    assert s["expert_cache_peak_bytes"] <= 100 and s["expert_cache_peak_bytes"] >= 90
    c.clear()
    s = c.stats()
    assert s["expert_cache_bytes"] == 0 and s["expert_cache_peak_bytes"] >= 90
    assert s["capacity_bytes"] == 100


def test_replacing_a_key_updates_its_size():
    c = ExpertCache(100)
    c.put("a", 1, 40)
    c.put("b", 2, 40)
    c.put("a", 3, 60)  # grows by 20: still fits
    assert "b" in c and c.stats()["expert_cache_bytes"] == 100
    c.put("a", 4, 70)  # grows by 10 more: b must go, not a
    assert c.get("a") == 4 and "b" not in c
    assert c.stats()["expert_cache_bytes"] == 70


def test_pin_prevents_eviction():
    c = ExpertCache(30)
    _fill(c, "abc")
    c.pin("a")
    c.pin("a")  # pins are counted
    c.put("d", "vd", 10)
    assert "a" in c and "b" not in c
    c.unpin("a")
    c.put("e", "ve", 10)
    assert "a" in c and "c" not in c
    c.unpin("a")
    c.put("f", "vf", 10)
    assert "a" not in c
    with pytest.raises(KeyError):
        c.unpin("a")


def test_pin_before_insert():
    c = ExpertCache(20)
    c.pin("x")
    _fill(c, ["x", "y"])
    c.put("z", "vz", 10)
    assert "x" in c and "y" not in c
    assert c.stats()["pinned_bytes"] == 10


def test_oversize_item_error_names_the_numbers():
    c = ExpertCache(100)
    with pytest.raises(ValueError, match="101 bytes.*100 bytes"):
        c.put("big", None, 101)


def test_all_pinned_raises_and_leaves_cache_untouched():
    c = ExpertCache(30)
    _fill(c, "abc")
    c.pin("a")
    c.pin("b")
    with pytest.raises(CacheFullError, match="capacity 30.*pinned 20"):
        c.put("d", "vd", 15)  # only c (10 bytes) is evictable
    assert {"a", "b", "c"} == {k for k in "abcd" if k in c}
    c.put("d", "vd", 10)  # fits by evicting c
    assert "c" not in c


def test_hit_and_miss_counts():
    c = ExpertCache(None)
    c.put(1, "one", 5)
    assert c.get(1) == "one" and c.get(2) is None and c.get(1) == "one"
    assert 1 in c and 2 not in c  # membership does not count
    s = c.stats()
    assert (s["cache_hits"], s["cache_misses"]) == (2, 1)
    assert s["hit_rate"] == pytest.approx(2 / 3)
    assert s["capacity_bytes"] is None


def test_unbounded_never_evicts():
    c = ExpertCache(None)
    _fill(c, range(1000), nbytes=1 << 30)
    assert len(c) == 1000 and c.stats()["evictions"] == 0


def test_policy_is_pluggable():
    class FIFO(LRUPolicy):
        def on_access(self, key):  # ignore accesses: evict in insertion order
            pass

    c = ExpertCache(20, FIFO())
    _fill(c, "ab")
    c.get("a")
    c.put("c", "vc", 10)
    assert "a" not in c
    assert POLICIES == {"lru": LRUPolicy, "lfu": LFUPolicy}
    with pytest.raises(ValueError, match="unknown cache policy"):
        ExpertCache(10, "arc")


def test_discard_is_not_an_eviction():
    c = ExpertCache(30)
    _fill(c, "ab")
    c.discard("a")
    c.discard("zz")
    assert len(c) == 1 and c.stats()["evictions"] == 0
    assert c.stats()["expert_cache_bytes"] == 10
