"""The CUDA memory advice's own logic, against a stand-in for the CUDA runtime that records its calls
(the real one is exercised on the lent GPU by bench/stream_e2e.py, whose settings line says whether
the advice was given), and the staging pool on this machine."""

from __future__ import annotations

import numpy as np

from moestream.runtime.io.staging import CudaAdvice, StagingPool, bytes_at


class FakeCudart:
    def __init__(self, version: int, fail: int = 0, v2: bool = False):
        self.calls, self.version, self.fail = [], version, fail

        def get_version(ref):
            ref._obj.value = self.version
            return 0

        def advise(name):
            def call(ptr, n, advice, location):
                where = (location.type, location.id) if hasattr(location, "type") else location.value
                self.calls.append((name, ptr.value, n.value, advice, where))
                return self.fail
            return call

        self.cudaRuntimeGetVersion = get_version
        self.cudaMemAdvise = advise("cudaMemAdvise")
        if v2:
            self.cudaMemAdvise_v2 = advise("cudaMemAdvise_v2")


def test_cuda13_advice_keeps_pages_on_the_host_mapped_for_the_gpu():
    lib = FakeCudart(13000)
    advice = CudaAdvice(lib)
    assert advice.available and advice.version == 13000
    assert advice.host_resident(0x10000, 8192)
    # preferred location = host (type 2), accessed by = device 0 (type 1), cudaMemLocation by value
    assert lib.calls == [("cudaMemAdvise", 0x10000, 8192, 3, (2, 0)), ("cudaMemAdvise", 0x10000, 8192, 5, (1, 0))]


def test_cuda12_uses_the_v2_entry_point_or_the_int_device_form():
    lib = FakeCudart(12040, v2=True)
    assert CudaAdvice(lib).host_resident(4096, 4096)
    assert [c[0] for c in lib.calls] == ["cudaMemAdvise_v2"] * 2
    old = FakeCudart(11080)
    assert CudaAdvice(old).host_resident(4096, 4096)
    assert old.calls == [("cudaMemAdvise", 4096, 4096, 3, -1), ("cudaMemAdvise", 4096, 4096, 5, 0)]


def test_a_refusal_turns_the_advice_off_with_the_reason(monkeypatch):
    advice = CudaAdvice(FakeCudart(13000, fail=1))
    assert not advice.host_resident(4096, 4096)
    assert not advice.available and "returned 1" in advice.why
    monkeypatch.setenv("MOESTREAM_CUDA_ADVICE", "0")
    off = CudaAdvice(FakeCudart(13000))
    assert not off.available and "MOESTREAM_CUDA_ADVICE=0" in off.why


def test_staging_slots_are_aligned_writable_and_reused():
    pool = StagingPool(max_idle_bytes=1 << 20)
    slot, view = pool.take(10_000)
    assert len(view) == 10_000 and not view.readonly
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data % 4096 == 0
    view[:4] = b"abcd"
    assert bytes(np.array(bytes_at(slot, view[:4], 4))) == b"abcd"  # the MLX array sees the write
    pool.give(slot)
    again, _ = pool.take(9_000)  # fits the idle slot: no new allocation
    assert again is slot and pool.allocations == 1
    pool.give(again)
    big, _ = pool.take(2 << 20)
    pool.give(big)  # over the idle cap: dropped
    assert pool.allocations == 2 and sum(s[1].nbytes for s in pool._free) <= 1 << 20


def test_a_lower_idle_limit_drops_the_slots_beyond_it():
    pool = StagingPool(max_idle_bytes=0)
    pool.limit_idle(1 << 20)  # a forward pass whose reads are larger: its slots are kept
    slots = [pool.take(200_000)[0] for _ in range(4)]
    for slot in slots:
        pool.give(slot)
    assert pool._idle == 4 * 200_704 and pool.allocations == 4
    for _ in range(2):
        slots = [pool.take(200_000)[0] for _ in range(4)]
        for slot in slots:
            pool.give(slot)
    assert pool.allocations == 4  # reused
    pool.limit_idle(450_000)  # back to a smaller read: the slots beyond it go
    assert pool._idle == 2 * 200_704 == sum(s[1].nbytes for s in pool._free)
