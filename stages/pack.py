"""Layout + write for one MoE layer: every expert's tensors packed into one aligned extent,
in a given order, into one file per layer; written to a temporary name and renamed into place,
with a sidecar that lets an interrupted preparation resume without redoing the layer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..common.files import atomic_path, write_atomic
from ..manifests.bundle import (
    EXPERTS_DIR,
    FORMAT_VERSION,
    ExpertExtent,
    extent_from_dict,
    extent_to_dict,
    fast_checksum,
    next_extent_offset,
    pack_extent,
    sha256_hex,
)
from ..manifests.checkpoint import SourceCheckpoint
from .quantize import ExpertRecipe, quantize_expert


@dataclass(frozen=True)
class LayerJob:
    layer: int
    recipe: ExpertRecipe
    order: tuple[int, ...]  # experts in file order (identity unless a profile says otherwise)
    bits: tuple[int | str, ...]  # per expert (index = expert id): the bit plan ("source": as stored)
    source: str | None = None  # the source's commit (Hub repo) or None (a local folder)

    def key(self) -> str:
        """What the layer's bytes depend on; a staged layer with another key is redone (a rerun
        after the repo's revision moved, too)."""
        return json.dumps({"recipe": asdict(self.recipe), "order": self.order, "bits": self.bits,
                           "format": FORMAT_VERSION, "source": self.source}, sort_keys=True)


def layer_file(layer: int) -> str:
    return f"{EXPERTS_DIR}/layer_{layer:03d}.bin"


def is_sidecar(rel: str) -> bool:
    """The resume record of a finished layer (dropped when the bundle is finalized)."""
    return rel.startswith(f"{EXPERTS_DIR}/") and rel.endswith(".json")


def staged_layer(staging: Path, job: LayerJob) -> list[ExpertExtent] | None:
    """The extents of a layer finished by an earlier run with the same job, if any."""
    sidecar = staging / (layer_file(job.layer) + ".json")
    if not sidecar.is_file() or not (staging / layer_file(job.layer)).is_file():
        return None
    data = json.loads(sidecar.read_text())
    if data.get("key") != job.key():
        return None
    return [extent_from_dict(d) for d in data["extents"]]


def pack_layer(ckpt: SourceCheckpoint, job: LayerJob, staging: Path) -> list[ExpertExtent]:
    """Quantize and pack one layer's experts into `staging/experts/layer_NNN.bin`."""
    done = staged_layer(staging, job)
    if done is not None:
        return done
    rel = layer_file(job.layer)
    path = staging / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    extents, offset = [], 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for expert in job.order:
            where = f"layer {job.layer} expert {expert}"
            keep = job.bits[expert] == "source"
            tensors = ckpt.read_expert(job.layer, expert, keep_quantized=keep)
            stored = ckpt.quantization(job.layer, expert) if keep else None
            data, entries = pack_extent(quantize_expert(tensors, job.bits[expert], job.recipe, where, stored))
            extents.append(ExpertExtent(job.layer, expert, rel, offset, len(data), sha256_hex(data), "none", len(data),
                                        entries, fast_checksum(data)))
            f.write(data)
            end = next_extent_offset(offset, len(data))
            f.write(b"\0" * (end - offset - len(data)))
            offset = end
    write_atomic(path.with_name(path.name + ".json"),
                 json.dumps({"key": job.key(), "extents": [extent_to_dict(e) for e in extents]}))
    return extents
