"""moestream: run Mixture-of-Experts models larger than memory by streaming experts from disk.

The public API is small and imports its parts only when used, so `import moestream` stays cheap
and a bundle consumer never imports the preparation pipeline (Prefect):

    model, tokenizer = moestream.load("bundles/q3", memory_budget="8GB")
    moestream.plan_memory("bundles/q3", expert_cache_share=0.25).budget_bytes
    moestream.runtime_of(model).stats()     # bytes read, cache hit rate, ...; .close()
    moestream.inspect("bundles/q3")
    moestream.prepare("Qwen/Qwen3-30B-A3B", "bundles/q3", expert_bits=4)

Every error moestream raises on purpose is a `moestream.MoestreamError`.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# name -> the module that defines it (imported on first use)
_PUBLIC = {
    "load": "moestream.runtime.model.load",
    "plan_memory": "moestream.runtime.model.load",
    "runtime_of": "moestream.runtime.model.load",
    "stats": "moestream.runtime.model.load",
    "IOOptions": "moestream.runtime.model.load",
    "MemoryPlan": "moestream.runtime.model.budget",
    "PrepareOptions": "moestream.stages.prepare",
    "PrepareResult": "moestream.stages.prepare",
    "MoestreamError": "moestream.common.errors",
}

__all__ = ["inspect", "prepare", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'moestream' has no attribute {name!r}")


def inspect(path) -> dict:
    """What `moestream inspect PATH --json` prints: the bundle's recipe, sizes and format."""
    from .manifests.describe import describe_bundle

    return describe_bundle(path)


def prepare(source, out, *, engine: str = "prefect", progress=None, **options):
    """Prepare a bundle from SOURCE (a Hub repo id or a checkpoint folder) into OUT.

    options: the fields of PrepareOptions (expert_bits, group_size, resident_bits, revision,
    bits_plan, size_budget, calibration, profile, profile_tokens, overwrite, workers,
    dask_address). engine: "prefect" (the flow: retries, resume, Dask, the Prefect UI) or
    "plain" (the same steps in this process). progress(step, done, total) is called as steps
    finish. Returns a PrepareResult (bundle folder, bundle.json, seconds).
    """
    from dataclasses import fields

    from .common.errors import OptionsError
    from .stages.prepare import ENGINES, PrepareOptions, prepare_in_process

    if engine not in ENGINES:
        raise OptionsError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    known = {f.name for f in fields(PrepareOptions)} - {"source", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionsError(f"unknown preparation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    opts = PrepareOptions(source=source, out=out, **options)
    if engine == "plain":
        return prepare_in_process(opts, progress)
    if importlib.util.find_spec("prefect") is None:
        raise OptionsError("the Prefect engine needs Prefect: pip install 'moestream[prepare]' "
                           "(or run the same steps without it: engine='plain', --engine plain)")
    from .flows.prepare import prepare_with_prefect

    return prepare_with_prefect(opts, progress)
