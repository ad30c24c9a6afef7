"""What every bench/ script shares: its inputs (a synth checkpoint and its bundle, made once in a work
folder), budgets (moestream.plan_memory), the disk's read ceiling over a bundle's expert files
(runtime.measure.ceiling), a plain-text table, JSON results (written atomically) and a setup line.

The scripts run from a clean clone as `python bench/NAME.py` (this folder is then first on
sys.path, so `import common` is this module), with moestream installed (`pip install -e '.[test]'`).
They print figures; they never assert them.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moestream.common.files import write_json_atomic


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    source: Path  # the synth checkpoint (Hub layout, bf16)
    bundle: Path
    made_s: dict = field(default_factory=dict)  # {"synth_s", "prepare_s"}: what this call made, and how long it took


def synth_path(work: str | Path, family: str, preset: str, layers: int | None = None) -> Path:
    return Path(work) / (f"{family}-{preset}" + (f"-{layers}l" if layers else ""))


def synth(work: str | Path, family: str = "qwen3_moe", preset: str = "small", layers: int | None = None) -> tuple[Path, float | None]:
    """A random-weight checkpoint of `family`/`preset` in `work` (made once): (folder, seconds or None)."""
    from moestream.stages.synth import synth_checkpoint

    src = synth_path(work, family, preset, layers)
    if (src / "config.json").is_file():
        return src, None
    print(f"synth {family} {preset} -> {src}", flush=True)
    _, seconds = timed(synth_checkpoint, family, src, preset=preset, layers=layers)
    return src, seconds


def prepare_bundle(source: Path, out: Path, **options) -> tuple[Path, float | None]:
    """A bundle of `source` (made once): moestream.prepare in this process (no Prefect) with these
    PrepareOptions fields (expert_bits, group_size, bits_plan, profile, ...). (folder, seconds or None)."""
    import moestream

    out = Path(out)
    if (out / "bundle.json").is_file():
        return out, None
    print(f"prepare {source} -> {out} {options or ''}", flush=True)
    result = moestream.prepare(source, out, engine="plain", overwrite=True, **options)
    return out, result.seconds


def make_inputs(work: str | Path, family: str = "qwen3_moe", preset: str = "small", layers: int | None = None,
                bits: int = 4, group_size: int = 64) -> Inputs:
    """The synth checkpoint and its bundle (`bits`-bit experts), made once in `work`. Once the bundle
    exists the checkpoint is not needed (nor made again if deleted): `source` may then be missing."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    src, synth_s = synth_path(work, family, preset, layers), None
    bundle = work / f"{src.name}-bundle-{bits}bit"
    if not (bundle / "bundle.json").is_file():
        src, synth_s = synth(work, family, preset, layers)
    bundle, prepare_s = prepare_bundle(src, bundle, expert_bits=bits, group_size=group_size)
    made = {k: v for k, v in (("synth_s", synth_s), ("prepare_s", prepare_s)) if v is not None}
    for k, v in made.items():
        print(f"{k[:-2]}: {v:.1f} s", flush=True)
    return Inputs(src, bundle, made)


def extent_file(path: str | Path, size: int) -> Path:
    """A file of `size` random bytes (made once; incompressible, so no layer below can cheat), for
    benchmarks of the I/O engine alone."""
    path = Path(path)
    if path.exists() and path.stat().st_size >= size:
        return path
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        f.writelines(block[: size - done] for done in range(0, size, len(block)))
        f.flush()
        os.fsync(f.fileno())
    return path


def extent_offsets(size: int, extent: int) -> list[int]:
    """Offsets of back-to-back extents of `extent` bytes in a file of `size`, placed as the bundle
    writer places them (16 KiB-aligned starts)."""
    from moestream.manifests.bundle import EXTENT_ALIGNMENT

    stride = -(-extent // EXTENT_ALIGNMENT) * EXTENT_ALIGNMENT
    return list(range(0, size - extent + 1, stride))


# ---------------------------------------------------------------- budget and ceiling


def budget(path: str | Path, share: float):
    """The MemoryPlan whose expert cache holds `share` of the experts (its budget_bytes is what to
    pass to moestream.load's memory_budget)."""
    import moestream

    return moestream.plan_memory(path, expert_cache_share=share)


def expert_files(bundle: str | Path) -> list[Path]:
    """The bundle's expert files (what its decode reads)."""
    from moestream.manifests.open import open_bundle

    b = open_bundle(bundle)
    return sorted({b.path(x.file) for x in b.extents.values()})


def mean_extent_bytes(bundle: str | Path) -> int:
    from moestream.manifests.open import open_bundle

    extents = list(open_bundle(bundle).extents.values())
    return sum(x.nbytes for x in extents) // max(len(extents), 1)


def ceiling(files: Sequence[Path], chunk: int, threads: int, trials: int = 1, seconds: float = 3.0,
            sequential: bool = False) -> dict:
    """The disk's O_DIRECT read rate over `files` at this read size and thread count, random reads or
    (sequential) each thread reading on in sequence (runtime.measure.ceiling.read_ceiling): over
    `trials` windows, all their bytes over all their seconds (sustained, as `moestream bench` takes
    its ceiling), with each window's rate beside it (`windows`)."""
    from moestream.runtime.measure.ceiling import read_ceiling_rounds

    return read_ceiling_rounds(list(files), [(int(chunk), threads, sequential)], rounds=trials, seconds=seconds)[0]


# ---------------------------------------------------------------- reporting


def setup_line() -> str:
    """Where the figures come from: machine, Python, MLX and its device, CPUs, load average."""
    try:
        import mlx.core as mx

        mlx = f"mlx {mx.__version__} on {mx.default_device()}"
    except ImportError:
        mlx = "no mlx"
    load = os.getloadavg()
    return (f"{platform.platform()}; Python {sys.version.split()[0]}; {mlx}; {os.cpu_count()} CPUs; "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")


Column = tuple[str, str | Callable[[dict], object], str]  # (header, row key or function of the row, format spec)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A plain-text table: one line per row; text columns (format spec "") left-aligned, numbers
    right-aligned. A missing value (None) prints as "-"."""
    def cell(row: dict, get, spec: str) -> str:
        value = get(row) if callable(get) else row.get(get)
        return "-" if value is None else format(value, spec)

    cells = [[h for h, _, _ in columns]] + [[cell(r, get, spec) for _, get, spec in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    left = [spec == "" for _, _, spec in columns]
    lines = ["  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(line, widths, left, strict=True)).rstrip()
             for line in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def write_json(path: str | Path | None, obj) -> None:
    """Write `obj` as JSON (atomically; values JSON cannot hold as their str) if a path is given."""
    if path:
        write_json_atomic(path, obj, default=str, sort_keys=False)
        print(f"wrote {path}")


# ---------------------------------------------------------------- process memory


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM) to its RSS now, so that peak_rss_bytes()
    measures from here (Linux >= 4.0: /proc/self/clear_refs "5"). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's peak RSS of this process (VmHWM) since it started or reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
