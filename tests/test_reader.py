import dataclasses
import errno
import fcntl
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from moestream.runtime.io.reader import ALIGN, ExtentReader, ReadError, ReadRequest

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="Linux O_DIRECT tests")


def _supports_o_direct(folder: Path) -> bool:
    probe = folder / ".odirect_probe"
    probe.write_bytes(b"\0" * ALIGN)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [mmap.mmap(-1, ALIGN)], 0) == ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def disk_dir(tmp_path):
    """A folder on a filesystem that honours O_DIRECT (tmp_path if it does)."""
    if _supports_o_direct(tmp_path):
        yield tmp_path
        return
    for base in ("/var/tmp", "/work"):
        if os.access(base, os.W_OK) and _supports_o_direct(Path(base)):
            d = Path(base) / f"moestream-test-{os.getpid()}-{tmp_path.name}"
            d.mkdir()
            yield d
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
            return
    pytest.skip("no filesystem with O_DIRECT found")


def _write(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _req(path, offset, nbytes, label=None):
    return ReadRequest(str(path), offset, nbytes, label or f"extent@{offset}")


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_unaligned_reads_return_exact_bytes(disk_dir, mode):
    size = 300_001  # not a multiple of the block size: the last block is partial
    f = disk_dir / "a.bin"
    data = _write(f, size)
    spans = [(1, 10), (4095, 2), (4096, 4096), (12_345, 70_000), (0, size), (size - 7, 7),
             (200_000, 0), (50_000, 100), (50_000, 100), (50_050, 10_000)]
    with ExtentReader(mode, threads=4) as r:
        views = r.read([_req(f, o, n) for o, n in spans])
        assert r.io_mode_in_use == mode
        assert r.stats()["io_mode"] == mode
    for (o, n), v in zip(spans, views, strict=True):
        assert len(v) == n
        assert bytes(v) == data[o : o + n]


def test_direct_reads_are_aligned_supersets(disk_dir):
    f = disk_dir / "a.bin"
    data = _write(f, 64 * 1024)
    with ExtentReader("direct") as r:
        (v,) = r.read([_req(f, 5000, 100)])
        s = r.stats()
    assert bytes(v) == data[5000:5100]
    assert s["reads"] == 1 and s["bytes_read"] == ALIGN  # the one block holding the extent
    assert s["requested_bytes"] == 100 and s["mean_read_bytes"] == ALIGN
    assert s["io_wait_s"] > 0


def _probe_shm() -> Path:
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    return Path("/dev/shm")


def test_tmpfs_reads_exact_bytes_and_reports_mode(tmp_path):
    shm = _probe_shm()
    f = shm / f"moestream-test-{os.getpid()}.bin"
    try:
        data = _write(f, 100_000)
        with ExtentReader("direct") as r:
            (v,) = r.read([_req(f, 333, 50_000)])
            mode = r.io_mode_in_use
        assert bytes(v) == data[333:50_333]
        # Linux >= 6.6 accepts O_DIRECT on tmpfs; older kernels refuse it and we fall back.
        assert mode == ("direct" if _supports_o_direct(shm) else "buffered")
    finally:
        f.unlink()


def test_fallback_when_open_refuses_o_direct(disk_dir, monkeypatch):
    f = disk_dir / "a.bin"
    data = _write(f, 50_000)
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refusing_open)
    with ExtentReader("direct") as r:
        (v,) = r.read([_req(f, 777, 10_000)])
        assert r.io_mode_in_use == "buffered" and r.stats()["io_mode"] == "buffered"
        assert r.stats()["bytes_read"] == 10_000  # buffered: no alignment padding
    assert bytes(v) == data[777:10_777]


def test_fallback_when_first_read_refuses_o_direct(disk_dir, monkeypatch):
    f = disk_dir / "a.bin"
    data = _write(f, 200_000)
    real_preadv = os.preadv

    def refusing_preadv(fd, bufs, offset, *a):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "preadv", refusing_preadv)
    with ExtentReader("direct", threads=4) as r:
        reqs = [_req(f, o, 1234) for o in range(1, 200_000 - 1234, 20_011)]
        views = r.read(reqs)
        assert r.io_mode_in_use == "buffered"
        again = r.read(reqs)  # the descriptor stays buffered: no more refusals
    for q, v, w in zip(reqs, views, again, strict=True):
        assert bytes(v) == bytes(w) == data[q.offset : q.offset + q.nbytes]


