"""Load a bundle (or a source checkpoint) as an ordinary mlx-lm model that streams its experts.

`load` builds mlx-lm's own model for the config (lazily: no memory for its random init), loads the
resident weights, replaces every SwitchGLU by a StreamingSwitchGLU that reads routed experts
through one reader, one expert cache and one store, and sizes the cache from the memory budget.
What it attached is the model's `StreamingRuntime` (`runtime_of(model)`): its figures, its
budget, and `close()`, which releases the reader's threads, files and buffers.
"""

from __future__ import annotations

import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

from ...common.errors import MoestreamError, OptionsError
from ...common.units import parse_bytes
from ...manifests.architecture import build_model, quantize_like_mlx_lm
from ...manifests.bundle import BUNDLE_JSON, EXTENT_ALIGNMENT, RESIDENT_FILE, BundleError
from ...manifests.checkpoint import SourceCheckpoint
from ...manifests.open import open_bundle
from ..cache.expert_cache import ExpertCache
from ..cache.policies import configure_policy, make_policy
from ..io.reader import ALIGN, IO_MODES, ExtentReader, align_down, align_up, queue_depth_problem, read_order_problem
from ..io.staging import mlx_uses_cuda
from ..io.stores import READ_INTO, BundleStore, CheckpointStore
from .budget import MemoryNeeds, MemoryPlan, memory_needs
from .lookahead import enable_lookahead
from .modules import install_streaming, set_experts_per_token
from .streaming import ExpertStreamer

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DTYPES_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # float tensors of an extent, cast when read
# Extents are 16 KiB aligned: neighbours (experts that fire together, in profile order) are at most
# their padding apart, so a gap of one alignment unit merges them into one read.
COALESCE_GAP = EXTENT_ALIGNMENT


