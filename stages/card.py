"""card: a bundle's model card (README.md) in the conventions of mlx-community repos.

YAML front matter as the Hub reads it (`library_name: mlx`, `base_model`, tags, pipeline tag,
license), then a body that says what the bundle is, its recipe and sizes, the optional profile,
quality and benchmark results found in the bundle, and how to run it with moestream. The card
is built from the bundle alone (bundle.json, config.json and optional files), never written
into the bundle folder, and parsed back with huggingface_hub's `ModelCard` before anyone
uploads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..common.errors import MoestreamError
from ..common.units import fmt_bytes
from ..common.versions import package_version
from ..manifests.bundle import EXTENT_ALIGNMENT
from ..manifests.open import Bundle

# Optional results a bundle may carry at its root (rendered as tables when present).
QUALITY_FILE = "quality.json"
BENCH_FILE = "bench.json"
PROFILE_DIR = "profile"
MAX_TABLE_ROWS = 64  # a card stays readable: longer tables are cut, with a note

REQUIRED_TAGS = ("mlx", "moestream")


class CardError(MoestreamError, ValueError):
    """The model card would not parse, or lacks what the Hub needs to list it as an MLX model."""


# --- metadata --------------------------------------------------------------------------------


def base_model_of(meta: dict) -> str | None:
    """The source repo id recorded in bundle.json, when it is one (a local folder is not)."""
    repo_id = (meta.get("source") or {}).get("repo_id")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id


def license_of(meta: dict, license: str | None = None) -> str | None:
    """The license: given explicitly, else as bundle.json records it (source.license or license)."""
    for value in (license, (meta.get("source") or {}).get("license"), meta.get("license")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def card_data(bundle: Bundle, license: str | None = None) -> ModelCardData:
    meta = bundle.meta
    family = meta["family"]
    tags = [*REQUIRED_TAGS, family, "moe"]
    bits = meta["experts"].get("bits")
    if isinstance(bits, int):
        tags.append(f"{bits}-bit")
    base_model = base_model_of(meta)
    data = {
        "library_name": "mlx",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tags)),
    }
    if base_model:
        data["base_model"] = base_model
        data["base_model_relation"] = "quantized"
    lic = license_of(meta, license)
    if lic:
        data["license"] = lic
    return ModelCardData(**data)


def check_card(text: str) -> ModelCard:
    """Parse a card the way the Hub client does; raise CardError unless its metadata is usable."""
    if not text.startswith("---\n"):
        raise CardError("the model card has no YAML metadata block (it must start with '---')")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as err:  # yaml errors and ValueError: the metadata does not parse
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CardError(f"the model card's metadata does not parse: {first}") from err
    data = card.data.to_dict()
    if data.get("library_name") != "mlx":
        raise CardError(f"the model card's library_name is {data.get('library_name')!r}, expected 'mlx'")
    missing = [t for t in REQUIRED_TAGS if t not in (data.get("tags") or [])]
    if missing:
        raise CardError(f"the model card's tags lack {', '.join(missing)}")
    return card


# --- formatting ------------------------------------------------------------------------------


def fmt_size(n: int | float | None) -> str:
    return fmt_bytes(n, none="unknown")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(", ", ": "))
    text = str(value).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_table(header: list[str], rows: Iterable[list]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows[:MAX_TABLE_ROWS]:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"\n({len(rows) - MAX_TABLE_ROWS} more rows in the file)")
    return "\n".join(lines)


def json_tables(obj) -> str:
    """Any JSON result as markdown: a list of records, a mapping of records, or key/value pairs."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        columns = list(dict.fromkeys(k for r in obj for k in r))
        return markdown_table(columns, ([r.get(c) for c in columns] for r in obj))
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        inner = list(dict.fromkeys(k for v in obj.values() for k in v))
        if all(not isinstance(x, (dict, list)) for v in obj.values() for x in v.values()):
            return markdown_table(["", *inner], ([name, *(v.get(c) for c in inner)] for name, v in obj.items()))
    if isinstance(obj, dict):
        scalars = {k: v for k, v in obj.items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in obj.items() if isinstance(v, (dict, list))}
        parts = [markdown_table(["", "value"], ([k, v] for k, v in scalars.items()))] if scalars else []
        for key, value in nested.items():
            parts.append(f"**{_cell(key)}**\n\n{json_tables(value)}")
        return "\n\n".join(parts)
    if isinstance(obj, list):
        return markdown_table(["value"], ([v] for v in obj))
    return _cell(obj)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardError(f"{path.name}: not valid JSON ({err})") from None


