"""The preparation stages run in order in one process, without Prefect: for tests, benchmarks
and machines where the pipeline's orchestration isn't installed (the lent GPU machine). The
flow (flows/prepare.py) runs the same stages as tasks, with retries, resume and parallelism."""

from __future__ import annotations

from pathlib import Path

from ..manifests.checkpoint import SourceCheckpoint
from ..manifests.open import Bundle
from .pack import LayerJob, pack_layer
from .quantize import ExpertRecipe
from .write import SourceInfo, finalize, staging_dir, write_bundle


def prepare_sequential(checkpoint: Path, out: Path, bits: int = 4, group_size: int = 64, resident_bits: int | None = None,
                       orders: dict[int, list[int]] | None = None, overwrite: bool = False, progress=None,
                       plan: dict[tuple[int, int], int] | None = None, profile_dir: Path | None = None) -> Bundle:
    """`plan` maps (layer, expert) to its bit width (a mixed-precision plan); others get `bits`."""
    ckpt = SourceCheckpoint.open(checkpoint)
    recipe = ExpertRecipe(bits=bits, group_size=group_size)
    staging = staging_dir(Path(out))
    staging.mkdir(parents=True, exist_ok=True)
    n = ckpt.dims.num_experts
    profile_summary = None
    if profile_dir is not None:  # a profile made earlier: its orders, and a copy inside the bundle
        import json
        import shutil

        from .seriate import profile_orders

        orders = orders or profile_orders(profile_dir)
        shutil.copytree(profile_dir, staging / "profile", dirs_exist_ok=True)
        summary = Path(profile_dir) / "summary.json"
        profile_summary = json.loads(summary.read_text()) if summary.is_file() else None
    extents = []
    for layer in ckpt.expert_layers:
        order = tuple(orders[layer]) if orders and layer in orders else tuple(range(n))
        layer_bits = tuple((plan or {}).get((layer, e), bits) for e in range(n))
        extents += pack_layer(ckpt, LayerJob(layer, recipe, order, layer_bits), staging)
        if progress:
            progress(layer)
    write_bundle(ckpt, staging, extents, recipe, SourceInfo(), resident_bits, order="profile" if orders else "identity",
                 profile_summary=profile_summary)
    return finalize(staging, Path(out), overwrite=overwrite)
