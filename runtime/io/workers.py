"""Threads that run MLX work, and how they end.

MLX keeps state per thread that runs MLX work: its streams, and the compile cache of every
function compiled in it (mlx-lm compiles its activations and samplers, so a generation thread
holds some). Their native destructors run after Python has let the thread go: `Thread.join`
returns once the thread's Python state is gone, before its thread-local destructors run. When the
interpreter starts finalizing in between (a join just before exit: a server's generation thread,
the pools joined at exit), the destructor's request for the GIL ends the thread mid-unwind and the
process aborts ("terminate called without an active exception"). `mx.clear_streams()` called in
the thread while Python still runs it leaves those destructors nothing to do; MLX asks every
worker thread to call it before it ends.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def release_mlx_thread_state() -> None:
    """Drop the calling thread's MLX streams and compile cache (call it last in a thread that ran
    MLX work)."""
    import mlx.core as mx  # here, not above: the reader imports this module and needs no MLX itself

    mx.clear_streams()


class _AtThreadEnd:
    def __del__(self):
        release_mlx_thread_state()


_thread_end = threading.local()


def release_mlx_at_thread_end() -> None:
    """Release the calling thread's MLX state when it ends (a pool's initializer: pools have no
    hook at a worker's end). A thread-local value dies with the thread's Python state, in the
    thread, before a join returns."""
    if getattr(_thread_end, "guard", None) is None:
        _thread_end.guard = _AtThreadEnd()


def mlx_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose workers release their MLX state when they end."""
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=release_mlx_at_thread_end)


def shared_pool(threads: int, name: str = "moestream-io") -> ThreadPoolExecutor:
    """A thread pool shared by every reader of the process, kept for its lifetime. MLX keeps
    native resources per thread that runs MLX work (the readers turn bytes into arrays in their
    threads): a pool made and shut down per load made them again for every load. Shared pools make
    them once; their workers release them when the process ends."""
    with _POOLS_LOCK:
        pool = _POOLS.get((name, threads))
        if pool is None:
            pool = _POOLS[(name, threads)] = mlx_pool(threads, name)
        return pool