# --- sections --------------------------------------------------------------------------------


def _provenance(meta: dict) -> str:
    source = meta.get("source") or {}
    base = base_model_of(meta)
    if base is None:
        return "made from a local checkpoint"
    at = source.get("commit") or source.get("revision")
    pin = f" at commit `{at}`" if at else ""
    return f"of [{base}](https://huggingface.co/{base}){pin}"


def _recipe(bundle: Bundle) -> str:
    meta, e = bundle.meta, bundle.meta["experts"]
    resident_bits = (meta.get("resident") or {}).get("bits")
    mode = e.get("mode") or "affine"
    bits = e.get("bits")
    if bits == "mixed":
        expert_q = f"per-expert bits {e.get('bits_used')} ({mode}, group size {e.get('group_size')})"
    elif bits == 16:
        expert_q = "source precision (not quantized)"
    else:
        expert_q = f"{bits}-bit {mode}, group size {e.get('group_size')}"
    lay = meta.get("layout") or {}
    tools = ", ".join(f"{k} {v}" for k, v in sorted((meta.get("tools") or {}).items()) if v)
    rows = [
        ["family", f"`{meta['family']}` (model_type `{meta.get('model_type')}`)"],
        ["MoE layers x experts", f"{e.get('num_moe_layers', len(bundle.layers))} x {e['num_experts']}, "
                                 f"top-{e['experts_per_token']} routed per token"],
        ["expert weights", expert_q],
        ["resident weights (attention, embeddings, norms, routers, shared experts)",
         f"{resident_bits}-bit affine (routers kept at source precision)" if resident_bits else "source precision"],
        ["expert layout", f"one extent per expert, {lay.get('extent_alignment', EXTENT_ALIGNMENT) // 1024} KiB "
                          f"aligned, order: {lay.get('order', 'identity')}"],
        ["made with", tools or "moestream"],
    ]
    return markdown_table(["", ""], rows)


def _sizes(bundle: Bundle, download_bytes: int | None) -> str:
    meta = bundle.meta
    lay = meta.get("layout") or {}
    rows = [
        ["expert weights", fmt_size(lay.get("expert_bytes", bundle.expert_bytes))],
        ["resident weights", fmt_size((meta.get("resident") or {}).get("nbytes"))],
        ["expert bytes read per token (nothing cached)", fmt_size(lay.get("expert_bytes_per_token"))],
    ]
    if download_bytes is not None:
        rows.append(["bundle files (the download)", fmt_size(download_bytes)])
    return markdown_table(["", "size"], rows)


def _suggested_budget(bundle: Bundle) -> str:
    """An example --memory-budget: what the runtime needs for an expert cache holding a quarter of
    the experts, computing in the source dtype as on a GPU or Apple silicon, rounded up to GB."""
    from ..runtime.model.load import plan_memory  # the runtime's own budget split

    want = plan_memory(bundle.root, expert_cache_share=0.25, dtype="source").budget_bytes
    return f"{max(1, math.ceil(want / 1e9))}GB"


