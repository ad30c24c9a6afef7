"""Opening a bundle: every structural check up front, checksums when asked (`verify`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .bundle import (
    BUNDLE_JSON,
    CONFIG_JSON,
    LAYOUT_FILE,
    RESIDENT_FILE,
    BundleError,
    ExpertExtent,
    check_extent,
    file_sha256,
    parse_fast_checksum,
    read_bundle_json,
    read_json,
    safe_path,
    sha256_hex,
)
from .layout import read_layout
from .validate import (
    check_against_model,
    check_config_sizes,
    check_meta,
    check_profile,
    check_resident_header,
    check_tokenizer_files,
    check_tree,
    check_unlisted,
)


@dataclass
class Bundle:
    root: Path
    meta: dict  # bundle.json
    config: dict  # config.json (as mlx-lm reads it)
    extents: dict[tuple[int, int], ExpertExtent]

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def num_experts(self) -> int:
        return int(self.meta["experts"]["num_experts"])

    @property
    def experts_per_token(self) -> int:
        return int(self.meta["experts"]["experts_per_token"])

    @property
    def layers(self) -> dict[int, str]:
        """MoE layer index -> MLX module path of its SwitchGLU."""
        return {int(x["layer"]): x["module"] for x in self.meta["layers"]}

    def path(self, rel: str) -> Path:
        """The checked absolute path of a bundle file (checked once, then remembered)."""
        cache = self.__dict__.setdefault("_paths", {})
        if rel not in cache:
            cache[rel] = safe_path(self.root, rel, BUNDLE_JSON)
        return cache[rel]

    def extent(self, layer: int, expert: int) -> ExpertExtent:
        return self.extents[(layer, expert)]

    @property
    def expert_bytes(self) -> int:
        return sum(e.nbytes for e in self.extents.values())

def _check_files(root: Path, meta: dict) -> None:
    files = meta["files"]
    for required in (CONFIG_JSON, RESIDENT_FILE, LAYOUT_FILE):
        if required not in files:
            raise BundleError(f"{root / BUNDLE_JSON}: 'files' does not list {required}")
    for rel, info in files.items():
        path = safe_path(root, rel, f"{BUNDLE_JSON} files[{rel!r}]")
        if not path.is_file():
            raise BundleError(f"{rel}: listed in {BUNDLE_JSON} but missing from the bundle")
        size = path.stat().st_size
        if size != info.get("nbytes"):
            raise BundleError(f"{rel}: {size} bytes on disk, {BUNDLE_JSON} says {info.get('nbytes')}")


def _check_extents(root: Path, meta: dict, extents: list[ExpertExtent]) -> dict:
    layers = {int(x["layer"]) for x in meta.get("layers", [])}
    num_experts = int(meta["experts"]["num_experts"])
    out: dict[tuple[int, int], ExpertExtent] = {}
    by_file: dict[str, list[tuple[int, ExpertExtent]]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for i, e in enumerate(extents):
        where = f"{LAYOUT_FILE} row {i} (layer {e.layer}, expert {e.expert})"
        problem = check_extent(e)
        if problem:
            raise BundleError(f"{where}: {problem}")
        if e.layer not in layers or not 0 <= e.expert < num_experts:
            raise BundleError(f"{where}: not a MoE layer/expert of this model (layers {sorted(layers)}, {num_experts} experts)")
        if (e.layer, e.expert) in out:
            raise BundleError(f"{where}: duplicate row for this (layer, expert)")
        path = safe_path(root, e.file, where)
        if e.file not in sizes:
            if not path.is_file():
                raise BundleError(f"{where}: file {e.file} is missing")
            sizes[e.file] = path.stat().st_size
        if e.offset + e.nbytes > sizes[e.file]:
            raise BundleError(
                f"{where}: extent [{e.offset}, {e.offset + e.nbytes}) runs past the end of {e.file} ({sizes[e.file]} bytes)"
            )
        out[(e.layer, e.expert)] = e
        by_file[e.file].append((i, e))
    for file, rows in by_file.items():
        rows.sort(key=lambda r: r[1].offset)
        for (_, a), (j, b) in zip(rows, rows[1:], strict=False):
            if b.offset < a.offset + a.nbytes:
                raise BundleError(
                    f"{LAYOUT_FILE} row {j} (layer {b.layer}, expert {b.expert}): extent at {b.offset} overlaps "
                    f"layer {a.layer} expert {a.expert} [{a.offset}, {a.offset + a.nbytes}) in {file}"
                )
    for layer in layers:
        missing = [x for x in range(num_experts) if (layer, x) not in out]
        if missing:
            raise BundleError(f"{LAYOUT_FILE}: layer {layer} has no rows for experts {missing[:8]}")
    return out


def open_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """Open a bundle through the validation gate (validate.py): every structural check before any
    file is used further; with `verify`, also every checksum."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder")
    check_tree(root)
    meta = read_bundle_json(root)
    check_meta(meta, str(root / BUNDLE_JSON))
    _check_files(root, meta)
    check_unlisted(root, meta)
    config = read_json(safe_path(root, CONFIG_JSON, BUNDLE_JSON), CONFIG_JSON)
    check_config_sizes(config, CONFIG_JSON)
    rows = len(meta["layers"]) * int(meta["experts"]["num_experts"])
    extents = _check_extents(root, meta, read_layout(safe_path(root, LAYOUT_FILE, BUNDLE_JSON), rows))
    check_against_model(meta, config, extents)
    check_resident_header(safe_path(root, RESIDENT_FILE, BUNDLE_JSON), RESIDENT_FILE)
    check_tokenizer_files(root)
    check_profile(root / "profile", set(int(x["layer"]) for x in meta["layers"]), int(meta["experts"]["num_experts"]))
    bundle = Bundle(root, meta, config, extents)
    if verify:
        verify_bundle(bundle)
    return bundle


def verify_bundle(bundle: Bundle, progress=None) -> None:
    """Check the checksum of every listed file and every expert extent (reads everything once)."""
    for rel, info in bundle.meta["files"].items():
        if info.get("checksum") is None and rel.startswith("experts/"):
            continue  # checked extent by extent below
        got = file_sha256(bundle.path(rel))
        if got != info.get("checksum"):
            raise BundleError(f"{rel}: checksum mismatch (expected {info.get('checksum')}, got {got})")
    by_file = defaultdict(list)
    for e in bundle.extents.values():
        by_file[e.file].append(e)
    for file, extents in sorted(by_file.items()):
        with open(bundle.path(file), "rb") as f:
            for e in sorted(extents, key=lambda x: x.offset):
                f.seek(e.offset)
                data = f.read(e.nbytes)
                if len(data) != e.nbytes or sha256_hex(data) != e.checksum or (
                        e.fast_checksum is not None and not parse_fast_checksum(e.fast_checksum, e.nbytes).matches(data)):
                    raise BundleError(f"{LAYOUT_FILE}: checksum mismatch for {e.label}")
        if progress:
            progress(file)
