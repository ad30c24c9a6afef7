"""The validation gate: what a bundle must be before any of it is used.

A bundle comes from the Hub, so every byte of it is untrusted input, as a GGUF or safetensors file
is for llama.cpp or the safetensors library. `open_bundle` (open.py) passes every bundle through
these checks before anything reads it further; every entry point (load, verify, inspect, publish,
eval, replay) opens bundles with it. A rejection is a BundleError naming the file and the field or
row.

- The tree: every entry is a regular file or a folder inside the bundle, links resolved (the HF
  cache's own snapshot -> blobs links are the one exception); no device, pipe or socket. So no
  loader (ours, MLX's, the tokenizer's, jinja's) can be led to read outside it.
- JSON files: a size and a nesting-depth limit, an object at the top.
- bundle.json: its fields' types and ranges.
- config.json: the sizes mlx-lm builds the model from, as positive integers within sane limits
  (checked before any model is built: a model of 10**6 layers would take all memory first), then
  the model mlx-lm builds must have exactly the bundle's MoE layers at its module paths, and every
  layout row must hold exactly the tensors that layer's expert module needs, in its shapes.
- resident.safetensors: its header parsed and checked here before MLX sees it.
- tokenizer and generation files: well-formed JSON; profile/ tables: columns and ranges.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from .bundle import BundleError, ExpertExtent, hf_cache_blobs, read_json

MAX_ENTRIES = 100_000  # files and folders in a bundle
# Sane limits for the sizes a model is built from: far above any released model, far below what
# would exhaust memory before anything else is checked.
SIZE_LIMITS = {
    "num_hidden_layers": 1024, "num_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20, "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 8192,
    "vocab_size": 1 << 23, "num_experts": 1 << 14, "num_local_experts": 1 << 14, "n_routed_experts": 1 << 14,
    "moe_num_experts": 1 << 14, "num_experts_per_tok": 1 << 10, "max_position_embeddings": 1 << 27,
}
MAX_TEMPLATE_BYTES = 1 << 20
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.json", "generation_config.json")


# ----------------------------------------------------------------------------- the tree


def check_tree(root: Path) -> None:
    """Every entry of the bundle is a regular file or folder inside it (links resolved)."""
    real_root, blobs = root.resolve(), hf_cache_blobs(root)
    count = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            count += 1
            if count > MAX_ENTRIES:
                raise BundleError(f"{root}: more than {MAX_ENTRIES} files and folders; not a bundle")
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise BundleError(f"{rel}: a broken or looping link") from None
                inside = real_root in real.parents or real == real_root
                if not ((inside or (blobs is not None and real.parent == blobs)) and real.is_file()):
                    raise BundleError(f"{rel}: a link to {real}, outside the bundle (only files of the bundle "
                                      "itself may be read)")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"{rel}: neither a file nor a folder")


# ----------------------------------------------------------------------------- JSON


# ----------------------------------------------------------------------------- bundle.json


def _int(value, where: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BundleError(f"{where} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _type(value, types, where: str):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BundleError(f"{where} must be {_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise BundleError(f"{where} must be {_names(types)}, got {type(value).__name__}")
    return value


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
                        type(None): "null", float: "a number"}.get(t, t.__name__) for t in types)


def check_meta(meta: dict, where: str) -> None:
    """bundle.json's fields: types, ranges and the relations between them."""
    for key, types in (("family", str), ("experts", dict), ("layers", list), ("files", dict)):
        if key not in meta:
            raise BundleError(f"{where}: missing {key!r}")
        _type(meta[key], types, f"{where} {key!r}")
    e = meta["experts"]
    n = _int(e.get("num_experts"), f"{where} experts.num_experts", 1, SIZE_LIMITS["num_experts"])
    _int(e.get("experts_per_token"), f"{where} experts.experts_per_token", 1, n)
    seen = set()
    for i, row in enumerate(meta["layers"]):
        _type(row, dict, f"{where} layers[{i}]")
        layer = _int(row.get("layer"), f"{where} layers[{i}].layer", 0, SIZE_LIMITS["num_hidden_layers"])
        module = _type(row.get("module"), str, f"{where} layers[{i}].module")
        if not module or len(module) > 512 or not all(part.isidentifier() or part.isdigit() for part in module.split(".")):
            raise BundleError(f"{where} layers[{i}].module {module[:80]!r} is not a dotted module path")
        if layer in seen:
            raise BundleError(f"{where} layers[{i}]: layer {layer} listed twice")
        seen.add(layer)
    if not seen:
        raise BundleError(f"{where}: 'layers' lists no MoE layer")
    _int(len(meta["files"]), f"{where} files (entries)", 0, MAX_ENTRIES)
    for rel, info in meta["files"].items():
        check_relative_path(rel, f"{where} files")
        _type(info, dict, f"{where} files[{rel!r}]")
        _int(info.get("nbytes"), f"{where} files[{rel!r}].nbytes")
        _type(info.get("checksum"), (str, type(None)), f"{where} files[{rel!r}].checksum")
    _type(e.get("bits"), (int, str), f"{where} experts.bits")
    _type(e.get("group_size"), (int, type(None)), f"{where} experts.group_size")
    for key in ("resident", "layout"):
        if key not in meta:
            raise BundleError(f"{where}: missing {key!r}")
    for key in ("resident", "layout", "source", "tools", "profile"):
        if key in meta:
            _type(meta[key], dict, f"{where} {key!r}")
    _int(meta["resident"].get("nbytes"), f"{where} resident.nbytes")
    _type(meta["resident"].get("bits"), (int, type(None)), f"{where} resident.bits")
    _int(meta["layout"].get("expert_bytes_per_token"), f"{where} layout.expert_bytes_per_token")
    _type(meta["layout"].get("order"), str, f"{where} layout.order")