def test_a_later_einval_is_an_error_not_a_fallback(disk_dir, monkeypatch):
    f = disk_dir / "a.bin"
    _write(f, 50_000)
    with ExtentReader("direct") as r:
        r.read([_req(f, 0, 100)])
        monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL,
                                                                                  "bad")))
        with pytest.raises(ReadError, match="late extent"):
            r.read([_req(f, 8192, 100, "late extent")])
        assert r.io_mode_in_use == "direct"


def _extents(path: Path, n: int, nbytes: int, stride: int = 16 * 1024) -> list[ReadRequest]:
    return [_req(path, i * stride, nbytes, f"expert {i}") for i in range(n)]


def test_adjacent_extents_are_coalesced(disk_dir):
    f = disk_dir / "e.bin"
    data = _write(f, 16 * 16 * 1024)
    reqs = _extents(f, 8, 16 * 1024)  # back to back
    random.Random(1).shuffle(reqs)
    with ExtentReader("direct") as r:
        views = r.read(reqs)
        assert r.stats()["reads"] == 1
    for q, v in zip(reqs, views, strict=True):
        assert bytes(v) == data[q.offset : q.offset + q.nbytes]


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_gap_larger_than_coalesce_gap_does_not_merge(disk_dir, mode):
    f = disk_dir / "e.bin"
    data = _write(f, 16 * 16 * 1024)
    # 10000-byte extents at 16 KiB: aligned ranges [0, 12288), [16384, 28672) ... gap 4096;
    # exact ranges (buffered) leave a 6384-byte gap.
    gap = 4096 if mode == "direct" else 16 * 1024 - 10_000
    reqs = _extents(f, 6, 10_000)
    for coalesce_gap, reads in ((0, 6), (gap - 1, 6), (gap, 1)):
        with ExtentReader(mode, coalesce_gap=coalesce_gap) as r:
            views = r.read(reqs)
            assert r.stats()["reads"] == reads, coalesce_gap
        for q, v in zip(reqs, views, strict=True):
            assert bytes(v) == data[q.offset : q.offset + q.nbytes]


def test_coalescing_stops_at_max_read_bytes(disk_dir):
    f = disk_dir / "e.bin"
    _write(f, 16 * 16 * 1024)
    with ExtentReader("direct", max_read_bytes=64 * 1024) as r:
        r.read(_extents(f, 16, 16 * 1024))
        assert r.stats()["reads"] == 4


def test_extents_in_different_files_are_not_merged(disk_dir):
    a, b = disk_dir / "a.bin", disk_dir / "b.bin"
    da, db = _write(a, 8192, 1), _write(b, 8192, 2)
    with ExtentReader("direct") as r:
        va, vb = r.read([_req(a, 0, 4096), _req(b, 4096, 4096)])
        assert r.stats()["reads"] == 2
    assert bytes(va) == da[:4096] and bytes(vb) == db[4096:]


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_truncated_file_raises_read_error_naming_the_extent(disk_dir, mode):
    f = disk_dir / "layer_003.bin"
    _write(f, 20_000)
    label = "layer 3 expert 17 (experts/layer_003.bin)"
    with ExtentReader(mode) as r, pytest.raises(ReadError) as ei:
        r.read([_req(f, 0, 100), _req(f, 15_000, 10_000, label)])
    e = ei.value
    assert label in str(e) and str(f) in str(e)
    assert (e.offset, e.wanted, e.got) == (15_000, 10_000, 5_000)
    assert "wanted 10000 bytes, got 5000" in str(e)


def test_extent_past_end_of_file(disk_dir):
    f = disk_dir / "a.bin"
    _write(f, 10_000)
    with ExtentReader("direct") as r, pytest.raises(ReadError, match="got 0"):
        r.read([_req(f, 50_000, 10, "far expert")])


