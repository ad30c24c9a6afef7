"""`moestream bench`: a fully disclosed decode benchmark of one bundle.

In one run: the disk's O_DIRECT ceiling at the bundle's read size and the runtime's thread count;
decode under a memory budget, cold (empty expert cache, evicted pages; kernels already compiled by
a warm-up) and warm; per-layer phase timings; roofline (ceiling / bytes missed per token) and the
share achieved; optional comparisons: a naive loader, buffered I/O, other cache policies, mlx-lm
fully in memory (given the source checkpoint).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...common.errors import OptionsError
from ...manifests.bundle import unpack_extent
from ...manifests.describe import describe_bundle
from ...manifests.open import open_bundle
from ..io import staging
from ..io.pagecache import evict_page_cache
from ..io.reader import ALIGN, READ_ORDERS
from ..io.stores import cast_floats
from ..model.load import IOOptions, load, plan_memory, runtime_of
from ..model.streaming import PREFILL_ADMISSION
from .ceiling import READ_PATTERNS, read_ceiling, read_ceiling_rounds, read_extents
from .first_token import FirstTokenClock
from .memhold import Held, leave_available
from .report import ceilings, prefill_summary, streams_summary


def _timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def decode(model, prompt: list[int], gen_tokens: int, read_alone: bool = False) -> dict:
    """Greedy decode with mlx-lm's own generate_step; per-token wall times. read_alone: then read
    the experts the prefill routed to once more, by themselves (prefill_read_alone)."""
    from mlx_lm.generate import generate_step

    rt = runtime_of(model, required=False)
    streaming = rt is not None
    options = {}
    if streaming:
        rt.reset_stats()
        # the prompt in the chunks the memory plan sizes (as generate and chat do); every expert
        # the prefill routes to is collected, for its read floor
        options["prefill_step_size"] = rt.plan.prefill_tokens_for(len(prompt))
        rt.streamer.prefill_routed = routed = set()
        rt.streamer.prefill_spans = spans = []
    clock = FirstTokenClock(model, len(prompt))
    times, start, after_prefill = [], time.perf_counter(), None
    try:
        for _ in generate_step(mx.array(prompt), clock, max_tokens=gen_tokens, **options):
            times.append(time.perf_counter())
            if streaming and after_prefill is None:
                after_prefill = rt.stats()  # prefill + first token: kept out of decode figures
                rt.streamer.prefill_routed = rt.streamer.prefill_spans = None
    finally:
        if streaming:
            rt.streamer.prefill_routed = rt.streamer.prefill_spans = None
    gaps = np.diff(np.array(times))
    decode_s = times[-1] - times[0]
    out = {
        "ttft_s": times[0] - start,
        # the first token known; until it is yielded, mlx-lm's loop runs the next token's step (first_token.py)
        "first_token_known_s": (clock.known_at if clock.known_at is not None else times[0]) - start,
        "tokens_per_s": (len(times) - 1) / decode_s,
        "p50_token_ms": float(np.percentile(gaps, 50) * 1e3),
        "p99_token_ms": float(np.percentile(gaps, 99) * 1e3),
        "decode_s": decode_s,
    }
    if streaming:
        s, p = rt.stats(), after_prefill
        out["prefill_bytes_read"] = p["bytes_read"]
        out["prefill_step_size"] = options["prefill_step_size"]
        prefill_lookups = p["cache_hits"] + p["cache_misses"]
        out["prefill_hit_rate"] = p["cache_hits"] / prefill_lookups if prefill_lookups else 0.0
        out["prefill_distinct_experts"] = len(routed)
        out["prefill_expert_bytes"] = sum(_disk_bytes(rt.store, *key) for key in routed)
        out["prefill_admission"] = rt.streamer.prefill_admission if rt.streamer.prefill_pipeline else "plain path"
        # the pipeline's reads (the disk's busy time for them) and the layers' waits for them
        out.update({k: p[k] for k in ("prefill_read_s", "prefill_wait_s", "prefill_read_bytes",
                                      "prefill_speculated", "prefill_speculated_unused")})
        # how many reads the reader's threads kept in flight while the disk was busy with the
        # prefill (time inside the reads, summed over threads, over that busy time; the first
        # token's own reads count in the sum too): fewer than its threads where the threads
        # spend time checking and handing on what they read
        out["prefill_pread_s"] = p["pread_s"]
        out["prefill_reads_in_flight"] = p["pread_s"] / p["prefill_read_s"] if p["prefill_read_s"] else 0.0
        # where the prefill's time went, besides its reads: the routing's host sync (which waits for
        # everything before the MoE input: embedding, attention), fetching (waits for the reads,
        # stacking each group), the groups' matmuls; the staging arrays it made
        for k in ("route_sync_s", "expert_fetch_s", "expert_compute_s", "staging_allocations"):
            out[f"prefill_{k}"] = p[k]
        out["staging_allocations"] = s["staging_allocations"] - p["staging_allocations"]  # decode only
        out.update(prefill_disk_idle(spans, start, times[0]))
        for k in ("bytes_read", "reads", "io_wait_s", "moe_calls", "route_sync_s", "attention_s", "expert_fetch_s", "expert_compute_s",
                  "cache_hits", "cache_misses", "check_s", "check_tail_s", "pread_s"):
            out[k] = s[k] - p[k]  # decode only
        out["reads_in_flight"] = reads_in_flight(out)
        lookups = out["cache_hits"] + out["cache_misses"]
        out["hit_rate"] = out["cache_hits"] / lookups if lookups else 0.0
        out["mean_read_bytes"] = out["bytes_read"] / out["reads"] if out["reads"] else 0.0
        out["decode_tokens"] = len(times) - 1
        if read_alone and routed and getattr(rt.store, "bundle", None) is not None:
            out.update(prefill_read_alone(rt, routed, out["ttft_s"]))
        out.update({k: s[k] for k in ("expert_cache_peak_bytes", "cache_capacity_bytes", "io_mode")})
    return out


def prefill_disk_idle(spans: list[tuple[int, float, float]], start: float, first_token: float) -> dict:
    """Where the disk sat idle between a prompt's start and its first token, from the prefill's reads
    ((layer, start, end); a group's read may start before the one before it ends): before the first
    read (embedding, the first layer's attention and routing), between reads of one layer (a group's wait, stacking, its next read's
    start), between layers (a layer's last group's matmuls, the next layer's attention and routing),
    after the last read (what follows the last MoE layer, the first token's own step). With the
    time the reads kept the disk busy (the union of their spans), these add up to the TTFT."""
    spans = sorted(spans, key=lambda s: s[1])
    keys = ("before", "within_layers", "between_layers", "after")
    idle = dict.fromkeys(keys, 0.0)
    if not spans:
        idle["before"] = first_token - start
    else:
        idle["before"] = spans[0][1] - start
        (layer, _, end) = spans[0]
        for nxt, begin, finish in spans[1:]:
            idle["within_layers" if layer == nxt else "between_layers"] += max(0.0, begin - end)
            layer, end = nxt, max(end, finish)
        idle["after"] = first_token - end
    return {f"prefill_idle_{k}_s": v for k, v in idle.items()}


def prefill_read_alone(rt, routed: set, ttft_s: float) -> dict:
    """The prefill's distinct experts read once by a reader that does nothing else (the runtime's
    sub-read size, O_DIRECT), just after the prefill, in each way of sharing and ordering them
    among the threads (READ_PATTERNS: in layout order two ways, and shuffled), at the runtime's
    thread count and half it, the fastest counting: its floor measured on the disk as it is then,
    next to the run, where the ceiling cells are minutes away; and whether a reader with fewer
    threads, or another order, would read these very bytes faster."""
    bundle = rt.store.bundle
    extents = sorted((bundle.extent(*key) for key in routed), key=lambda e: (e.file, e.offset))
    ranges = [(bundle.path(e.file), e.offset, e.nbytes) for e in extents]
    n = rt.reader.threads
    reads = {f"{pattern}@{t}": read_extents(ranges, t, rt.reader.checked_read_bytes, pattern)
             for t in sorted({n, max(1, n // 2)}, reverse=True) for pattern in READ_PATTERNS}
    best = min(reads.values(), key=lambda r: r["seconds"])
    return {"prefill_read_alone_s": best["seconds"], "prefill_read_alone_gb_per_s": best["gb_per_s"],
            "prefill_read_alone_threads": best["threads"],
            "prefill_read_alone_by_pattern": {k: r["seconds"] for k, r in reads.items()},
            "ttft_over_read_alone": ttft_s / max(best["seconds"], 1e-12)}


def reads_in_flight(run: dict) -> float:
    """How many reads the reader's threads kept in flight, on average, while the model waited for
    them: the time inside the reads, summed over threads, over the time the model waited."""
    return run["pread_s"] / run["io_wait_s"] if run["io_wait_s"] else 0.0


def _disk_bytes(store, layer: int, expert: int) -> int:
    """The bytes an expert's read takes from disk: its extent (a bundle), else its size in memory."""
    bundle = getattr(store, "bundle", None)
    return bundle.extent(layer, expert).nbytes if bundle is not None else store.nbytes(layer, expert)


def decode_streams(model, prompts: list[list[int]], gen_tokens: int) -> dict:
    """Several streams decoded together by mlx-lm's own BatchGenerator (as mlx_lm.server batches
    concurrent requests): aggregate and per-stream figures, the bytes missed per step, and how much
    the streams shared experts (distinct experts per layer and step over streams x top-k)."""
    from mlx_lm.generate import BatchGenerator

    rt = runtime_of(model)
    rt.reset_stats()
    n = len(prompts)
    gen = BatchGenerator(model, stop_tokens=[], prefill_batch_size=n, completion_batch_size=n)
    start = time.perf_counter()
    stamps: dict[int, list[float]] = {uid: [] for uid in gen.insert(prompts, [gen_tokens] * n)}
    after_first, steps = None, 0
    while responses := gen.next_generated():
        now = time.perf_counter()
        if after_first is None:
            after_first = rt.stats()  # prefill and every stream's first token: kept out of decode figures
        else:
            steps += 1
        for r in responses:
            stamps[r.uid].append(now)
    gen.close()
    s, p = rt.stats(), after_first
    firsts = [t[0] for t in stamps.values()]
    gaps = np.concatenate([np.diff(np.array(t)) for t in stamps.values()])
    decode_s = max(t[-1] for t in stamps.values()) - min(firsts)
    tokens = sum(len(t) - 1 for t in stamps.values())
    # where a step's time goes besides the reads: the routing's host syncs (which wait for all
    # before each MoE input), the fetch beyond the wait (hits, stacking), building the matmuls
    d = {k: s[k] - p[k] for k in ("bytes_read", "reads", "io_wait_s", "moe_calls", "cache_hits", "cache_misses",
                                  "staging_allocations", "pread_s", "route_sync_s", "expert_fetch_s",
                                  "expert_compute_s", "check_tail_s")}
    lookups = d["cache_hits"] + d["cache_misses"]
    aggregate = tokens / decode_s
    return {"streams": n, "ttft_s": max(firsts) - start, "decode_steps": steps, "decode_tokens": tokens,
            "aggregate_tokens_per_s": aggregate, "per_stream_tokens_per_s": aggregate / n,
            "p50_token_ms": float(np.percentile(gaps, 50) * 1e3), "p99_token_ms": float(np.percentile(gaps, 99) * 1e3),
            **d, "hit_rate": d["cache_hits"] / lookups if lookups else 0.0,
            "bytes_read_per_step": d["bytes_read"] / max(steps, 1),
            "distinct_experts_per_layer_step": lookups / max(d["moe_calls"], 1),
            "sharing": lookups / max(d["moe_calls"], 1) / (n * rt.experts_per_token), "reads_in_flight": reads_in_flight(d),
            "step_ms": step_phases(d, decode_s, steps)}


def step_phases(d: dict, decode_s: float, steps: int) -> dict:
    """A decode step's wall time, ms, split: waiting for reads, the routing's host syncs, the rest of
    the fetch (hits, stacking), building the expert matmuls, and the rest (outside the MoE layers:
    embedding, lm head, sampling, the batch generator's own work)."""
    per = 1e3 / max(steps, 1)
    parts = {"io_wait": d["io_wait_s"] * per, "route_sync": d["route_sync_s"] * per,
             "fetch_beyond_wait": max(d["expert_fetch_s"] - d["io_wait_s"], 0.0) * per,
             "expert_compute": d["expert_compute_s"] * per}
    return {"step": decode_s * per, **parts, "rest": decode_s * per - sum(parts.values())}


def _derive_streams(run: dict, ceiling_gbs: float, one_stream: dict) -> None:
    """The batch roofline (the ceiling over the bytes missed per step, times the streams), the share
    of it reached, and the aggregate over one stream's run of the same kind (cold or warm: a warm
    one may hit every expert)."""
    run["batch_roofline_tokens_per_s"] = ceiling_gbs * 1e9 / max(run["bytes_read_per_step"], 1) * run["streams"]
    run["share_of_batch_roofline"] = run["aggregate_tokens_per_s"] / run["batch_roofline_tokens_per_s"]
    run["aggregate_over_one_stream"] = run["aggregate_tokens_per_s"] / one_stream["tokens_per_s"]


def naive_run(bundle_path: Path, prompt: list[int], gen_tokens: int, budget: int) -> dict:
    """The "LLM in a flash" baseline: every routed expert's tensors read one by one with plain
    buffered reads, no cache to speak of (one layer's experts), no coalescing, no threads."""
    loaded = load(bundle_path, memory_budget=budget)
    model, rt = loaded.model, runtime_of(loaded.model)
    rt.streamer.sizes = None  # the cache stays at one layer's experts, whatever runs
    rt.cache.capacity_bytes = rt.plan.min_layer_bytes
    store, counters = rt.store, {"bytes": 0, "reads": 0}

    def naive_read(layer, experts):
        out = {}
        for e in experts:
            x = store.bundle.extent(layer, e)
            parts = bytearray(x.raw_nbytes)
            with open(store.bundle.path(x.file), "rb") as f:
                for t in x.tensors:  # one read per tensor
                    f.seek(x.offset + t.offset)
                    parts[t.offset : t.offset + t.nbytes] = f.read(t.nbytes)
                    counters["bytes"] += t.nbytes
                    counters["reads"] += 1
            out[e] = cast_floats(unpack_extent(bytes(parts), x.tensors), store.dtype)
        return out

    store.read = naive_read
    with loaded:
        out = decode(model, prompt, gen_tokens)
    out["bytes_read"], out["reads"] = counters["bytes"], counters["reads"]
    return out


def expert_quantization(bundle) -> dict | None:
    """The bundle's expert quantization as nn.quantize's arguments (None: experts unquantized).

    A reference model is quantized the same way, so the comparison is of streaming, not of bits; a
    bundle whose experts mix bits (a measured plan) has no such single reference and is refused."""
    seen = {(t.bits, t.group_size, t.mode or "affine")
            for e in bundle.extents.values() for t in e.tensors if t.bits is not None}
    if not seen:
        return None
    if len(seen) > 1:
        raise OptionsError(f"{bundle.root}: experts are quantized {len(seen)} ways "
                           f"({sorted(seen, key=str)}); an in-memory reference needs one")
    bits, group_size, mode = seen.pop()
    return {"bits": bits, "group_size": group_size, "mode": mode}


def reference_model(src: Path, quantization: dict | None):
    """mlx-lm, the same checkpoint fully in memory, experts quantized like the bundle (source dtype)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.utils import load_model

    model, _ = load_model(src)
    if quantization is not None:
        nn.quantize(model, **quantization, class_predicate=lambda p, m: isinstance(m, SwitchLinear))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _derive(run: dict, ceiling_gbs: float, n_moe: int, full_layers: int, prefill_gbs: float) -> None:
    # TTFT against reading every distinct expert of the prefill once at the disk's ceiling for it
    # (prefill_gbs: reads in sequence count too): what no prefill that reads them can beat (a warm
    # run reads fewer: its floor is still this one)
    run["prefill_read_floor_s"] = run["prefill_expert_bytes"] / (prefill_gbs * 1e9)
    run["ttft_over_floor"] = run["ttft_s"] / max(run["prefill_read_floor_s"], 1e-12)
    if "first_token_known_s" in run:  # were the first token handed out when known
        run["first_token_known_over_floor"] = run["first_token_known_s"] / max(run["prefill_read_floor_s"], 1e-12)
    if "ceiling_before_gb_per_s" in run:  # the same floor at the ceiling windows just before the run
        run["prefill_read_floor_before_s"] = run["prefill_expert_bytes"] / (run["ceiling_before_gb_per_s"] * 1e9)
        run["ttft_over_floor_before"] = run["ttft_s"] / max(run["prefill_read_floor_before_s"], 1e-12)
    run["bytes_read_per_token"] = run["bytes_read"] / max(run["decode_tokens"], 1)
    run["read_gb_per_s_during_io"] = run["bytes_read"] / max(run["io_wait_s"], 1e-9) / 1e9
    run["io_efficiency"] = run["read_gb_per_s_during_io"] / ceiling_gbs
    run["roofline_tokens_per_s"] = ceiling_gbs * 1e9 / max(run["bytes_read_per_token"], 1)
    run["share_of_roofline"] = run["tokens_per_s"] / run["roofline_tokens_per_s"]
    calls = max(run["moe_calls"], 1)
    if run.get("attention_s"):  # a run with split_phases: attention and routing timed apart
        run["per_layer_ms"] = {
            "attention (all before the MoE input)": run["attention_s"] / calls * 1e3,
            "routing (router, top-k, host sync)": run["route_sync_s"] / calls * 1e3,
        }
    else:
        run["per_layer_ms"] = {"route_sync (attention + router, host sync)": run["route_sync_s"] / calls * 1e3}
    run["per_layer_ms"].update({
        "expert fetch: cache, I/O wait, copy to device": run["expert_fetch_s"] / calls * 1e3,
        "expert compute": run["expert_compute_s"] / calls * 1e3,
    })
    if run.get("check_s"):  # parts of the fetch: the per-read checksums
        run["checksum_ms"] = {"summed over I/O threads": run["check_s"] / calls * 1e3,
                              "after the layer's last read (adds to the fetch)": run["check_tail_s"] / calls * 1e3}
    per_token_ms = 1e3 / max(run["tokens_per_s"], 1e-9)
    run["per_token_ms"] = {"total": per_token_ms,
                           "outside MoE layers (embed, lm head, sampling)":
                               per_token_ms - sum(run["per_layer_ms"].values()) * calls / max(run["decode_tokens"], 1)}
    run["scaled"] = {
        "layers_measured": n_moe, "layers_scaled_to": full_layers,
        "tokens_per_s_scaled": run["tokens_per_s"] * n_moe / full_layers,
        "note": "SCALED, not measured: per-token time x full_layers / layers_measured",
    }


# --compare NAME -> what that run changes in load's options, and in its IOOptions (each runs cold,
# then warm)
VARIANTS = {
    "default": {},  # the first run's settings again: with repeats, an A/B interleaved against the disk's drift
    # the OS page cache instead of ours: the expert cache keeps only the one layer it needs to run,
    # and the page cache gets the memory that --page-cache says (see memhold.py, PAGE_CACHE_MEMORY)
    "buffered": {"io": {"mode": "buffered"}, "_page_cache_race": True},
    "prefetch": {"prefetch": True},
    "host": {"io": {"read_into": "host", "stage_on_device": False}},  # host buffers, then mx.array copies
    "stage": {"io": {"stage_on_device": True}},
    "nostage": {"io": {"stage_on_device": False}},
    "nocheck": {"io": {"check_reads": False}},  # no per-read checksum: what checking every read costs
    # the expert cache keeps the plan's cache_bytes while decoding too, instead of borrowing the room
    # the budget keeps for a prefill chunk (streaming.py: ExpertStreamer.lend_prefill_room)
    "fixedcache": {"_streamer": {"lend_prefill_room": False}},
}


# How much memory the page cache gets in a "buffered" run: "equal", the same total as the budget
# (everything the budget gives beyond the least budget: the expert cache and the room for long
# prefill chunks, which a decode leaves unused); "cache", only what the budget gives the expert
# cache (the same bytes for the two caches); "all", every free byte of the machine.
PAGE_CACHE_MEMORY = ("equal", "cache", "all")


def _variant(name: str) -> dict | None:
    """A --compare entry's load() options and settings; entries joined by "+" are applied together
    ("readfirst+subread:8"); None for an unknown entry."""
    if "+" in name:
        parts = [_variant(part) for part in name.split("+")]
        return None if None in parts else _merged(parts)
    if name.startswith("buffered:"):  # buffered:equal|cache|all: the page cache on that much memory
        memory = name.split(":", 1)[1]
        return {"io": {"mode": "buffered"}, "_page_cache_race": memory} if memory in PAGE_CACHE_MEMORY else None
    if name.startswith("policy:"):
        return {"cache_policy": name.split(":", 1)[1]}
    if name.startswith("admission:"):  # what the prefill caches of what it reads (streaming.PREFILL_ADMISSION)
        rule = name.split(":", 1)[1]
        return {"_streamer": {"prefill_admission": rule}} if rule in PREFILL_ADMISSION else None
    if name.startswith("subread:"):  # a checked extent read in sub-reads of N MiB (default 1)
        mib = _number(name, float)
        return None if mib is None else {"_reader": {"checked_read_bytes": int(mib * (1 << 20))}}
    if name in ("readfirst", "noreadfirst"):  # a long prefill call's first group read before its routing is known, or not
        return {"_streamer": {"prefill_speculate": name == "readfirst"}}
    if name.startswith("readsahead:"):  # prefill group reads in flight at once (1: one at a time)
        n = _number(name)
        return None if n is None else {"_streamer": {"prefill_reads_ahead": n}}
    if name == "plainprefill":  # a prefill as the decode runs it: read every group, then compute it, all cached
        return {"_streamer": {"prefill_pipeline": False}}
    if name == "noadvice":  # staging without cudaMemAdvise (see runtime/io/staging.py)
        return {"io": {"stage_on_device": True}, "_no_cuda_advice": True}
    if name.startswith("order:"):  # how a read call's bytes are shared among the threads (reader.READ_ORDERS)
        order = name.split(":", 1)[1]
        return {"io": {"read_order": order}} if order in READ_ORDERS else None
    if name.startswith("depth:"):  # at most N reads in the disk at once, whatever the threads
        n = _number(name)
        return None if n is None else {"io": {"queue_depth": n}}
    if name.startswith("threads:"):
        n = _number(name)
        return None if n is None else {"io": {"threads": n}}
    return VARIANTS.get(name)


def _number(name: str, kind=int):
    """The number after a --compare entry's colon ("depth:4" -> 4); None where it is none, which
    makes the entry unknown (named in the bench's error, not a traceback)."""
    try:
        return kind(name.split(":", 1)[1])
    except ValueError:
        return None


def _merged(variants: list[dict]) -> dict:
    """The variants' options together; a nested part ("io", "_streamer", "_reader") merged key by key."""
    out: dict = {}
    for variant in variants:
        for key, value in variant.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = {**out[key], **value} if both else value
    return out


def _options(base: dict, variant: dict) -> dict:
    """load() keyword arguments: `base` with `variant` applied (its "io" fields into IOOptions)."""
    options = _merged([base, variant])
    return {**options, "io": IOOptions(**options.get("io", {}))}


def _settings(model) -> dict:
    """What the runtime ran with: the tuned knobs, recorded in every report."""
    rt = runtime_of(model)
    r = rt.reader
    return {"io_mode": r.io_mode_in_use, "io_threads": r.threads, "split_min_bytes": r.split_min_bytes,
            "checked_read_bytes": r.checked_read_bytes, "read_order": r.read_order, "queue_depth": r.queue_depth,
            "coalesce_gap": r.coalesce_gap, "read_into": getattr(rt.store, "read_into", "host"),
            "stage_on_device": getattr(rt.store, "stage_on_device", False), "cache_policy": type(rt.cache.policy).__name__,
            "prefetch": rt.streamer.prefetching, "dtype": rt.dtype,
            "prefill_pipeline": rt.streamer.prefill_pipeline, "prefill_admission": rt.streamer.prefill_admission,
            "prefill_reads_ahead": rt.streamer.prefill_reads_ahead, "prefill_speculate": rt.streamer.prefill_speculate,
            "prefill_room_bytes": rt.streamer.prefill_room,
            "lend_prefill_room": rt.streamer.lend_prefill_room,
            "staging_slots_advised": getattr(getattr(rt.store, "staging", None), "advised", 0),
            "cuda_advice": _advice_state()}


def _advice_state() -> str:
    advice = staging._advice
    if advice is None:
        return "not asked"
    return f"available (CUDA runtime {advice.version})" if advice.available else f"unavailable: {advice.why}"


def _page_cache_memory(race: bool, page_cache: str, target: int):
    """For a page-cache race with page_cache "equal" or "cache": memory held so that `target` bytes
    stay available; otherwise nothing held."""
    if race and page_cache != "all":
        return leave_available(target)
    return nullcontext(Held(why_not="not asked (page_cache='all')" if race else "not a page-cache run"))


def _page_cache_target(page_cache: str, plan) -> int:
    return plan.cache_bytes if page_cache == "cache" else plan.budget_bytes - plan.minimum_bytes


def bench_bundle(bundle_path, budget_fraction: float = 0.25, prompt_tokens: int = 16, gen_tokens: int = 24,
                 io: dict | None = None, compare: tuple[str, ...] = (), reference_checkpoint=None,
                 full_layers: int | None = None, page_cache: str = "equal", streams: int = 1,
                 ceiling_seconds: float = 3.0) -> dict:
    """io: IOOptions fields for every run (e.g. {"mode": "buffered", "threads": 4}).
    page_cache: for the "buffered" comparison, how much memory the OS page cache gets (the rest of
    the machine's is held): "equal", the same total as the budget; "cache", what the budget gives
    the expert cache; "all", every free byte (PAGE_CACHE_MEMORY; "buffered:MODE" picks per run).
    streams: also decode this many streams at once (mlx-lm's batching), cold then warm, with the
    first run's settings and each --compare entry's (streams_summary sums them up by entry).
    ceiling_seconds: how long each cell of the disk's read ceiling reads, in four windows."""
    if page_cache not in PAGE_CACHE_MEMORY:
        raise OptionsError(f"page_cache must be one of {PAGE_CACHE_MEMORY}, got {page_cache!r}")
    unknown = [c for c in compare if c != "naive" and _variant(c) is None]
    if unknown:
        raise OptionsError(f"unknown --compare entries {unknown}; known: naive, {', '.join(VARIANTS)}, policy:NAME, "
                           f"threads:N, buffered:{'|'.join(PAGE_CACHE_MEMORY)}, plainprefill, readsahead:N, readfirst, noreadfirst, subread:MIB, order:{'|'.join(READ_ORDERS)}, depth:N, admission:{'|'.join(PREFILL_ADMISSION)}; + joins entries")
    bundle_path = Path(bundle_path)
    bundle = open_bundle(bundle_path)
    extents = list(bundle.extents.values())
    files = sorted({bundle.path(e.file) for e in extents})
    n_moe = len(bundle.layers)
    base = {"io": dict(io or {})}
    IOOptions(**base["io"])  # bad options fail here, before anything runs
    report = {"platform": {"machine": platform.platform(), "python": sys.version.split()[0], "mlx": mx.__version__,
                           "device": str(mx.default_device())},
              "args": {"bundle": str(bundle_path), "budget_fraction": budget_fraction, "prompt_tokens": prompt_tokens,
                       "gen_tokens": gen_tokens, "sampling": "greedy", **base},
              "bundle": describe_bundle(bundle_path)}

    plan = plan_memory(bundle_path, expert_cache_share=budget_fraction)
    budget = plan.budget_bytes
    report["budget"] = {"budget_bytes": budget, "expert_cache_bytes": plan.cache_bytes,
                        "decode_cache_bytes": plan.decode_cache_bytes,
                        "expert_bytes_in_memory": plan.expert_bytes, "resident_bytes": plan.resident_bytes}

    rng = np.random.default_rng(0)
    vocab = bundle.config.get("text_config", bundle.config)["vocab_size"]
    prompt = rng.integers(0, min(vocab, 50_000), size=prompt_tokens).tolist()
    stream_prompts = [rng.integers(0, min(vocab, 50_000), size=prompt_tokens).tolist()
                      for _ in range(streams)] if streams > 1 else []

    # warm-up on a throwaway model: kernel compilation is not what "cold" measures
    with load(bundle_path, memory_budget=budget, **_options(base, {})) as (model, _):
        _, report["warmup_s"] = _timed(decode, model, prompt, 4)

    extent_size = int(np.mean([e.nbytes for e in extents]))

    def cold_and_warm(name: str, variant_name: str = "default", phases: bool = False, **variant) -> None:
        if variant.pop("_no_cuda_advice", False):
            os.environ["MOESTREAM_CUDA_ADVICE"] = "0"
        race = variant.pop("_page_cache_race", False)
        memory = race if isinstance(race, str) else page_cache
        streamer_settings = variant.pop("_streamer", {})
        reader_settings = variant.pop("_reader", {})
        staging._advice = None  # decided anew from the environment
        try:
            loaded = load(bundle_path, memory_budget=plan.minimum_bytes if race else budget, **_options(base, variant))
        finally:
            os.environ.pop("MOESTREAM_CUDA_ADVICE", None)
        target = _page_cache_target(memory, plan)
        with loaded as (model, _), _page_cache_memory(bool(race), memory, target) as held:
            rt = runtime_of(model)
            for part, settings in ((rt.streamer, streamer_settings), (rt.reader, reader_settings)):
                for key, value in settings.items():
                    setattr(part, key, value)
            # the disk just before the cold run: a window each of random reads at the runtime's
            # thread count and half it and of reads in sequence at its count, the best of the
            # three (a window, so a burst of its moment), where the run's ceiling cells may be
            # minutes away, on a disk whose rate drifts by tens of percent
            n = rt.reader.threads
            before = max([read_ceiling(files, extent_size, t, seconds=ceiling_seconds / 3) for t in sorted({max(1, n // 2), n})]
                         + [read_ceiling(files, rt.reader.checked_read_bytes, n, seconds=ceiling_seconds / 3, sequential=True)],
                         key=lambda t: t["gb_per_s"])
            evict_page_cache(files)
            report[f"{name}cold"] = cold = decode(model, prompt, gen_tokens, read_alone=True)
            cold["variant"] = variant_name
            cold["ceiling_before_gb_per_s"] = before["gb_per_s"]
            report[f"{name}warm"] = decode(model, prompt, gen_tokens)
            report[f"{name}settings"] = _settings(model)
            if race:
                report[f"{name}settings"]["page_cache"] = {"memory": memory, "target_bytes": target,
                                                            **held.as_dict()}
            if phases:
                # one more warm pass, with attention and routing timed apart: apart from the figures
                # above, because the extra host sync per layer that separates them is not part of
                # the runtime's own decode
                rt.streamer.split_phases = True
                report["phases"] = decode(model, prompt, gen_tokens)
                rt.streamer.split_phases = False
            if stream_prompts:  # the same settings decoding several streams at once, from cold again
                rt.streamer.forget()
                evict_page_cache(files)
                for run in ("cold", "warm"):
                    report[f"{name}streams_{run}"] = decode_streams(model, stream_prompts, gen_tokens)
                    report[f"{name}streams_{run}"]["variant"] = variant_name
            if variant.get("prefetch"):
                s = rt.stats()
                report["prefetch_stats"] = {k: s[k] for k in ("prefetch_issued", "prefetch_used", "prefetch_wasted")}

    cold_and_warm("", phases=True)
    # The ceiling: the disk's sustained rate, for reads of the bundle's extent size and of the size
    # the runtime actually issued (it splits a batch across its threads), at the runtime's thread
    # count, half and twice it, random (a decode's misses) and, at its count and half it, in
    # sequence in its sub-reads (a long prefill reads nearly every expert of a layer in layout
    # order). Each cell reads in four windows, the cells taking turns; the best cell's rate is the
    # ceiling (ceilings: chosen on half its windows, measured on the other half). Not the best
    # single window: the disks here move by tens of percent from one second to the next, so the
    # best of N windows is a burst that grows with N, which no run lasting many windows holds.
    threads = report["settings"]["io_threads"]
    sizes = sorted({-(-size // ALIGN) * ALIGN  # as read_ceiling reads them: two sizes may round to one
                    for size in (extent_size, int(report["cold"]["mean_read_bytes"]) or extent_size)})
    cells = [(size, t, False) for t in sorted({max(1, threads // 2), threads, threads * 2}) for size in sizes]
    cells += [(report["settings"]["checked_read_bytes"], t, True) for t in sorted({max(1, threads // 2), threads})]
    report["ceiling_cells"] = read_ceiling_rounds(files, cells, rounds=4, seconds=ceiling_seconds / 4)
    report.update(ceilings(report["ceiling_cells"]))
    full = full_layers or n_moe
    for name in ("cold", "warm", "phases"):
        _derive(report[name], report["ceiling"]["gb_per_s"], n_moe, full, report["prefill_ceiling"]["gb_per_s"])
    for run in ("cold", "warm"):
        if f"streams_{run}" in report:
            _derive_streams(report[f"streams_{run}"], report["ceiling"]["gb_per_s"], report[run])

    if "naive" in compare:
        report["naive"] = naive_run(bundle_path, prompt, gen_tokens, budget)
        n = report["naive"]
        n["bytes_read_per_token"] = n["bytes_read"] / max(n["decode_tokens"], 1)
    seen: dict[str, int] = {}
    for c in compare:
        if c == "naive":
            continue
        seen[c] = seen.get(c, 0) + 1
        name = run_name(c, seen[c])
        cold_and_warm(name, c, **_variant(c))
        for run in ("cold", "warm"):
            _derive(report[name + run], report["ceiling"]["gb_per_s"], n_moe, full, report["prefill_ceiling"]["gb_per_s"])
            if f"{name}streams_{run}" in report:
                _derive_streams(report[f"{name}streams_{run}"], report["ceiling"]["gb_per_s"], report[name + run])
    report["prefill_summary"] = prefill_summary(report)
    if streams > 1:
        report["streams_summary"] = streams_summary(report)
    if reference_checkpoint is not None:
        ref = reference_model(Path(reference_checkpoint), expert_quantization(bundle))
        report["mlx_lm_in_memory"] = decode(ref, prompt, gen_tokens)
        del ref
    return report


def run_name(compare: str, nth: int) -> str:
    """The prefix of a --compare entry's runs in the report (NAME_cold, NAME_warm): "threads:4" ->
    "threads_4_"; its second run "threads_4-2_" (a bare count would read as "threads_42"), a name
    ending in a letter "default2_"."""
    base = compare.replace(":", "_")
    if nth == 1:
        return base + "_"
    return f"{base}{'-' if base[-1].isdigit() else ''}{nth}_"


