"""moestream: run Mixture-of-Experts models larger than memory by streaming experts from disk.

The public API is small and imports its parts lazily, so `import moestream` stays cheap and a
bundle consumer never imports the preparation pipeline (Prefect):

    model, tokenizer = moestream.load("bundles/q3", memory_budget="8GB")
    moestream.stats(model)     # bytes read, cache hit rate, ...
    moestream.inspect("bundles/q3")
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, memory_budget=None, experts_per_token=None, dtype=None, io_mode="direct", io_threads=None,
         cache_policy="lru", verify=False, revision=None, prefetch=False, profile=None, read_into="arrays",
         stage_on_device=None):
    """Load a bundle (or a source checkpoint folder) as an mlx-lm model that streams its experts.

    memory_budget: bytes or a string like "6GB"; covers resident weights, the expert cache, the KV
    cache reserve and read buffers (None: no limit). dtype None computes in float32 on the CPU and
    in the source dtype on GPUs. Returns (model, tokenizer) for mlx-lm's generate/stream_generate.
    read_into: "arrays" reads experts straight into MLX memory (no copy), "host" into host buffers
    then copies (for comparison). stage_on_device (None: on CUDA) moves each read expert into
    GPU-made memory in the I/O thread, off the layer's critical path.
    """
    from .runtime.load import load as _load

    return _load(path, memory_budget=memory_budget, experts_per_token=experts_per_token, dtype=dtype,
                 io_mode=io_mode, io_threads=io_threads, cache_policy=cache_policy, verify=verify,
                 revision=revision, prefetch=prefetch, profile=profile, read_into=read_into,
                 stage_on_device=stage_on_device)


def stats(model) -> dict:
    """I/O and cache statistics of a model loaded by `load`."""
    from .runtime.load import stats as _stats

    return _stats(model)


def inspect(path) -> dict:
    """What `moestream inspect PATH --json` prints: the bundle's recipe, sizes and format."""
    from .manifests.describe import describe_bundle

    return describe_bundle(path)


def prepare(source, out, expert_bits=4, group_size=64, resident_bits=None, revision=None, overwrite=False):
    """Run the preparation flow (Prefect) on SOURCE (Hub repo id or folder) into bundle OUT."""
    from .flows.prepare import prepare_bundle

    return prepare_bundle(source, str(out), expert_bits=expert_bits, group_size=group_size,
                          resident_bits=resident_bits, revision=revision, overwrite=overwrite)