def test_missing_file_raises_read_error(disk_dir):
    f = disk_dir / "nope.bin"
    with ExtentReader("direct") as r, pytest.raises(ReadError, match="layer 9 expert 1") as ei:
        r.read([_req(f, 0, 10, "layer 9 expert 1")])
    assert str(f) in str(ei.value) and isinstance(ei.value, OSError)


def test_many_threads_and_callers_give_the_same_bytes(disk_dir):
    files = [disk_dir / f"f{i}.bin" for i in range(3)]
    datas = [_write(f, 400_000, i) for i, f in enumerate(files)]
    rng = random.Random(7)
    reqs = []
    for _ in range(300):
        i, o = rng.randrange(3), rng.randrange(399_000)
        reqs.append(_req(files[i], o, rng.randrange(1, 400_000 - o)))
    expected = [datas[int(Path(q.path).stem[1:])][q.offset : q.offset + q.nbytes] for q in reqs]
    with ExtentReader("direct", threads=16, max_read_bytes=64 * 1024) as r:

        def caller(k):
            batch = reqs[k::4]
            for q, v in zip(batch, r.read(batch), strict=True):
                assert bytes(v) == expected[reqs.index(q)]

        with ThreadPoolExecutor(4) as callers:
            for f in [callers.submit(caller, k) for k in range(4)]:
                f.result()  # re-raises a failed assert from the caller thread
        assert r.stats()["requests"] == 300


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_buffers_are_freed_when_views_are_dropped(disk_dir):
    f = disk_dir / "a.bin"
    _write(f, 4 << 20)
    with ExtentReader("direct") as r:
        r.read([_req(f, 1, (4 << 20) - 1)])
        before = _rss()
        for _ in range(100):  # 400 MiB in total
            (v,) = r.read([_req(f, 1, (4 << 20) - 1)])
            assert v[0] is not None
            del v
        assert _rss() - before < 64 << 20


def test_buffers_are_reused_only_after_every_view_is_gone(disk_dir):
    f = disk_dir / "a.bin"
    data = _write(f, 1 << 20)
    reqs = [_req(f, 0, 100_000), _req(f, 100_000, 100_000)]  # coalesced: one shared buffer
    with ExtentReader("direct") as r:
        first, second = r.read(reqs)
        del first  # second still uses the buffer: it must not be reused yet
        held = np.frombuffer(second, dtype=np.uint8)[10:20]  # derived objects count too
        del second
        for k in range(20):
            (v,) = r.read([_req(f, 500_000 + k, 200_000)])
            assert bytes(v) == data[500_000 + k : 700_000 + k]
            del v
        assert bytes(held) == data[100_010:100_020]
        assert r.stats()["buffer_allocations"] == 2  # the held one, and one reused 20 times
        del held
        r.read([_req(f, 0, 200_000)])
        assert r.stats()["buffer_allocations"] == 2


def test_fd_cache_is_bounded_and_closed(disk_dir):
    files = [disk_dir / f"f{i}.bin" for i in range(6)]
    for i, f in enumerate(files):
        _write(f, 8192, i)
    fds_before = len(os.listdir("/proc/self/fd"))
    r = ExtentReader("direct", max_open_files=2)
    for f in files:
        r.read([_req(f, 0, 100)])
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 2
    r.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    with pytest.raises(ValueError, match="closed"):
        r.read([_req(files[0], 0, 1)])


def test_without_preadv_falls_back_to_pread(disk_dir, monkeypatch):
    f = disk_dir / "a.bin"
    data = _write(f, 100_000)
    monkeypatch.delattr(os, "preadv")  # platforms without preadv
    with ExtentReader("direct") as r:
        (v,) = r.read([_req(f, 4097, 50_000)])
    assert bytes(v) == data[4097:54_097]


def test_rejects_bad_arguments(disk_dir):
    with pytest.raises(ValueError, match="io_mode"):
        ExtentReader("mmap")
    f = disk_dir / "a.bin"
    _write(f, 100)
    with ExtentReader() as r, pytest.raises(ValueError, match="negative"):
        r.read([_req(f, -1, 10)])


