"""The sweep: prepare (cached) a bundle per expert bit width, evaluate every (bits, experts per
token) against the source, and tabulate quality against the expert bytes read per token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common.files import write_atomic, write_json_atomic
from ..manifests.open import open_bundle
from .eval import evaluate
from .prepare import PrepareOptions, prepare_in_process

QUALITY_FILE = "quality.json"  # read by the model card (stages/card.py)


@dataclass(frozen=True)
class SweepRow:
    bits: int
    experts_per_token: int
    bytes_per_token: int
    kl_mean: float | None
    kl_p99: float | None
    top1: float | None
    ppl: float | None
    ppl_reference: float | None
    tools_valid: float | None
    tools_valid_reference: float | None


def bundle_for(source: Path, workdir: Path, bits: int, group_size: int) -> Path:
    """The bundle for this recipe, prepared once and reused by later sweeps."""
    out = workdir / "bundles" / f"b{bits}-g{group_size}"
    if (out / "bundle.json").exists():
        open_bundle(out)  # a damaged cached bundle is an error, not a silent re-use
        return out
    prepare_in_process(PrepareOptions(str(source), out, expert_bits=bits, group_size=group_size))
    return out


def row_from(result: dict, bits: int, k: int, bytes_per_token: int) -> SweepRow:
    text, tools, tools_ref = result.get("text", {}), result.get("tools", {}), result.get("tools_reference", {})
    return SweepRow(bits, k, bytes_per_token, text.get("kl_mean"), text.get("kl_p99"), text.get("top1_agreement"),
                    text.get("ppl_bundle"), text.get("ppl_reference"), tools.get("valid_arguments"),
                    tools_ref.get("valid_arguments"))


def markdown_table(rows: list[SweepRow]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| expert bits | experts/token | MB read/token | KL mean | KL p99 | top-1 | ppl (ref) | tool calls valid (ref) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.bits} | {r.experts_per_token} | {r.bytes_per_token / 1e6:.2f} | {f(r.kl_mean, '.4f')} | "
            f"{f(r.kl_p99, '.3f')} | {f(r.top1, '.3f')} | {f(r.ppl, '.2f')} ({f(r.ppl_reference, '.2f')}) | "
            f"{f(r.tools_valid, '.0%')} ({f(r.tools_valid_reference, '.0%')}) |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[SweepRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for bits in sorted({r.bits for r in rows}):
        pts = sorted((r.bytes_per_token / 1e6, r.kl_mean) for r in rows if r.bits == bits and r.kl_mean is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{bits}-bit experts")
    ax.set_xlabel("expert MB read per token (nothing cached)")
    ax.set_ylabel("KL(source || bundle), mean")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("quality against bytes read (points: experts per token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep(source: Path, workdir: Path, bits_list: list[int], k_list: list[int] | None, suites, text=None,
          tool_examples=None, group_size: int = 64, progress=print) -> list[SweepRow]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    reference_tools = None
    for bits in bits_list:
        bundle = bundle_for(Path(source), workdir, bits, group_size)
        meta = open_bundle(bundle).meta
        default_k = meta["experts"]["experts_per_token"]
        per_k = meta["layout"]["expert_bytes_per_token"] / default_k
        bundle_rows = []
        for k in k_list or [default_k]:
            result = evaluate(bundle, source, suites=suites, text=text, tool_examples=tool_examples, experts_per_token=k,
                              reference_tools=reference_tools)
            reference_tools = result.get("tools_reference")
            row = row_from(result, bits, k, int(per_k * k))
            progress(f"bits {bits}, k {k}: {row}")
            rows.append(row)
            bundle_rows.append(row)
        # the card of each bundle shows its own rows (an optional file, outside the checksummed set)
        write_json_atomic(bundle / QUALITY_FILE, {"reference": str(source), "rows": [r.__dict__ for r in bundle_rows]})
    write_atomic(workdir / "sweep.md", markdown_table(rows) + "\n")
    write_json_atomic(workdir / "sweep.json", [r.__dict__ for r in rows], sort_keys=False)
    plot_rows(rows, workdir / "sweep.png")
    return rows