def check_relative_path(rel, where: str) -> None:
    """A file name a manifest gives: a relative path of sane length, no NUL, no '..' (a name
    the OS would refuse is a BundleError here, not an OSError later)."""
    _type(rel, str, where)
    parts = rel.split("/")
    if (not rel or len(rel) > 1024 or "\0" in rel or rel.startswith("/") or "\\" in rel
            or any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts)):
        raise BundleError(f"{where}: {rel[:80]!r}{'...' if len(rel) > 80 else ''} is not a relative file path "
                          "inside the bundle")


# ----------------------------------------------------------------------------- config.json


def check_config_sizes(config: dict, where: str) -> None:
    """The sizes mlx-lm builds the model from: positive integers within SIZE_LIMITS."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.isidentifier():
        raise BundleError(f"{where}: model_type must be a model type name, got {model_type!r}")
    for cfg, prefix in ((config, ""), (config.get("text_config"), "text_config.")):
        if not isinstance(cfg, dict):
            continue
        for key, limit in SIZE_LIMITS.items():
            if key in cfg and cfg[key] is not None:
                _int(cfg[key], f"{where} {prefix}{key}", 1, limit)


def check_against_model(meta: dict, config: dict, extents: dict[tuple[int, int], ExpertExtent]) -> None:
    """The model mlx-lm builds for config.json has exactly the bundle's MoE layers at its module
    paths, and each layout row holds exactly the tensors its expert module needs, in its shapes."""
    from .architecture import UnsupportedModel, architecture_of

    try:
        arch = architecture_of(config)
    except (UnsupportedModel, BundleError) as e:
        raise BundleError(f"config.json: {e}") from None
    except Exception as e:  # noqa: BLE001 - mlx-lm's model code on untrusted values: any failure is the config's
        raise BundleError(f"config.json: mlx-lm cannot build the model it describes ({type(e).__name__}: {e})") from None
    want = {layer: t.path for layer, t in arch.targets.items()}
    have = {int(row["layer"]): row["module"] for row in meta["layers"]}
    if have != want:
        wrong = sorted(set(have.items()) ^ set(want.items()))[:3]
        raise BundleError(f"bundle.json layers do not match the model config.json describes (mlx-lm's expert modules "
                          f"{sorted(want.items())[:3]}...; differing: {wrong})")
    e = meta["experts"]
    first = next(iter(arch.targets.values()))
    if e["num_experts"] != first.num_experts:
        raise BundleError(f"bundle.json experts.num_experts {e['num_experts']} but config.json's model has "
                          f"{first.num_experts} experts")
    for (layer, expert), x in extents.items():
        problem = _row_problem(x, arch.targets[layer])
        if problem:
            raise BundleError(f"layout.parquet: layer {layer} expert {expert}: {problem}")


def _row_problem(x: ExpertExtent, target) -> str | None:
    by_name = {t.name: t for t in x.tensors}
    want = set()
    for proj, (_, out, inp) in zip(target.projections, target.shapes, strict=True):
        w = by_name.get(f"{proj}.weight")
        if w is None:
            return f"no {proj}.weight (the expert module needs {', '.join(target.projections)})"
        want.add(f"{proj}.weight")
        if w.bits is None:
            if tuple(w.shape) != (out, inp):
                return f"{proj}.weight is {list(w.shape)}, the model needs [{out}, {inp}]"
        else:
            if tuple(w.shape) != (out, inp * w.bits // 32) or inp * w.bits % 32:
                return f"{proj}.weight is {list(w.shape)} at {w.bits} bits, the model needs [{out}, {inp * w.bits // 32}]"
            want |= {f"{proj}.scales"} | ({f"{proj}.biases"} if w.mode == "affine" else set())
        if target.bias:
            want.add(f"{proj}.bias")
            b = by_name.get(f"{proj}.bias")
            if b is None or tuple(b.shape) != (out,):
                return f"{proj}.bias must be [{out}]"
    if set(by_name) != want:
        return f"tensors {sorted(set(by_name) ^ want)} are not what the expert module holds ({sorted(want)})"
    end = max(t.offset + t.nbytes for t in x.tensors)
    if x.raw_nbytes != end:
        return f"raw_nbytes {x.raw_nbytes} but its tensors end at {end}"
    return None


# ----------------------------------------------------------------------------- the other files


def check_resident_header(path: Path, what: str) -> None:
    """resident.safetensors' header, parsed and checked here (offsets inside the file, known
    dtypes, sizes that agree with shapes) before MLX reads it."""
    from .safetensors_index import CheckpointError, read_header

    try:
        read_header(path)
    except CheckpointError as e:
        raise BundleError(f"{what}: {e}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        raise BundleError(f"{what}: not a safetensors file ({type(e).__name__}: {e})") from None


# Files the tokenizer loader (transformers') reads when present and that change what the model
# says: each must be listed in bundle.json, so that its checksum covers it; an unlisted one (planted
# after the bundle was made) would change every prompt unchecked. Other unlisted files are allowed:
# README.md, quality.json, a profile added later (profile/ changes only which experts stay cached,
# and check_profile validates it).
LOADER_NAMES = frozenset(TOKENIZER_JSON) | {
    "chat_template.jinja", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "preprocessor_config.json", "processor_config.json"}
LOADER_SUFFIXES = (".jinja", ".tiktoken", ".py")
LOADER_FOLDERS = ("additional_chat_templates/",)


def check_unlisted(root: Path, meta: dict) -> None:
    """No file a loader would read is missing from bundle.json's files."""
    listed = set(meta["files"]) | {"bundle.json"}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel in listed or rel.startswith(".") or path.is_dir():
            continue
        if rel in LOADER_NAMES or rel.endswith(LOADER_SUFFIXES) or rel.startswith(LOADER_FOLDERS):
            raise BundleError(f"{rel}: in the bundle but not listed in bundle.json (a file the loaders read must be "
                              "listed, so its checksum covers it)")


