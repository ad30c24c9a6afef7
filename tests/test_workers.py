"""Threads that run MLX work release MLX's per-thread state before they end (runtime/io/workers.py):
otherwise a thread that compiled MLX functions and was joined just before exit can abort the
process while it finalizes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import mlx.core as mx

from moestream.runtime.io.workers import mlx_pool, shared_pool


@mx.compile
def _twice_plus_one(x):
    return x * 2 + 1


def _compile_and_run(_) -> int:
    mx.eval(_twice_plus_one(mx.ones((8, 8))))
    return threading.get_ident()


def test_pool_workers_release_their_mlx_state_in_their_own_thread_as_they_end(monkeypatch):
    released = []
    clear_streams = mx.clear_streams
    monkeypatch.setattr(mx, "clear_streams", lambda: (released.append((threading.get_ident(), sys.is_finalizing())),
                                                      clear_streams()))
    pool = mlx_pool(2, "moestream-test")
    workers = set(pool.map(_compile_and_run, range(16)))
    assert not released, "released while the workers still run"
    pool.shutdown(wait=True)
    assert sorted(ident for ident, _ in released) == sorted(workers)
    assert not any(finalizing for _, finalizing in released)


def test_shared_pools_are_made_once_per_name_and_size():
    assert shared_pool(3, "moestream-test-shared") is shared_pool(3, "moestream-test-shared")
    assert shared_pool(3, "moestream-test-shared") is not shared_pool(2, "moestream-test-shared")


def test_a_process_whose_pool_workers_compiled_exits_cleanly():
    """The race itself, in fresh interpreters: workers that compiled, joined as the process exits.
    Without the release at thread end about one run in three aborted here (exit -6)."""
    script = textwrap.dedent("""
        import mlx.core as mx
        from moestream.runtime.io.workers import shared_pool

        @mx.compile
        def f(x):
            return x * 2 + 1

        list(shared_pool(2, "moestream-exit").map(lambda _: mx.eval(f(mx.random.normal((64, 64)))), range(6)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(12)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0] != 0][:2]