def test_convert_runs_in_io_threads_in_request_order(disk_dir):
    import threading

    path = disk_dir / "conv.bin"
    data = _write(path, 1 << 20, seed=5)
    requests = [_req(path, off, 3000) for off in (700_000, 5, 300_000, 90_001)]
    seen_threads = set()

    def convert(i, view):
        seen_threads.add(threading.current_thread().name)
        return (i, bytes(view))

    with ExtentReader("direct", threads=4, coalesce_gap=0) as reader:
        out = reader.read(requests, convert)
    assert [i for i, _ in out] == [0, 1, 2, 3]
    assert [b for _, b in out] == [data[r.offset : r.offset + r.nbytes] for r in requests]
    assert any(name.startswith("moestream-io") for name in seen_threads)


def _aligned_targets(needs, extra=0):
    """One page-aligned mmap per need (as a caller's own memory would be), kept by the caller."""
    bufs = [mmap.mmap(-1, max(n + extra, 1)) for _, n in needs]
    return bufs


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_a_large_batch_is_split_across_threads(disk_dir, mode):
    import threading

    f = disk_dir / "big.bin"
    data = _write(f, 8 << 20, seed=3)
    # three 1.5 MB extents on four threads: each thread reads a quarter, so some extents are
    # read by two threads; convert still runs once per extent, after all its bytes are in
    reqs = [_req(f, off, 1_500_000, f"expert {k}") for k, off in enumerate((0, 2 << 20, 5 << 20))]
    calls = []

    def convert(i, view):
        calls.append((i, threading.current_thread().name))
        return bytes(view)

    with ExtentReader(mode, threads=4, split_min_bytes=256 << 10) as r:
        out = r.read(reqs, convert)
        assert r.stats()["reads"] >= 4
        assert r.stats()["bytes_read"] >= 3 * 1_500_000
    assert out == [data[q.offset : q.offset + q.nbytes] for q in reqs]
    assert sorted(i for i, _ in calls) == [0, 1, 2]


def test_a_small_batch_is_not_split(disk_dir):
    f = disk_dir / "small.bin"
    _write(f, 1 << 20)
    with ExtentReader("direct", threads=8) as r:
        r.read([_req(f, 0, 600_000)])
        assert r.stats()["reads"] == 1


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_reads_go_straight_into_the_callers_targets(disk_dir, mode):
    f = disk_dir / "into.bin"
    data = _write(f, 64 * 16 * 1024, seed=4)
    reqs = _extents(f, 12, 10_000)  # 16 KiB apart: coalesced with their padding read and dropped
    reqs = [reqs[k] for k in (5, 0, 3, 4, 11, 1)]
    asked, kept = [], {}

    def into(needs):
        asked.extend(needs)
        bufs = _aligned_targets(needs)
        kept.update({i: b for (i, _), b in zip(needs, bufs, strict=True)})
        return bufs

    with ExtentReader(mode, coalesce_gap=16 * 1024) as r:
        views = r.read(reqs, into=into)
        assert r.stats()["reads"] == 3  # runs 0-1, 3-5, 11
    assert sorted(i for i, _ in asked) == list(range(len(reqs)))
    want = 12_288 if mode == "direct" else 10_000
    assert {n for _, n in asked} == {want}
    for i, (q, v) in enumerate(zip(reqs, views, strict=True)):
        assert bytes(v) == data[q.offset : q.offset + q.nbytes]
        target = np.frombuffer(kept[i], dtype=np.uint8)
        assert np.frombuffer(v, dtype=np.uint8).ctypes.data == target.ctypes.data  # no copy


def test_into_splits_a_large_extent_across_threads(disk_dir):
    f = disk_dir / "into_big.bin"
    data = _write(f, 6 << 20, seed=6)
    reqs = [_req(f, 1 << 20, 3_000_000, "expert 7"), _req(f, 4 << 20, 1_000_000, "expert 8")]
    kept = []

    def into(needs):
        kept.extend(_aligned_targets(needs))
        return kept[-len(needs):]

    with ExtentReader("direct", threads=4, split_min_bytes=256 << 10) as r:
        views = r.read(reqs, into=into)
        assert r.stats()["reads"] >= 4
    for q, v in zip(reqs, views, strict=True):
        assert bytes(v) == data[q.offset : q.offset + q.nbytes]