def check_tokenizer_files(root: Path) -> None:
    for name in TOKENIZER_JSON:
        if (root / name).is_file():
            read_json(root / name, name)
    template = root / "chat_template.jinja"
    if template.is_file() and template.stat().st_size > MAX_TEMPLATE_BYTES:
        raise BundleError("chat_template.jinja: larger than a chat template can be")


def check_profile(folder: Path, layers: set[int], num_experts: int) -> None:
    """profile/frequency.parquet, the table the cache policies read: its columns and ranges."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "frequency.parquet"
    if not path.is_file():
        return
    try:
        table = pq.read_table(path, columns=["layer", "expert", "share"])
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise BundleError(f"profile/frequency.parquet: not a frequency table ({e})") from None
    if table.num_rows > len(layers) * num_experts:
        raise BundleError(f"profile/frequency.parquet: {table.num_rows} rows for {len(layers)} layers x {num_experts} experts")
    d = table.to_pydict()
    for i, (layer, expert, share) in enumerate(zip(d["layer"], d["expert"], d["share"], strict=True)):
        if layer not in layers or not isinstance(expert, int) or not 0 <= expert < num_experts or share is None \
                or not math.isfinite(share) or share < 0:
            raise BundleError(f"profile/frequency.parquet row {i}: layer {layer}, expert {expert}, share {share} is not "
                              f"a share of an expert of this bundle")