@dataclass(frozen=True)
class IOOptions:
    """How experts are read. The defaults are what measured best; the others are kept to measure
    against and for machines where they win.

    mode: "direct" bypasses the OS page cache (O_DIRECT / F_NOCACHE), so the memory budget is
    honest; "buffered" trusts the OS. threads: reader threads (None: 8, or 2 per core if fewer).
    read_into: "arrays" reads each expert straight into MLX memory (no copy); "host" into host
    buffers, then copies. stage_on_device: copy each read expert into GPU-made memory in the I/O
    thread (None: on MLX's CUDA backend, where host-made arrays are managed memory).
    check_reads: check each expert's fast checksum on every read from disk (format 2 bundles), so
    damaged bytes are an error naming the expert, never a wrong token; off only to measure its cost.
    read_order: how one read call's bytes are shared among the threads (reader.READ_ORDERS):
    "shares", one contiguous share per thread; "pieces" or "shuffled", 1 MiB pieces the threads
    take in turn, in layout order or in a random order.
    queue_depth: at most this many reads in the disk at once (None: one per thread). Below
    `threads`, the spare threads take the slot of one that checks or hands off what it read, so the
    disk sees a steady queue of this depth.
    """

    mode: str = "direct"
    threads: int | None = None
    read_into: str = "arrays"
    stage_on_device: bool | None = None
    check_reads: bool = True
    read_order: str = "shares"
    queue_depth: int | None = None

    def __post_init__(self):
        if self.mode not in IO_MODES:
            raise OptionsError(f"io mode must be one of {', '.join(IO_MODES)}, got {self.mode!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise OptionsError(f"io threads must be a positive integer, got {self.threads!r}")
        if self.read_into not in READ_INTO:
            raise OptionsError(f"read_into must be one of {', '.join(READ_INTO)}, got {self.read_into!r}")
        if problem := read_order_problem(self.read_order) or queue_depth_problem(self.queue_depth):
            raise OptionsError(f"io {problem}")

    def staging(self) -> bool:
        if self.stage_on_device is None:
            return mx.default_device() != mx.cpu and mlx_uses_cuda()
        return bool(self.stage_on_device)


@dataclass
class StreamingRuntime:
    """What moestream attaches to a loaded model: where it reads from, how, and within what budget."""

    path: Path
    kind: str  # "bundle" or "checkpoint"
    store: Any  # BundleStore or CheckpointStore
    reader: ExtentReader
    cache: ExpertCache
    streamer: ExpertStreamer
    plan: MemoryPlan
    experts_per_token: int
    dtype: str
    io: IOOptions = field(default_factory=IOOptions)
    closed: bool = False
    _staging_made: int = 0  # staging arrays made before the last reset_stats

    @property
    def num_experts(self) -> int:
        return self.streamer.num_experts

    def stats(self) -> dict:
        """I/O, cache and budget figures since load (or the last reset_stats)."""
        r, c, s = self.reader.stats(), self.cache.stats(), self.streamer
        return {
            "bytes_read": r["bytes_read"],
            "reads": r["reads"],
            "mean_read_bytes": r["mean_read_bytes"],
            "io_wait_s": r["io_wait_s"],
            "check_s": r["check_s"],
            "check_tail_s": r["check_tail_s"],
            "pread_s": r["pread_s"],
            "io_mode": self.reader.io_mode_in_use,
            "cache_hits": c["cache_hits"],
            "cache_misses": c["cache_misses"],
            "hit_rate": c["hit_rate"],
            "expert_cache_bytes": c["expert_cache_bytes"],
            "expert_cache_peak_bytes": c["expert_cache_peak_bytes"],
            "evictions": c.get("evictions", 0),
            "budget_bytes": self.plan.budget_bytes,
            # the most the cache holds (while decoding; lent the prefill's room), and the least (during
            # the plan's prefill chunk): the plan's cache_bytes
            "cache_capacity_bytes": self.plan.decode_cache_bytes if s.lend_prefill_room else self.plan.cache_bytes,
            "prefill_cache_capacity_bytes": self.plan.cache_bytes,
            "cache_shrinks": s.cache_shrinks,
            "resident_bytes": self.plan.resident_bytes,
            "kv_reserve_bytes": self.plan.kv_reserve_bytes,
            "experts_per_token": self.experts_per_token,
            "dtype": self.dtype,
            "peak_memory_bytes": mx.get_peak_memory(),
            "moe_calls": s.calls,
            "route_sync_s": s.sync_s,
            "attention_s": s.attention_s,
            "expert_fetch_s": s.fetch_s,
            "expert_compute_s": s.compute_s,
            "prefill_read_s": s.prefill_read_s,
            "prefill_wait_s": s.prefill_wait_s,
            "prefill_read_bytes": s.prefill_read_bytes,
            "prefill_speculated": s.speculated,
            "prefill_speculated_unused": s.speculated_unused,
            "staging_allocations": self._staging_allocations() - self._staging_made,
            **s.prefetch_stats(),
        }

    def reset_stats(self) -> None:
        """Zero the counters (not the cache's contents): for measuring one phase of a run."""
        self.reader.reset_stats()
        self.cache.reset_stats()
        self.streamer.reset_stats()
        self._staging_made = self._staging_allocations()

    def _staging_allocations(self) -> int:
        return getattr(getattr(self.store, "staging", None), "allocations", 0)

    def close(self) -> None:
        """Release the reader's threads, open files and buffers, and every cached expert. The
        model cannot compute afterwards (a call raises ReaderClosedError)."""
        if self.closed:
            return
        self.closed = True
        self.streamer.close()
        self.reader.close()
        close_store = getattr(self.store, "close", None)
        if close_store is not None:
            close_store()


class LoadedModel(NamedTuple):
    """(model, tokenizer), as mlx-lm's load returns them; also a context manager that closes the
    model: `with moestream.load(path) as (model, tokenizer): ...`."""

    model: nn.Module
    tokenizer: Any

    def close(self) -> None:
        runtime_of(self.model).close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve_dtype(dtype) -> mx.Dtype | None:
    """None: float32 on the CPU (MLX's CPU kernels are slow below it), the source dtype on GPUs;
    "source": the source dtype everywhere. Returns None for the source dtype."""
    if dtype == "source":
        return None
    if dtype is None:
        return mx.float32 if mx.default_device() == mx.cpu else None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OptionsError(f"dtype {dtype!r} is not one of source, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def _local(path: str | Path, revision: str | None) -> Path:
    if Path(path).exists():
        if revision is not None:
            raise OptionsError(f"{path} is a local folder: a revision ({revision!r}) only applies to Hub repo ids")
        return Path(path)
    from ..io.hub import resolve_bundle  # ORG/NAME: fetched (cached, resumable) and verified once

    return resolve_bundle(str(path), revision=revision)


def _open_source(path: Path, verify: bool, reader: ExtentReader | None, dtype, io: IOOptions):
    """(store, config, kind, num_experts, default top-k) of a bundle or a source checkpoint folder."""
    if (path / BUNDLE_JSON).is_file():
        bundle = open_bundle(path, verify=verify)
        if bundle.meta.get("format_version") == 1 and reader is not None:
            warnings.warn(f"{path} is a format 1 bundle: its experts carry no fast checksums, so reads are not "
                          "checked (`moestream verify` still checks everything); prepare it again for that",
                          UserWarning, stacklevel=4)
        store = BundleStore(bundle, reader, dtype, io.read_into, io.staging(), io.check_reads)
        return store, bundle.config, "bundle", bundle.num_experts, bundle.experts_per_token
    ckpt = SourceCheckpoint.open(path)
    return CheckpointStore(ckpt, reader, dtype), ckpt.mlx_config(), "checkpoint", ckpt.dims.num_experts, \
        ckpt.dims.experts_per_token


def _needs(store, num_experts: int, k: int, resident_bytes: int, config: dict, dtype, max_kv_size) -> MemoryNeeds:
    sizes = {(layer, e): store.nbytes(layer, e) for layer in store.layers for e in range(num_experts)}
    return memory_needs(sizes, k, resident_bytes, config, (dtype or mx.bfloat16).size, max_kv_size,
                        _held_ratio(store, dtype))


def _held_ratio(store, dtype) -> float:
    """The most memory an expert holds once read, per byte the cache counts for it (store.nbytes).
    A bundle's extent read straight into MLX memory (the default) stays whole while its tensors are
    views of it: host_buffers allocates its O_DIRECT read span (ALIGN-aligned) plus ALIGN bytes, and
    float tensors cast to the compute dtype (bf16 scales and biases on the CPU in float32) are
    copies beside it. Checked against mx.get_active_memory() (tests/test_budget_prompts.py). The
    other read paths hold less (a staging copy takes the extent's bytes; host buffers, zstd extents
    and source checkpoints only the tensors), but are planned the same, so that one budget gives
    every read path the same expert cache (and plan_memory, which knows no read path, agrees)."""
    if not isinstance(store, BundleStore):
        return 1.0
    name = None if dtype is None else str(dtype).replace("mlx.core.", "")
    worst = 1.0
    for (layer, expert), x in store.bundle.extents.items():
        counted = store.nbytes(layer, expert)
        if not counted:
            continue
        span = align_up(x.offset + x.nbytes) - align_down(x.offset)
        held = -(-(span + ALIGN) // 4) * 4
        if name is not None:
            held += sum(t.nbytes // DTYPES_BYTES[t.dtype] * dtype.size for t in x.tensors
                        if t.dtype in DTYPES_BYTES and t.dtype != name)
        worst = max(worst, held / counted)
    return worst


def _check_k(experts_per_token: int | None, num_experts: int) -> None:
    if experts_per_token is not None and not (isinstance(experts_per_token, int) and 1 <= experts_per_token <= num_experts):
        raise OptionsError(f"experts_per_token must be between 1 and {num_experts}, got {experts_per_token!r}")


def plan_memory(
    path: str | Path,
    *,
    memory_budget: int | str | None = None,
    expert_cache_share: float | None = None,
    experts_per_token: int | None = None,
    max_kv_size: int | None = None,
    dtype: str | None = None,
    revision: str | None = None,
) -> MemoryPlan:
    """How `load` with these options would split memory, without loading the model.

    expert_cache_share: the budget whose expert cache holds this share of all experts (e.g. 0.25)
    during a prompt's prefill chunks (while decoding it holds `decode_cache_bytes`, more);
    memory_budget: a budget to check and split (BudgetError if too small). With neither, the plan
    is unbounded; its `minimum_bytes` is the smallest budget that runs. Pass the plan's
    `budget_bytes` to `load(memory_budget=...)`.
    """
    if memory_budget is not None and expert_cache_share is not None:
        raise OptionsError("give memory_budget or expert_cache_share, not both")
    path = _local(path, revision)
    compute_dtype = _resolve_dtype(dtype)
    store, config, kind, num_experts, default_k = _open_source(path, False, None, compute_dtype, IOOptions())
    _check_k(experts_per_token, num_experts)
    if kind == "bundle":
        # lazy: shapes and dtypes only
        resident = _with_bundle_errors(RESIDENT_FILE, mx.load, str(store.bundle.path(RESIDENT_FILE)))
    else:
        resident = store.ckpt.resident_weights(store.ckpt.build_mlx_model())
    cast = compute_dtype is not None
    resident_bytes = sum(v.size * compute_dtype.size if cast and mx.issubdtype(v.dtype, mx.floating) else v.nbytes
                         for v in resident.values())
    needs = _needs(store, num_experts, experts_per_token or default_k, resident_bytes, config, compute_dtype,
                   max_kv_size)
    budget = needs.budget_for_share(expert_cache_share) if expert_cache_share is not None else parse_bytes(memory_budget)
    return needs.plan(budget)


def load(
    path: str | Path,
    *,
    memory_budget: int | str | None = None,
    experts_per_token: int | None = None,
    cache_policy: str = "lru",
    prefetch: bool = False,
    max_kv_size: int | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    verify: bool = False,
    profile: str | Path | None = None,
    io: IOOptions | None = None,
) -> LoadedModel:
    """Load a bundle (a folder or a Hub repo id ORG/NAME) or a source checkpoint folder as an mlx-lm
    model whose routed experts stream from disk. Returns (model, tokenizer) for mlx-lm's
    generate / stream_generate / server; also a context manager that closes the model.

    memory_budget: bytes or a string like "6GB" covering resident weights, the KV cache reserve,
        read buffers, the activations of a prefill chunk and the expert cache (None: no limit,
        every expert stays once read). The expert cache gets the plan's `cache_bytes` during a
        prefill chunk and `decode_cache_bytes` (the chunk's room too) while decoding. Too small a budget is refused with the minimum it needs;
        `plan_memory` sizes one from a share of the experts without loading. The plan's
        `prefill_tokens` is the prefill chunk (mlx-lm's prefill_step_size) the budget holds;
        `generate_text` uses it.
    experts_per_token: lower (or raise) the routed top-k of every MoE layer; the family's own code
        renormalises the router's weights.
    cache_policy: "lru", "lfu", or with a routing profile "hot", "prior", "lrfu".
    prefetch: read the next MoE layer's experts early, predicted by its own router.
    max_kv_size: tokens of KV cache the budget reserves (default 4096); `generate_text` bounds
        the cache to it as mlx-lm's max_kv_size does (a rotating cache).
    dtype: compute dtype, "float32" / "bfloat16" / "float16" (None: float32 on the CPU, the
        source dtype on GPUs).
    revision: branch, tag or commit of a Hub repo id.
    verify: check every checksum before loading (a repo id is verified once per commit anyway).
    profile: a routing profile (folder or trace) for the profile policies; a profiled bundle
        brings its own.
    io: how experts are read (IOOptions); the defaults are the measured best.
    """
    io = io or IOOptions()
    path = _local(path, revision)
    compute_dtype = _resolve_dtype(dtype)
    reader = ExtentReader(io_mode=io.mode, threads=io.threads, coalesce_gap=COALESCE_GAP)
    reader.read_order, reader.queue_depth = io.read_order, io.queue_depth
    try:
        return _load(path, reader, memory_budget, experts_per_token, cache_policy, prefetch, max_kv_size,
                     compute_dtype, verify, profile, io)
    except BaseException:
        reader.close()
        raise


def _load(path, reader, memory_budget, experts_per_token, cache_policy, prefetch, max_kv_size, compute_dtype,
          verify, profile, io) -> LoadedModel:
    budget = parse_bytes(memory_budget)
    store, config, kind, num_experts, default_k = _open_source(path, verify, reader, compute_dtype, io)
    _check_k(experts_per_token, num_experts)
    model = build_model(config)
    if kind == "bundle":
        weights = _with_bundle_errors(RESIDENT_FILE, mx.load, str(store.bundle.path(RESIDENT_FILE)))
    else:
        weights = store.ckpt.resident_weights(model)
    if config.get("quantization"):
        _with_bundle_errors("config.json quantization", quantize_like_mlx_lm, model, config["quantization"], weights)
    if profile is None and kind == "bundle" and (path / "profile" / "frequency.parquet").is_file():
        profile = store.bundle.path("profile/frequency.parquet").parent
    cache = ExpertCache(None, make_policy(cache_policy, profile))
    streamer = ExpertStreamer(store, cache, num_experts)
    install_streaming(model, store.layers, streamer)
    _with_bundle_errors(RESIDENT_FILE if kind == "bundle" else "the checkpoint's resident tensors",
                        model.load_weights, list(weights.items()), True)
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
    plan = _needs(store, num_experts, k, resident, config, compute_dtype, max_kv_size).plan(budget)
    cache.capacity_bytes = plan.cache_bytes
    streamer.prefill_room = plan.prefill_room_bytes
    if plan.cache_bytes is not None:  # each forward pass sizes the cache for its tokens (see streaming.py)
        streamer.sizes = lambda tokens, pipelined: (plan.cache_bytes_for(tokens, pipelined),
                                                    plan.prefill_room_for(tokens, pipelined))
    # idle read buffers (host buffers, staging arrays) are the read buffers the budget counts
    # (one layer's k experts; one kind is in use per read mode), plus each read's alignment
    idle = plan.min_layer_bytes + k * ALIGN
    store.limit_idle_buffers(idle)
    configure_policy(cache.policy, plan.cache_bytes, lambda key: store.nbytes(*key), plan.min_layer_bytes)
    model._moestream = StreamingRuntime(
        path, kind, store, reader, cache, streamer, plan, k, str(compute_dtype or "source").replace("mlx.core.", ""), io
    )
    tokenizer = _with_bundle_errors("the tokenizer files", partial(load_tokenizer, eos_token_ids=config.get("eos_token_id")), path)
    check_chat_template(tokenizer)
    return LoadedModel(model, tokenizer)


def _with_bundle_errors(what: str, fn, *args):
    """fn(*args) on a bundle's (untrusted) files: any failure of the libraries reading them (MLX,
    transformers, tokenizers) is a BundleError naming what was being read."""
    try:
        return fn(*args)
    except MoestreamError:
        raise
    except Exception as e:  # noqa: BLE001 - the libraries raise anything on malformed input
        raise BundleError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None


TEMPLATE_SECONDS = 5.0
# the longest default system prompts of released templates (tool instructions, dates) are a few KB
TEMPLATE_OUTPUT_CHARS = 256 * 1024


def check_chat_template(tokenizer) -> None:
    """Render the chat template once on a short conversation, within TEMPLATE_SECONDS (where a
    timer can interrupt it: the main thread): a template that loops for minutes is refused at load
    instead of hanging every prompt later."""
    if not getattr(tokenizer, "chat_template", None):
        return
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
    with time_limit(TEMPLATE_SECONDS, "the chat template did not finish rendering a four-message conversation in "
                    f"{TEMPLATE_SECONDS:.0f} s"):
        text = _with_bundle_errors("the chat template", partial(tokenizer.apply_chat_template, add_generation_prompt=True,
                                                                tokenize=False), messages)
    if len(text) > TEMPLATE_OUTPUT_CHARS:
        raise BundleError(f"the chat template renders a four-message conversation of four letters as {len(text)} "
                          f"characters (more than {TEMPLATE_OUTPUT_CHARS}): it would flood every prompt")


@contextmanager
def time_limit(seconds: float, message: str):
    """Raise BundleError(message) if the block runs longer (main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise BundleError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def runtime_of(model, required: bool = True) -> StreamingRuntime | None:
    """The streaming state `load` attached to `model`: store, reader, cache, budget plan, stats.
    For a model moestream did not load: NotLoadedError, or None if not `required`."""
    rt = getattr(model, "_moestream", None)
    if rt is None and required:
        raise NotLoadedError("this model was not loaded by moestream.load")
    return rt


class NotLoadedError(MoestreamError, TypeError):
    """A moestream function was given a model that moestream.load did not make."""


def stats(model) -> dict:
    """I/O and cache statistics of a model loaded by `load` (runtime_of(model).stats())."""
    return runtime_of(model).stats()