def test_bad_targets_are_refused(disk_dir):
    f = disk_dir / "t.bin"
    _write(f, 1 << 20)
    with ExtentReader("direct") as r:
        with pytest.raises(ValueError, match="hold 8192 bytes"):
            r.read([_req(f, 0, 5000, "expert 1")], into=lambda needs: [mmap.mmap(-1, 4096)])
        with pytest.raises(ValueError, match="aligned"):
            r.read([_req(f, 0, 5000)], into=lambda needs: [memoryview(mmap.mmap(-1, 3 * 4096))[8:]])
        with pytest.raises(ValueError, match="writable"):
            r.read([_req(f, 0, 5000)], into=lambda needs: [bytes(8192)])
        with pytest.raises(ValueError, match="2 targets for 1"):
            r.read([_req(f, 0, 5000)], into=lambda needs: [mmap.mmap(-1, 8192)] * 2)
        # the reader is still usable, and its buffers were given back
        (v,) = r.read([_req(f, 0, 10)])
        assert len(v) == 10


@pytest.mark.parametrize("split", [False, True])
def test_truncated_extent_in_a_split_batch_names_it(disk_dir, split):
    f = disk_dir / "trunc.bin"
    _write(f, 3 << 20)
    reqs = [_req(f, 0, 1 << 20, "layer 1 expert 0"), _req(f, 2 << 20, 2 << 20, "layer 1 expert 9")]
    with ExtentReader("direct", threads=4, split_min_bytes=(256 << 10) if split else 64 << 20) as r:
        with pytest.raises(ReadError, match="layer 1 expert 9: short read") as e:
            r.read(reqs)
        assert e.value.got == 1 << 20
        assert r.read([_req(f, 0, 10)])[0].nbytes == 10


def test_many_small_extents_are_not_split_but_spread_over_the_pool(disk_dir):
    f = disk_dir / "many.bin"
    data = _write(f, 64 * 64 * 1024, seed=8)
    reqs = [_req(f, k * 2 * 64 * 1024, 60_000, f"expert {k}") for k in range(30)]  # 30 groups (gaps)
    with ExtentReader("direct", threads=4, split_min_bytes=256 << 10) as r:
        views = r.read(reqs)
        assert r.stats()["reads"] == 30, "one read per group: none is worth cutting"
    for q, v in zip(reqs, views, strict=True):
        assert bytes(v) == data[q.offset : q.offset + q.nbytes]


class _BlockCheck:
    """Records each block the reader hands over and compares it with the file's bytes."""

    def __init__(self, data: bytes, req: ReadRequest, block_bytes: int, bad_block: int | None = None):
        import threading

        self.want, self.block_bytes, self.bad_block = data[req.offset : req.offset + req.nbytes], block_bytes, bad_block
        self.seen, self.threads = [], set()
        self._lock = threading.Lock()

    def check(self, index, view):
        import threading

        with self._lock:
            self.seen.append(index)
            self.threads.add(threading.current_thread().name)
        start = index * self.block_bytes
        assert bytes(view) == self.want[start : start + self.block_bytes]
        if index == self.bad_block:
            raise ValueError(f"block {index} does not match")


def _checked(f: Path, data: bytes, spans: list[tuple[int, int]]):
    """Requests for (offset, nbytes) spans of f, each checked in 300,000-byte blocks; their checks;
    and an `into` that hands out aligned targets (kept alive until the test ends)."""
    reqs = [_req(f, off, n, f"expert {k}") for k, (off, n) in enumerate(spans)]
    checks = [_BlockCheck(data, q, 300_000) for q in reqs]
    kept = []

    def into(needs):
        kept.extend(_aligned_targets(needs))
        return kept[-len(needs):]

    return [dataclasses.replace(q, check=c) for q, c in zip(reqs, checks, strict=True)], checks, into


