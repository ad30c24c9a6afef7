"""Load a bundle (or a source checkpoint) as an ordinary mlx-lm model that streams its experts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import _get_classes, load_tokenizer

from ..manifests.bundle import BUNDLE_JSON, EXTENT_ALIGNMENT, RESIDENT_FILE
from ..manifests.checkpoint import SourceCheckpoint
from ..manifests.open import open_bundle
from .budget import KV_RESERVE_TOKENS, BudgetPlan, kv_bytes_per_token, parse_bytes, plan_budget
from .cache import ExpertCache
from .policies import configure_policy
from .policies import make_policy as make_cache_policy
from .reader import ALIGN, ExtentReader
from .staging import mlx_uses_cuda
from .stores import BundleStore, CheckpointStore
from .streaming import ExpertStreamer, StreamingSwitchGLU

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class StreamingRuntime:
    """What moestream attaches to a loaded model: its store, reader, cache and budget plan."""

    path: Path
    kind: str  # "bundle" or "checkpoint"
    store: object
    reader: ExtentReader
    cache: ExpertCache
    streamer: ExpertStreamer
    plan: BudgetPlan
    experts_per_token: int
    dtype: str


def _resolve_dtype(dtype) -> mx.Dtype | None:
    """None: float32 on the CPU (MLX's CPU kernels are slow below it), the source dtype on GPUs."""
    if dtype is None:
        return mx.float32 if mx.default_device() == mx.cpu else None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def _stage_default(stage_on_device: bool | None) -> bool:
    """None: stage on CUDA, whose host-made arrays are managed memory the GPU would migrate on
    first use; not on the CPU, nor on Apple silicon, where an array read into is already the
    memory the GPU computes from."""
    if stage_on_device is None:
        return mx.default_device() != mx.cpu and mlx_uses_cuda()
    return bool(stage_on_device)


def resolve_module(model: nn.Module, path: str):
    """The module at a dotted MLX path ("model.layers.3.mlp"); list items by index."""
    obj = model
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def _module_at(model: nn.Module, path: str):
    """(parent module, attribute name, module) for a dotted MLX module path."""
    parent_path, _, name = path.rpartition(".")
    parent = resolve_module(model, parent_path)
    return parent, name, getattr(parent, name)


def install_streaming(model: nn.Module, layers: dict[int, str], streamer: ExpertStreamer) -> None:
    for layer, path in layers.items():
        parent, name, old = _module_at(model, path)
        if not isinstance(old, SwitchGLU):
            raise TypeError(f"{path} is a {type(old).__name__}, expected mlx-lm's SwitchGLU")
        setattr(parent, name, StreamingSwitchGLU(streamer, layer, old.activation))


def enable_lookahead(model: nn.Module, layers: dict[int, str], streamer: ExpertStreamer) -> None:
    """Give each MoE layer the next MoE layer's router, so it can prefetch that layer's experts."""
    from .lookahead import router_of

    order = sorted(layers)
    for layer, following in zip(order, order[1:], strict=False):
        route = router_of(resolve_module(model, layers[following].rpartition(".")[0]))
        if route is not None:
            object.__setattr__(_module_at(model, layers[layer])[2], "lookahead", (following, route))
    streamer.enable_prefetch()


def set_experts_per_token(model: nn.Module, layers: dict[int, str], k: int, num_experts: int) -> None:
    """Lower (or raise) top-k in every MoE block; the block's own code renormalises the scores
    exactly as the family does (norm_topk_prob, softmax over the top-k ...)."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"experts_per_token must be between 1 and {num_experts}, got {k}")
    for path in layers.values():
        block = resolve_module(model, path.rpartition(".")[0])
        touched = False
        for obj in (block, getattr(block, "gate", None)):
            for attr in ("top_k", "num_experts_per_tok"):
                if obj is not None and isinstance(getattr(obj, attr, None), int):
                    setattr(obj, attr, k)
                    touched = True
        if not touched:
            raise TypeError(f"cannot set experts per token on {type(block).__name__} at {path}")


def _quantize_resident(model: nn.Module, config: dict, weights: dict) -> None:
    q = config.get("quantization")
    if not q:
        return
    nn.quantize(
        model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
    )


def load(
    path: str | Path,
    memory_budget: int | str | None = None,
    experts_per_token: int | None = None,
    dtype=None,
    io_mode: str = "direct",
    io_threads: int | None = None,
    cache_policy: str = "lru",
    verify: bool = False,
    revision: str | None = None,
    profile=None,
    prefetch: bool = False,
    read_into: str = "arrays",
    stage_on_device: bool | None = None,
):
    if not Path(path).exists():  # ORG/NAME: fetched (cached, resumable) and verified once
        from .hub import resolve_bundle

        path = resolve_bundle(str(path), revision=revision)
    path = Path(path)
    compute_dtype = _resolve_dtype(dtype)
    # extents are 16 KiB aligned: neighbours (experts that fire together, in profile order) are at
    # most their padding apart, so a gap of one alignment unit merges them into one read
    reader = ExtentReader(io_mode=io_mode, threads=io_threads, coalesce_gap=EXTENT_ALIGNMENT)
    if (path / BUNDLE_JSON).is_file():
        bundle = open_bundle(path, verify=verify)
        config, kind = bundle.config, "bundle"
        store = BundleStore(bundle, reader, compute_dtype, read_into, _stage_default(stage_on_device))
        num_experts, default_k = bundle.num_experts, bundle.experts_per_token
    else:
        ckpt = SourceCheckpoint.open(path)
        config, kind = ckpt.mlx_config(), "checkpoint"
        store = CheckpointStore(ckpt, reader, compute_dtype)
        num_experts, default_k = ckpt.dims.num_experts, ckpt.dims.experts_per_token

    model_class, args_class = _get_classes(config=config)
    model = model_class(args_class.from_dict(config))
    if kind == "bundle":
        weights = mx.load(str(path / RESIDENT_FILE))
    else:
        weights = ckpt.resident_weights(model)
    _quantize_resident(model, config, weights)
    if profile is None and kind == "bundle" and (path / "profile" / "frequency.parquet").is_file():
        profile = path / "profile"
    cache = ExpertCache(None, make_cache_policy(cache_policy, profile))
    streamer = ExpertStreamer(store, cache, num_experts)
    install_streaming(model, store.layers, streamer)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if compute_dtype is not None:
        model.set_dtype(compute_dtype)
    model.eval()
    mx.eval(model.parameters())

    if prefetch:
        enable_lookahead(model, store.layers, streamer)
    k = experts_per_token or default_k
    if experts_per_token is not None:
        set_experts_per_token(model, store.layers, k, num_experts)
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    itemsize = (compute_dtype or mx.bfloat16).size
    layer_bytes = max(
        sum(sorted((store.nbytes(layer, e) for e in range(num_experts)), reverse=True)[:k]) for layer in store.layers
    )
    plan = plan_budget(
        parse_bytes(memory_budget), resident, kv_bytes_per_token(config, itemsize) * KV_RESERVE_TOKENS,
        layer_bytes, layer_bytes,
    )
    cache.capacity_bytes = plan.cache_bytes
    # idle read buffers (host buffers, staging arrays) are the "read buffers" the budget counts
    # (one layer's k experts; one kind is in use per read mode), plus each read's alignment
    idle = plan.buffer_bytes + k * ALIGN
    reader.limit_idle_buffers(idle)
    if hasattr(store, "staging"):
        store.staging.max_idle_bytes = idle
    configure_policy(cache.policy, plan.cache_bytes, lambda key: store.nbytes(*key), plan.min_layer_bytes)
    model._moestream = StreamingRuntime(
        path, kind, store, reader, cache, streamer, plan, k, str(compute_dtype or "source").replace("mlx.core.", "")
    )
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


def runtime_of(model) -> StreamingRuntime:
    rt = getattr(model, "_moestream", None)
    if rt is None:
        raise TypeError("this model was not loaded by moestream.load")
    return rt


def stats(model) -> dict:
    rt = runtime_of(model)
    r, c = rt.reader.stats(), rt.cache.stats()
    return {
        "bytes_read": r["bytes_read"],
        "reads": r["reads"],
        "mean_read_bytes": r["mean_read_bytes"],
        "io_wait_s": r["io_wait_s"],
        "io_mode": rt.reader.io_mode_in_use,
        "cache_hits": c["cache_hits"],
        "cache_misses": c["cache_misses"],
        "hit_rate": c["hit_rate"],
        "expert_cache_bytes": c["expert_cache_bytes"],
        "expert_cache_peak_bytes": c["expert_cache_peak_bytes"],
        "evictions": c.get("evictions", 0),
        "budget_bytes": rt.plan.budget_bytes,
        "cache_capacity_bytes": rt.plan.cache_bytes,
        "resident_bytes": rt.plan.resident_bytes,
        "kv_reserve_bytes": rt.plan.kv_reserve_bytes,
        "experts_per_token": rt.experts_per_token,
        "dtype": rt.dtype,
        "peak_memory_bytes": mx.get_peak_memory(),
        "moe_calls": rt.streamer.calls,
        "route_sync_s": rt.streamer.sync_s,
        "attention_s": rt.streamer.attention_s,
        "expert_fetch_s": rt.streamer.fetch_s,
        "expert_compute_s": rt.streamer.compute_s,
        **rt.streamer.prefetch_stats(),
    }


def reset_stats(model) -> None:
    """Zero the counters (not the cache's contents): for measuring one phase of a run."""
    rt = runtime_of(model)
    rt.reader.reset_stats()
    if hasattr(rt.cache, "reset_stats"):
        rt.cache.reset_stats()
    rt.streamer.sync_s = rt.streamer.fetch_s = rt.streamer.compute_s = rt.streamer.attention_s = 0.0
    rt.streamer.calls = 0


def describe_source(path: str | Path) -> dict:
    return json.loads((Path(path) / BUNDLE_JSON).read_text())