def _profile(root: Path) -> str | None:
    folder = root / PROFILE_DIR
    if not folder.is_dir():
        return None
    parts = ["Routing statistics recorded by running calibration text through the source-precision model "
             f"(files under `{PROFILE_DIR}/`)."]
    for path in sorted(folder.glob("*.json")):
        parts.append(f"**{path.stem}**\n\n{json_tables(_read_json(path))}")
    tables = sorted(folder.glob("*.parquet"))
    if tables:
        import pyarrow.parquet as pq

        rows = []
        for path in tables:
            try:
                md = pq.ParquetFile(path).metadata
                rows.append([f"`{PROFILE_DIR}/{path.name}`", md.num_rows, ", ".join(md.schema.names)])
            except Exception as err:  # an unreadable optional file is named, not fatal
                rows.append([f"`{PROFILE_DIR}/{path.name}`", None, f"unreadable: {type(err).__name__}"])
        parts.append(markdown_table(["table", "rows", "columns"], rows))
    for path in sorted(folder.glob("*.png")):
        parts.append(f"![{path.stem}]({PROFILE_DIR}/{path.name})")
    return "\n\n".join(parts)


def _results(root: Path, name: str, intro: str) -> str | None:
    path = root / name
    if not path.is_file():
        return None
    return f"{intro} (`{name}`):\n\n{json_tables(_read_json(path))}"


def _usage(repo_id: str, budget: str) -> str:
    return f"""```bash
pip install moestream
moestream generate {repo_id} --prompt "Hello" --memory-budget {budget}
moestream chat {repo_id} --memory-budget {budget}
moestream serve {repo_id} --memory-budget {budget} --port 8080   # OpenAI-compatible API
```

```python
import moestream
from mlx_lm import stream_generate

model, tokenizer = moestream.load("{repo_id}", memory_budget="{budget}")
for r in stream_generate(model, tokenizer, "Hello", max_tokens=64):
    print(r.text, end="", flush=True)
print(moestream.stats(model))  # bytes read, cache hit rate, ...
```

The memory budget covers the resident weights, a KV cache reserve, read buffers and the expert
cache; the bigger the share of experts it holds, the fewer bytes each token reads. A budget too
small to run is refused with the minimum it needs. The first run downloads the bundle into the
Hugging Face cache and checks every checksum once; later runs (also with `HF_HUB_OFFLINE=1`)
start from the cache."""


def render_card(bundle: Bundle, repo_id: str, *, license: str | None = None,
                download_bytes: int | None = None) -> str:
    """The model card (README.md text) for `bundle` published as `repo_id`; checked to parse."""
    meta = bundle.meta
    e = meta["experts"]
    bits = e.get("bits")
    what = "low-bit" if bits in (None, "mixed") else ("source-precision" if bits == 16 else f"{bits}-bit")
    sections = [
        f"# {repo_id}",
        f"A **moestream bundle** {_provenance(meta)}: a Mixture-of-Experts model prepared to run in less "
        f"memory than its size. Its {e['num_experts']} experts per MoE layer are stored as {what} weights, each "
        "expert packed into one aligned extent, so that moestream's MLX runtime keeps only the non-expert "
        "weights resident and streams the routed experts from disk for every token, inside a memory budget "
        "you choose. It is not a plain mlx-lm checkpoint: load it with moestream (below), which returns an "
        "ordinary mlx-lm model.",
        "## Recipe",
        _recipe(bundle),
        "## Sizes",
        _sizes(bundle, download_bytes),
    ]
    for title, body in (
        ("Routing profile", _profile(bundle.root)),
        ("Quality", _results(bundle.root, QUALITY_FILE, "Measured against the source model")),
        ("Benchmarks", _results(bundle.root, BENCH_FILE, "Measured by moestream's benchmark")),
    ):
        if body:
            sections += [f"## {title}", body]
    sections += [
        "## Use with moestream",
        _usage(repo_id, _suggested_budget(bundle)),
        "## Files",
        "`bundle.json` (format, recipe, sizes and checksums), `config.json` and tokenizer files as mlx-lm reads "
        "them, `resident.safetensors` (every non-expert tensor), `layout.parquet` (where each expert's bytes "
        "live) and `experts/*.bin` (packed expert extents: raw bytes, no pickle, no code). "
        f"Published with moestream {package_version('moestream') or 'unknown'}.",
    ]
    text = f"---\n{card_data(bundle, license).to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    check_card(text)
    return text