@pytest.mark.parametrize("mode,targets", [("direct", False), ("buffered", False), ("direct", True)])
def test_every_block_is_checked_once_as_its_bytes_arrive(disk_dir, mode, targets):
    """Blocks that a thread's share cuts in two are checked by whichever thread completes them,
    blocks inside one share by the thread that read them: each exactly once, over its own bytes,
    with reads split across threads and extents starting off the alignment."""
    f = disk_dir / "blocks.bin"
    data = _write(f, 8 << 20, seed=9)
    reqs, checks, into = _checked(f, data, [(12_345, 3_000_000), (3 << 20, 2_500_000), (6 << 20, 100)])
    with ExtentReader(mode, threads=4, split_min_bytes=256 << 10) as r:
        views = r.read(reqs, into=into if targets else None)
        assert r.stats()["reads"] >= 4
    for q, v, c in zip(reqs, views, checks, strict=True):
        assert bytes(v) == data[q.offset : q.offset + q.nbytes]
        assert sorted(c.seen) == list(range(-(-q.nbytes // c.block_bytes)))


def test_a_failed_block_check_fails_the_read_and_converts_nothing(disk_dir):
    f = disk_dir / "bad_block.bin"
    data = _write(f, 4 << 20, seed=10)
    req = _req(f, 0, 3_000_000, "expert 3")
    check = _BlockCheck(data, req, 1 << 20, bad_block=1)
    converted = []
    with ExtentReader("direct", threads=4, split_min_bytes=256 << 10) as r:
        with pytest.raises(ValueError, match="block 1 does not match"):
            r.read([dataclasses.replace(req, check=check)], lambda i, v: converted.append(i))
        assert r.read([req]) and True  # the reader stays usable
    assert converted == []


def test_check_time_and_its_tail_are_counted(disk_dir):
    f = disk_dir / "timed.bin"
    data = _write(f, 4 << 20, seed=11)
    req = _req(f, 0, 3_000_000, "expert 4")
    with ExtentReader("direct", threads=4, split_min_bytes=256 << 10) as r:
        r.read([dataclasses.replace(req, check=_BlockCheck(data, req, 1 << 20))])
        s = r.stats()
        assert s["check_s"] > 0 and 0 < s["check_tail_s"] <= s["check_s"]
        r.reset_stats()
        r.read([req])  # unchecked
        assert r.stats()["check_s"] == r.stats()["check_tail_s"] == 0


def test_time_inside_the_reads_is_counted_and_bounded_by_the_threads(disk_dir, monkeypatch):
    """pread_s sums the time the threads spent inside the read syscalls: a read made slow by 20 ms
    counts its 20 ms on each of the threads that made one, and the sum never exceeds the threads
    times the time the caller waited, so pread_s / io_wait_s is how many reads were in flight."""
    f = disk_dir / "inflight.bin"
    _write(f, 4 << 20, seed=13)
    real = os.preadv

    def slow(fd, bufs, off, *rest):
        time.sleep(0.02)
        return real(fd, bufs, off, *rest)

    monkeypatch.setattr(os, "preadv", slow)
    with ExtentReader("direct", threads=4, split_min_bytes=256 << 10) as r:
        r.read([_req(f, 0, 4 << 20, "expert 5")])
        s = r.stats()
    assert s["pread_s"] >= 0.02 * s["reads"] * 0.9
    assert s["pread_s"] <= 4 * s["io_wait_s"] and s["pread_s"] / s["io_wait_s"] > 2, "the 4 threads overlapped"


def test_a_checked_extent_is_read_in_sub_reads_of_the_readers_size(disk_dir):
    """One 6 MB checked extent on one thread: read in 1 MiB sub-reads by default (each checked as it
    arrives), in 3 MiB ones with checked_read_bytes at 3 MiB; every block checked once either way."""
    f = disk_dir / "subreads.bin"
    data = _write(f, 8 << 20, seed=12)
    req = _req(f, 0, 6 << 20, "expert 5")
    for size, reads in ((None, 6), (3 << 20, 2)):
        check = _BlockCheck(data, req, 1 << 20)
        with ExtentReader("direct", threads=1) as r:
            if size is not None:
                r.checked_read_bytes = size
            (view,) = r.read([dataclasses.replace(req, check=check)])
            assert r.stats()["reads"] == reads, size
        assert bytes(view) == data[: 6 << 20] and sorted(check.seen) == list(range(6))


@pytest.mark.parametrize("order", ["pieces", "shuffled"])
@pytest.mark.parametrize("targets", [False, True])
def test_pieces_taken_in_turn_give_the_same_bytes_and_check_every_block_once(disk_dir, order, targets):
    """With read_order "pieces" or "shuffled" a call's groups are cut into sub-read-sized pieces that
    the threads take from one queue: every request still gets exactly its bytes, every block is
    checked once, and a short file still names the extent it cut."""
    f = disk_dir / "pieces.bin"
    data = _write(f, 9 << 20, seed=14)
    spans = [(12_345, 3_000_000), (3 << 20, 2_500_000), (6 << 20, 100), ((6 << 20) + 8192, 2_000_000)]
    reqs, checks, into = _checked(f, data, spans)
    with ExtentReader("direct", threads=4) as r:
        r.read_order = order
        views = r.read(reqs, into=into if targets else None)
        assert r.stats()["reads"] >= 8, "read in 1 MiB pieces"
        for q, v, c in zip(reqs, views, checks, strict=True):
            assert bytes(v) == data[q.offset : q.offset + q.nbytes]
            assert sorted(c.seen) == list(range(-(-q.nbytes // c.block_bytes)))
        with pytest.raises(ReadError, match="expert 9: short read"):
            r.read([_req(f, 0, 1 << 20, "expert 8"), _req(f, 8 << 20, 2 << 20, "expert 9")])
        with pytest.raises(ValueError, match="read_order"):
            r.read_order = "sideways"


def test_shuffled_pieces_are_read_out_of_layout_order(disk_dir, monkeypatch):
    """"pieces" reads a call's pieces in layout order (one thread: strictly ascending offsets);
    "shuffled" does not."""
    f = disk_dir / "order.bin"
    _write(f, 16 << 20, seed=15)
    offsets = []
    real = os.preadv

    def record(fd, bufs, off, *rest):
        offsets.append(off)
        return real(fd, bufs, off, *rest)

    monkeypatch.setattr(os, "preadv", record)
    for order in ("pieces", "shuffled"):
        offsets.clear()
        with ExtentReader("direct", threads=1) as r:
            r.read_order = order
            r.read([_req(f, 0, 16 << 20, "expert 0")])
        assert len(offsets) == 16
        assert (offsets == sorted(offsets)) == (order == "pieces")


def test_queue_depth_caps_the_reads_in_the_disk_and_a_spare_thread_reads_while_one_checks(disk_dir, monkeypatch):
    """With queue_depth 1 on 2 threads, never two reads are inside a read syscall at once, and while
    one thread checks the block it read, the other thread's read is under way: the slot passes on
    instead of the disk waiting on the check. The bytes and the checks are as without the cap."""
    import threading

    f = disk_dir / "depth.bin"
    data = _write(f, 8 << 20, seed=16)
    inside, most, lock = [0], [0], threading.Lock()
    read_began = threading.Event()
    real = os.preadv

    def counted(fd, bufs, off, *rest):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        read_began.set()
        try:
            time.sleep(0.002)
            return real(fd, bufs, off, *rest)
        finally:
            with lock:
                inside[0] -= 1

    overlapped = []

    class WaitingCheck(_BlockCheck):
        def check(self, index, view):
            if index == 0:  # the first block: wait for a read to begin while it is being checked
                read_began.clear()
                overlapped.append(read_began.wait(5))
            super().check(index, view)

    monkeypatch.setattr(os, "preadv", counted)
    req = _req(f, 0, 6 << 20, "expert 6")
    check = WaitingCheck(data, req, 1 << 20)
    with ExtentReader("direct", threads=2) as r:
        r.read_order, r.queue_depth = "pieces", 1
        (view,) = r.read([dataclasses.replace(req, check=check)])
        with pytest.raises(ValueError, match="queue_depth"):
            r.queue_depth = 0
    assert bytes(view) == data[: 6 << 20] and sorted(check.seen) == list(range(6))
    assert most[0] == 1, "never more reads in the disk than the queue depth"
    assert overlapped == [True], "the other thread read while this one checked"
