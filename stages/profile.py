"""Profile a model's routing: run calibration text through the original-precision model and record,
per token and MoE layer, the experts the router picked and their weights; then aggregate.

The model runs with moestream's own runtime on the source checkpoint (`CheckpointStore`: experts read
from the source safetensors at source precision, inside the memory budget), so profiling a model
larger than memory works the way inference does. Calibration text: the shipped `calibration/` set
(Python standard library docstrings and code, PSF License) by default, a text file or folder of
`*.txt`, or a Hugging Face dataset name (needs `datasets`).

Outputs (in `out`, Parquet with zstd):
- trace.parquet        one row per (seq, token, layer): experts, weights (runtime/trace.py)
- frequency.parquet    layer, expert, count, share (of tokens), mass (sum of router weights)
- coactivation.parquet layer, expert_a < expert_b, count: tokens routed to both (nonzero pairs)
- reuse.parquet        layer, pairs (tokens with a previous token), reuse (mean share of a token's
                       experts also routed for the previous token), reuse_if_independent
- transitions.parquet  layer, next_layer, expert, next_expert, count (same token, consecutive MoE layers)
- summary.json         the summary dict (for bundle.json and the model card)
- frequency.png, coactivation.png, transitions.png, reuse.png (when matplotlib is installed)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..common.errors import MoestreamError
from ..common.files import write_json_atomic
from ..manifests.profile import (
    SUMMARY_FILE,
    TRACE_FILE,
    Aggregates,
    read_trace,
    trace_arrays,
    write_aggregates,
    write_trace,
)

DEFAULT_MAX_TOKENS = 16384
DEFAULT_SEQ_LEN = 512
HOT_FRACTION = 0.10


class CalibrationError(MoestreamError, ValueError):
    pass


# ----------------------------------------------------------------------------- calibration text


def default_calibration_dir() -> Path:
    """The shipped calibration set: `calibration/` at the repository root (editable install), or
    the `moestream.calibration` package data when installed from a wheel."""
    try:
        from importlib.resources import files

        pkg = Path(str(files("moestream.calibration")))
        if pkg.is_dir() and any(pkg.glob("*.txt")):
            return pkg
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "calibration"


def load_calibration(calibration: str | Path | None = None, *, max_chars: int | None = None) -> list[str]:
    """Documents (strings) of calibration text.

    None: the shipped set; a file: one document; a folder: every `*.txt` in it (sorted); a string that
    is not an existing path: a Hugging Face dataset, "name", "name:config" or "name:config:split"
    (its "text" column; needs the `datasets` package and network or a local HF cache)."""
    if calibration is None:
        calibration = default_calibration_dir()
        if not calibration.is_dir():
            raise CalibrationError(f"the shipped calibration set is missing ({calibration})")
    path = Path(calibration)
    if path.is_file():
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    elif path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CalibrationError(f"{path}: no *.txt files to calibrate with")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        docs = _hub_dataset(str(calibration), max_chars)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"{calibration}: the calibration text is empty")
    return docs


def _hub_dataset(name: str, max_chars: int | None) -> list[str]:
    if "/" not in name and ":" not in name and ("." in name or "\\" in name):
        raise CalibrationError(f"calibration {name!r}: no such file or folder")
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"calibration {name!r} is not a file or folder, and reading a Hugging Face dataset needs the "
            f"`datasets` package (pip install datasets); or pass a text file"
        ) from None
    ds_name, config, split = (name.split(":") + [None, None])[:3]
    ds = datasets.load_dataset(ds_name, config, split=split or "train", streaming=True)
    docs, size, limit = [], 0, max_chars or 4_000_000
    for row in ds:
        text = row.get("text") if isinstance(row, dict) else None
        if text is None:
            raise CalibrationError(f"dataset {name!r} has no 'text' column (columns: {list(row)})")
        docs.append(text)
        size += len(text)
        if size >= limit:
            break
    return docs


def _encode_piece(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def _encode(tokenizer, text: str, piece_chars: int = 16384) -> list[int]:
    """Encode in pieces cut at paragraph breaks (tokenizers warn about, and some truncate, inputs
    longer than the model's context)."""
    ids, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= piece_chars else text.rfind("\n\n", start + 1, start + piece_chars)
        if end <= start:
            end = start + piece_chars
        ids += _encode_piece(tokenizer, text[start:end])
        start = end
    return ids


def calibration_sequences(tokenizer, docs: list[str], seq_len: int = DEFAULT_SEQ_LEN,
                          max_tokens: int = DEFAULT_MAX_TOKENS) -> list[list[int]]:
    """Token windows of seq_len (the last window of a document may be shorter, but not below
    seq_len/4), taken round-robin across documents so a token limit samples every document."""
    if seq_len < 1 or max_tokens < 1:
        raise ValueError("seq_len and max_tokens must be >= 1")
    windows = []
    for doc in docs:
        ids = _encode(tokenizer, doc[: max_tokens * 16])
        w = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
        windows.append([x for x in w if len(x) >= max(1, min(seq_len // 4, len(ids)))])
    out, total, i = [], 0, 0
    while total < max_tokens and any(i < len(w) for w in windows):
        for w in windows:
            if i < len(w) and total < max_tokens:
                s = w[i][: max_tokens - total]
                out.append(s)
                total += len(s)
        i += 1
    return out


# ----------------------------------------------------------------------------- aggregates


def aggregate(trace, num_experts: int | None = None) -> Aggregates:
    """Aggregates of a trace (table, path or TraceArrays)."""
    t = trace_arrays(trace)
    E = int(num_experts or t.num_experts)
    k = t.k
    layers = sorted(set(t.layers) | set(np.unique(t.layer).tolist()))
    L = len(layers)
    keys = t.token_keys()
    freq = np.zeros((L, E), np.int64)
    mass = np.zeros((L, E), np.float64) if t.weights is not None else None
    coact = np.zeros((L, E, E), np.int32)
    tokens = np.zeros(L, np.int64)
    reuse_pairs = np.zeros(L, np.int64)
    reuse_sum = np.zeros(L, np.float64)
    trans = np.zeros((max(L - 1, 0), E, E), np.int32)
    iu, ju = np.triu_indices(k, 1)
    per_layer = []
    for i, layer in enumerate(layers):
        rows = np.flatnonzero(t.layer == layer)
        ex = t.experts[rows]
        per_layer.append((keys[rows], ex))
        tokens[i] = len(rows)
        freq[i] = np.bincount(ex.reshape(-1), minlength=E)[:E]
        if mass is not None:
            ok = t.weights_valid[rows]
            mass[i] = np.bincount(ex[ok].reshape(-1), weights=t.weights[rows][ok].reshape(-1), minlength=E)[:E]
        a, b = ex[:, iu].reshape(-1), ex[:, ju].reshape(-1)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        c = np.bincount(lo * E + hi, minlength=E * E)[: E * E].reshape(E, E)
        c = c + c.T
        c[np.diag_indices(E)] = freq[i]
        coact[i] = c
        # next-token reuse: consecutive rows of one sequence (rows are sorted by (seq, token))
        s, tok = t.seq[rows], t.token[rows]
        nxt = (s[1:] == s[:-1]) & (tok[1:] == tok[:-1] + 1)
        if nxt.any():
            prev, cur = ex[:-1][nxt], ex[1:][nxt]
            shared = (cur[:, :, None] == prev[:, None, :]).any(axis=2).sum(axis=1)
            reuse_pairs[i] = int(nxt.sum())
            reuse_sum[i] = float((shared / k).sum())
    for i in range(L - 1):
        (ka, ea), (kb, eb) = per_layer[i], per_layer[i + 1]
        _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
        a, b = ea[ia], eb[ib]
        idx = (a[:, :, None] * E + b[:, None, :]).reshape(-1)
        trans[i] = np.bincount(idx, minlength=E * E)[: E * E].reshape(E, E)
    sequences = len(np.unique(t.seq)) if len(t) else 0
    return Aggregates(layers, E, k, tokens, freq, mass, coact, reuse_pairs, reuse_sum, trans, sequences)


def summarize(agg: Aggregates, hot_fraction: float = HOT_FRACTION) -> dict:
    """The headline figures, for bundle.json and the model card."""
    E, L = agg.num_experts, len(agg.layers)
    n_hot = max(1, math.ceil(hot_fraction * E))

    def top_share(x: np.ndarray) -> float:
        tot = x.sum(axis=1)
        top = -np.sort(-x, axis=1)[:, :n_hot].sum(axis=1)
        return float(np.mean(np.divide(top, tot, out=np.zeros(L), where=tot > 0)))

    p = agg.frequency / np.maximum(agg.frequency.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1) / math.log(E) if E > 1 else np.zeros(L)
    pairs = agg.reuse_pairs.sum()
    return {
        "tokens": int(agg.tokens.max()) if L else 0,
        "sequences": int(agg.sequences),
        "moe_layers": L,
        "num_experts": E,
        "experts_per_token": agg.k,
        "weights": "router" if agg.mass is not None else "unavailable",
        "hot_fraction": hot_fraction,
        "hot_mass_share": top_share(agg.mass if agg.mass is not None else agg.frequency),
        "hot_count_share": top_share(agg.frequency.astype(np.float64)),
        "next_token_reuse": float(agg.reuse_sum.sum() / pairs) if pairs else 0.0,
        "next_token_reuse_if_independent": float(np.mean(agg.reuse_if_independent())) if L else 0.0,
        "frequency_entropy_ratio": float(np.mean(ent)) if L else 0.0,
        "max_expert_share": float(agg.share.max()) if L else 0.0,
        "unused_experts": int((agg.frequency == 0).sum()),
    }


# ----------------------------------------------------------------------------- Parquet in and out


# ----------------------------------------------------------------------------- plots


def plot_profile(agg: Aggregates, out: Path) -> list[Path]:
    """PNG heatmaps; [] when matplotlib is not installed (it is in the `prepare` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    L, E = len(agg.layers), agg.num_experts
    figs = []
    if L == 0:
        return figs

    fig, ax = plt.subplots(figsize=(min(16, 3 + E / 16), min(10, 1.5 + L / 4)))
    im = ax.imshow(agg.share, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer (index)", title="Share of tokens routed to each expert")
    if L <= 64:
        ax.set_yticks(range(L), [str(x) for x in agg.layers])
    fig.colorbar(im, ax=ax)
    figs.append(_save(fig, out / "frequency.png", plt))

    picks = sorted({0, L // 3, (2 * L) // 3, L - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 4), squeeze=False)
    for ax, i in zip(axes[0], picks, strict=True):
        c = agg.coactivation[i].astype(np.float64) / max(int(agg.tokens[i]), 1)
        np.fill_diagonal(c, 0)
        im = ax.imshow(c, interpolation="nearest", cmap="magma")
        ax.set(title=f"layer {agg.layers[i]}", xlabel="expert", ylabel="expert")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Within-token co-activation (share of tokens routed to both)")
    figs.append(_save(fig, out / "coactivation.png", plt))

    if L > 1:
        picks = sorted({0, (L - 1) // 2, L - 2})
        fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 4), squeeze=False)
        for ax, i in zip(axes[0], picks, strict=True):
            tr = agg.transitions[i].astype(np.float64) / max(int(agg.tokens[i]), 1)
            im = ax.imshow(tr, interpolation="nearest", cmap="magma")
            ax.set(title=f"layer {agg.layers[i]} -> {agg.layers[i + 1]}", xlabel="expert (next layer)",
                   ylabel="expert")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("Layer-to-next-layer transitions (share of tokens)")
        figs.append(_save(fig, out / "transitions.png", plt))

    fig, ax = plt.subplots(figsize=(min(14, 3 + L / 3), 3.5))
    x = np.arange(L)
    ax.bar(x - 0.2, agg.reuse, 0.4, label="measured")
    ax.bar(x + 0.2, agg.reuse_if_independent(), 0.4, label="if tokens were independent")
    ax.set(xlabel="MoE layer", ylabel="share of experts reused", title="Next-token expert reuse")
    if L <= 64:
        ax.set_xticks(x, [str(v) for v in agg.layers])
    ax.legend()
    figs.append(_save(fig, out / "reuse.png", plt))
    return figs


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the stage


def auto_memory_budget(fraction: float = 0.5) -> int | None:
    """Half the machine's physical memory (None where it cannot be told): profiling a model larger
    than memory streams its experts through a bounded cache instead of holding them all."""
    try:
        return int(fraction * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class ProfileResult:
    out: Path
    trace: Path
    files: dict[str, Path]  # name -> Parquet path (trace, frequency, coactivation, reuse, transitions)
    figures: list[Path]
    summary: dict
    run: dict = field(default_factory=dict)  # how the calibration run went: tokens, seconds, I/O


def profile_model(
    source: str | Path,
    calibration: str | Path | None,
    out: str | Path,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    memory_budget: int | str | None = "auto",
    weights: bool = True,
    io_mode: str = "direct",
    dtype=None,
    plots: bool = True,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> ProfileResult:
    """Run calibration text through the source checkpoint's original-precision model (moestream's
    runtime, experts read from the source safetensors inside `memory_budget`; "auto": half the
    machine's memory) and write the trace, the aggregates, the plots and summary.json into `out`.

    calibration: None (the shipped set), a text file, a folder of *.txt, or a Hub dataset name.
    max_tokens: calibration tokens run, in windows of seq_len (each one prefill, no KV cache).
    weights: record router weights too (two extra gate evaluations per layer, no expert reads).
    progress(done_tokens, total_tokens) is called after each window.
    shard=(i, n): profile only sequences i, i+n, i+2n, ... (one of n parallel shards; merge_profiles
    joins them into exactly the trace of the whole run, sequences numbered as in the whole run)."""
    import mlx.core as mx

    from ..runtime.measure.trace import TraceRecorder
    from ..runtime.model.load import IOOptions, load, runtime_of

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_calibration(calibration, max_chars=max_tokens * 8)
    if memory_budget == "auto":
        memory_budget = auto_memory_budget()
    with load(source, memory_budget=memory_budget, dtype=dtype, io=IOOptions(mode=io_mode)) as (model, tokenizer):
        seqs = calibration_sequences(tokenizer, docs, seq_len, max_tokens)
        if not seqs:
            raise CalibrationError("the calibration text gave no tokens")
        if shard is not None:
            index, count = shard
            seqs = seqs[index::count]
        total = sum(len(s) for s in seqs)
        start = time.perf_counter()
        done = 0
        with TraceRecorder(model, weights=weights) as rec:
            for s in seqs:
                rec.next_sequence()
                mx.eval(model(mx.array([s])))
                done += len(s)
                if progress:
                    progress(done, total)
        seconds = time.perf_counter() - start
        s = runtime_of(model).stats()
    run = {"tokens": total, "sequences": len(seqs), "seq_len": seq_len, "seconds": seconds,
           "tokens_per_s": total / seconds if seconds else 0.0, "bytes_read": s["bytes_read"],
           "hit_rate": s["hit_rate"], "memory_budget": s["budget_bytes"]}
    return _write_profile(rec.table(), out, calibration, run, plots)


def _write_profile(table, out: Path, calibration, run: dict, plots: bool) -> ProfileResult:
    """The trace, its aggregates, summary.json and the plots, into `out`."""
    files = {"trace": write_trace(table, out / TRACE_FILE)}
    agg = aggregate(table)
    files.update(write_aggregates(agg, out))
    summary = summarize(agg)
    summary["calibration"] = str(calibration) if calibration is not None else "moestream calibration/ (PSF)"
    write_json_atomic(out / SUMMARY_FILE, {**summary, "run": run})
    figures = plot_profile(agg, out) if plots else []
    return ProfileResult(out, files["trace"], files, figures, summary, run)


def merge_profiles(shard_dirs: list[Path], out: str | Path, calibration=None, plots: bool = True) -> ProfileResult:
    """Join the traces of `profile_model(..., shard=(i, n))` runs (shard_dirs in order i = 0..n-1) into
    one profile: sequence j of shard i was sequence i + j*n of the whole run."""
    import pyarrow.compute as pc

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    count = len(shard_dirs)
    tables = []
    run = {"tokens": 0, "sequences": 0, "seconds": 0.0, "bytes_read": 0, "shards": count}
    for index, folder in enumerate(shard_dirs):
        t = read_trace(Path(folder) / TRACE_FILE)
        seq = pc.add(pc.multiply(t["seq"], pa.scalar(count, t["seq"].type)), pa.scalar(index, t["seq"].type))
        tables.append(t.set_column(t.schema.get_field_index("seq"), "seq", seq))
        shard_run = json.loads((Path(folder) / SUMMARY_FILE).read_text()).get("run", {})
        for key in ("tokens", "sequences", "seconds", "bytes_read"):
            run[key] += shard_run.get(key, 0)
    table = pa.concat_tables(tables).sort_by([("seq", "ascending"), ("token", "ascending"), ("layer", "ascending")])
    table = table.replace_schema_metadata(tables[0].schema.metadata)
    return _write_profile(table, out, calibration, run, plots)
