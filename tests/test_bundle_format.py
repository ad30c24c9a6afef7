"""A bundle is untrusted input: each kind of damage gets a clear error naming the file and row,
both from the format's reader and from `moestream.load` (before any token is produced)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import pytest

import moestream
from moestream.manifests.bundle import BundleError, file_sha256
from moestream.manifests.layout import read_layout, write_layout
from moestream.manifests.open import open_bundle


@pytest.fixture
def bundle(tmp_path, bundle_dir) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir("qwen3_moe"), dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _rewrite_layout(bundle: Path, fn) -> None:
    """Change layout rows and keep bundle.json's size/checksum of layout.parquet consistent, as
    a careless or malicious publisher would."""
    extents = read_layout(bundle / "layout.parquet")
    extents = fn(extents)
    write_layout(bundle / "layout.parquet", extents)

    def fix(meta):
        p = bundle / "layout.parquet"
        meta["files"]["layout.parquet"] = {"nbytes": p.stat().st_size, "checksum": file_sha256(p)}

    _edit_json(bundle / "bundle.json", fix)


def _replace_row(index: int, **changes):
    def fn(extents):
        extents[index] = dataclasses.replace(extents[index], **changes)
        return extents

    return fn


def damage_format_name(b):
    _edit_json(b / "bundle.json", lambda m: m.update(format="something-else"))


def damage_format_version(b):
    _edit_json(b / "bundle.json", lambda m: m.update(format_version=99))


def damage_absolute_path(b):
    _rewrite_layout(b, _replace_row(0, file="/etc/passwd"))


def damage_dotdot_path(b):
    _rewrite_layout(b, _replace_row(0, file="../outside.bin"))


def damage_symlink_out(b):
    outside = b.parent / "outside.bin"
    target = b / "experts" / "layer_000.bin"
    shutil.copyfile(target, outside)
    target.unlink()
    os.symlink(outside, target)


def damage_extent_past_end(b):
    size = (b / "experts" / "layer_000.bin").stat().st_size
    _rewrite_layout(b, _replace_row(0, offset=size - 16))


def damage_overlap(b):
    def fn(extents):
        first = extents[0]
        j = next(i for i, e in enumerate(extents) if e.file == first.file and e.expert != first.expert)
        extents[j] = dataclasses.replace(extents[j], offset=first.offset + 64)
        return extents

    _rewrite_layout(b, fn)


def damage_shape(b):
    def fn(extents):
        t = extents[0].tensors
        bad = dataclasses.replace(t[0], shape=(t[0].shape[0] + 1, *t[0].shape[1:]))
        extents[0] = dataclasses.replace(extents[0], tensors=(bad, *t[1:]))
        return extents

    _rewrite_layout(b, fn)


def damage_bits(b):
    def fn(extents):
        t = extents[0].tensors
        i = next(i for i, x in enumerate(t) if x.name.endswith(".weight") and x.bits)
        bad = dataclasses.replace(t[i], bits=2)  # same bytes claimed to be 2-bit codes
        extents[0] = dataclasses.replace(extents[0], tensors=(*t[:i], bad, *t[i + 1 :]))
        return extents

    _rewrite_layout(b, fn)


def damage_missing_resident(b):
    (b / "resident.safetensors").unlink()


def damage_missing_expert_file(b):
    (b / "experts" / "layer_001.bin").unlink()


CASES = {
    "format_name": (damage_format_name, "expected 'moestream-bundle'"),
    "format_version": (damage_format_version, "format_version 99"),
    "absolute_path": (damage_absolute_path, "absolute"),
    "dotdot_path": (damage_dotdot_path, "escapes the bundle"),
    "symlink_out": (damage_symlink_out, "outside the bundle"),
    "extent_past_end": (damage_extent_past_end, "runs past the end"),
    "overlap": (damage_overlap, "overlaps"),
    "shape": (damage_shape, "needs"),
    "bits": (damage_bits, "does not match"),
    "missing_resident": (damage_missing_resident, "missing"),
    "missing_expert_file": (damage_missing_expert_file, "missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_bundle_is_rejected_with_its_reason(case, bundle):
    damage, message = CASES[case]
    damage(bundle)
    with pytest.raises(BundleError, match=message) as err:
        open_bundle(bundle)
    if "row" in str(err.value):  # row errors name the layout file and the row
        assert "layout.parquet row" in str(err.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_bundle_fails_at_load(case, bundle):
    damage, message = CASES[case]
    damage(bundle)
    with pytest.raises(BundleError, match=message):
        moestream.load(bundle)


def _flip_byte(bundle: Path, layer: int, expert: int, at: int = 10) -> None:
    extent = open_bundle(bundle).extent(layer, expert)
    with open(bundle / extent.file, "r+b") as f:
        f.seek(extent.offset + at)
        byte = f.read(1)
        f.seek(extent.offset + at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_checksum_mismatch_found_by_verify(bundle):
    _flip_byte(bundle, 0, 3)
    open_bundle(bundle)  # structure is fine
    with pytest.raises(BundleError, match="checksum mismatch for layer 0 expert 3"):
        open_bundle(bundle, verify=True)
    with pytest.raises(BundleError, match="checksum mismatch"):
        moestream.load(bundle, verify=True)


@pytest.mark.parametrize("io", [{}, {"read_into": "host"}, {"stage_on_device": True}])
def test_a_flipped_expert_byte_is_an_error_on_every_read_path_never_a_wrong_token(bundle, io):
    """Format 2: every read from disk checks the extent's fast checksum."""
    import mlx.core as mx

    for expert in range(16):
        _flip_byte(bundle, 1, expert, at=100 + expert)
    with moestream.load(bundle, io=moestream.IOOptions(**io)) as (model, _):
        with pytest.raises(BundleError, match=r"layer 1 expert \d+ .*do not match the extent's checksum"):
            mx.eval(model(mx.array([[3, 17, 42, 7, 99, 5, 23, 64]])))
    with moestream.load(bundle, io=moestream.IOOptions(check_reads=False, **io)) as (model, _):
        mx.eval(model(mx.array([[3, 17, 42, 7]])))  # unchecked (measuring only): the damage goes unseen


def test_format_1_bundles_still_load_without_per_read_checks(bundle):
    """A bundle written before format 2: no fast checksums; read as it always was, with a note."""
    import mlx.core as mx

    _rewrite_layout(bundle, lambda extents: [dataclasses.replace(e, fast_checksum=None) for e in extents])
    _edit_json(bundle / "bundle.json", lambda m: m.update(format_version=1))
    open_bundle(bundle, verify=True)
    with pytest.warns(UserWarning, match="format 1"):
        loaded = moestream.load(bundle)
    with loaded as (model, _):
        mx.eval(model(mx.array([[3, 17, 42, 7]])))


def test_verify_cli_exit_code(bundle, capsys):
    from moestream.cli import main

    assert main(["verify", str(bundle)]) == 0
    (bundle / "config.json").write_text((bundle / "config.json").read_text() + " ")
    assert main(["verify", str(bundle)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_intact_bundle_round_trips(bundle):
    b = open_bundle(bundle, verify=True)
    assert len(b.extents) == len(b.layers) * b.num_experts
    info = moestream.inspect(bundle)
    assert info["format_version"] == 2 and info["expert_bits"] == 4
    assert info["expert_bytes_per_token"] > 0


def test_hf_cache_snapshot_links_into_blobs_are_allowed_but_not_elsewhere(tmp_path, bundle_dir):
    """huggingface_hub stores a snapshot's files as links into the repo's blobs/ folder."""
    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    blobs.mkdir(parents=True)
    src = bundle_dir("qwen3_moe")
    for f in src.rglob("*"):
        if f.is_file():
            rel = f.relative_to(src)
            blob = blobs / f"blob{abs(hash(str(rel)))}"
            shutil.copyfile(f, blob)
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    open_bundle(snap, verify=True)
    elsewhere = tmp_path / "elsewhere.bin"
    target = snap / "experts" / "layer_000.bin"
    shutil.copyfile(target, elsewhere)
    target.unlink()
    os.symlink(elsewhere, target)
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(snap)


# ----------------------------------------------------------------------------- the validation gate


def _relist(bundle: Path, rel: str) -> None:
    """bundle.json's size and checksum of `rel` made to agree with it, as a careless or malicious
    publisher would."""
    p = bundle / rel
    _edit_json(bundle / "bundle.json", lambda m: m["files"].__setitem__(
        rel, {"nbytes": p.stat().st_size, "checksum": file_sha256(p)}))


def _edit_config(bundle: Path, fn) -> None:
    _edit_json(bundle / "config.json", fn)
    _relist(bundle, "config.json")


def _write_config(bundle: Path, text: str) -> None:
    (bundle / "config.json").write_text(text)
    _relist(bundle, "config.json")


def _gate(bundle: Path, match: str) -> None:
    """open_bundle, load and the CLI's verify and inspect all refuse it, in one line naming it."""
    from moestream.cli import main

    with pytest.raises(BundleError, match=match):
        open_bundle(bundle)
    with pytest.raises(BundleError, match=match):
        moestream.load(bundle)
    for argv in (["verify", str(bundle)], ["inspect", str(bundle), "--json"]):
        assert main(argv) == 2


def test_links_out_of_the_bundle_are_refused_wherever_they_are(bundle, tmp_path, capsys):
    outside = tmp_path / "secret.txt"
    outside.write_text('{"chat_template": "{{ 1 }}"}')
    cases = [
        ("bundle.json", "bundle.json"),
        ("chat_template.jinja", "chat_template.jinja: a link to"),
        ("additional_chat_templates/tool.jinja", "additional_chat_templates/tool.jinja: a link to"),
        ("profile/frequency.parquet", "profile/frequency.parquet: a link to"),
    ]
    for rel, match in cases:
        target = bundle / rel
        saved = target.read_bytes() if target.is_file() else None
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        os.symlink(outside, target)
        _gate(bundle, match)
        assert capsys.readouterr().err.count("\n") == 2, "one line per refusal"
        target.unlink()
        if saved is not None:
            target.write_bytes(saved)
    open_bundle(bundle)


def test_sizes_from_config_are_checked_before_a_model_is_built(bundle):
    import time

    _edit_config(bundle, lambda c: c.update(num_hidden_layers=1_000_000))
    start = time.perf_counter()
    _gate(bundle, r"num_hidden_layers must be an integer in \[1, 1024\]")
    assert time.perf_counter() - start < 10, "refused at once, not after building a million layers"
    _edit_config(bundle, lambda c: c.update(num_hidden_layers=3, hidden_size=0))
    _gate(bundle, "hidden_size must be an integer")
    _edit_config(bundle, lambda c: c.update(hidden_size=64.0))
    _gate(bundle, "hidden_size must be an integer")
    _edit_config(bundle, lambda c: c.update(hidden_size=64, model_type="base"))
    _gate(bundle, "config.json: .*'base'")


def test_json_too_deep_or_of_the_wrong_shape(bundle):
    _write_config(bundle, "[" * 5000 + "]" * 5000)
    _gate(bundle, "config.json: (nested deeper|expected a JSON dict)")
    _write_config(bundle, "[1, 2]")
    _gate(bundle, "config.json: expected a JSON dict")


def test_bundle_json_fields_are_typed(bundle):
    original = json.loads((bundle / "bundle.json").read_text())
    for change, match in (
        (lambda m: m.update(experts="four"), "'experts' must be an object"),
        (lambda m: m["experts"].update(num_experts=-1), "experts.num_experts must be an integer"),
        (lambda m: m["layers"][0].update(module="model.layers.0.mlp..x"), "not a dotted module path"),
        (lambda m: m["layers"][0].update(layer="0"), r"layers\[0\].layer must be an integer"),
        (lambda m: m["files"]["config.json"].update(nbytes=None), r"files\['config.json'\].nbytes must be an integer"),
        (lambda m: m.pop("layers"), "missing 'layers'"),
    ):
        data = json.loads(json.dumps(original))
        change(data)
        (bundle / "bundle.json").write_text(json.dumps(data))
        _gate(bundle, match)


def test_layout_rows_must_be_what_the_model_holds(bundle):
    def rename(extents):
        e = extents[5]
        tensors = tuple(dataclasses.replace(t, name=t.name.replace("gate_proj", "gate_x")) for t in e.tensors)
        extents[5] = dataclasses.replace(e, tensors=tensors)
        return extents

    _rewrite_layout(bundle, rename)
    _gate(bundle, r"layer \d+ expert \d+: no gate_proj.weight")


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_a_layout_with_too_many_rows_is_refused_before_it_is_read(bundle):
    import time

    def grow(extents):
        return extents * 2000  # ~96k rows of a 48-row model

    _rewrite_layout(bundle, grow)
    start = time.perf_counter()
    _gate(bundle, "rows, but bundle.json's layers and experts make 48")
    assert time.perf_counter() - start < 10


def test_resident_header_is_checked_before_mlx_reads_it(bundle):
    import struct

    path = bundle / "resident.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    path.write_bytes(bytes(data))
    _relist(bundle, "resident.safetensors")
    _gate(bundle, "resident.safetensors: .*header length")


def test_profile_rows_must_be_experts_of_the_bundle(tmp_path, synth_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import build_bundle

    b = build_bundle(synth_dir("qwen3_moe"), tmp_path / "profiled", profile=True, profile_tokens=256)
    table = pq.read_table(b / "profile" / "frequency.parquet")
    experts = table.column("expert").to_pylist()
    experts[0] = 10**9
    pq.write_table(table.set_column(table.schema.get_field_index("expert"), "expert", pa.array(experts, pa.int32())),
                   b / "profile" / "frequency.parquet")
    _relist(b, "profile/frequency.parquet")
    _gate(b, "profile/frequency.parquet row 0")


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_a_template_that_never_finishes_is_refused_at_load(bundle):
    import time

    (bundle / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}")
    _relist(bundle, "chat_template.jinja")
    start = time.perf_counter()
    with pytest.raises(BundleError, match="chat template did not finish"):
        moestream.load(bundle)
    assert time.perf_counter() - start < 30


def test_tokenizer_files_of_the_wrong_shape(bundle):
    (bundle / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    _relist(bundle, "tokenizer.json")
    with pytest.raises(BundleError, match="the tokenizer files"):
        moestream.load(bundle)


def test_zstd_extents_are_bounded_by_their_row(bundle):
    """A zstd frame claiming more bytes than its row (or raw bytes marked zstd) is a named error."""
    import mlx.core as mx

    _rewrite_layout(bundle, lambda extents: [dataclasses.replace(e, codec="zstd") if e.layer == 1 else e
                                             for e in extents])
    with moestream.load(bundle) as (model, _):
        with pytest.raises(BundleError, match=r"layer 1 expert \d+ .*(zstd frame|checksum)"):
            mx.eval(model(mx.array([[3, 17, 42, 7]])))


def test_verify_rejects_what_load_would(bundle):
    """A tokenizer file that parses as JSON but not as a tokenizer passes the structural gate;
    `moestream verify` still refuses it, as load does."""
    from moestream.cli import main

    (bundle / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    _relist(bundle, "tokenizer.json")
    open_bundle(bundle, verify=True)
    assert main(["verify", str(bundle)]) == 2


def test_a_template_that_renders_a_flood_is_refused_at_load(bundle):
    (bundle / "chat_template.jinja").write_text("{% for i in range(100000) %}{{ messages }}{% endfor %}")
    _relist(bundle, "chat_template.jinja")
    with pytest.raises(BundleError, match="would flood every prompt"):
        moestream.load(bundle)


@pytest.mark.parametrize("rel", ["chat_template.jinja", "additional_chat_templates/x.jinja", "tokenizer.model"])
def test_an_unlisted_file_the_loaders_read_is_refused(bundle, rel):
    (bundle / rel).parent.mkdir(exist_ok=True)
    (bundle / rel).write_text("{{ 'planted' }}")
    _gate(bundle, f"{rel}: in the bundle but not listed")


def test_unlisted_files_no_loader_reads_are_allowed(bundle):
    (bundle / "README.md").write_text("# a model card")
    (bundle / "quality.json").write_text("{}")
    open_bundle(bundle)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("resident"), "missing 'resident'"),
    (lambda m: m["layout"].pop("expert_bytes_per_token"), "layout.expert_bytes_per_token"),
    (lambda m: m["files"].__setitem__("x" * 70000, {"nbytes": 1, "checksum": None}), "is not a relative file path"),
    (lambda m: m["files"].__setitem__("../up", {"nbytes": 1, "checksum": None}), "is not a relative file path"),
])
def test_bundle_json_fields_every_reader_needs(bundle, edit, match):
    _edit_json(bundle / "bundle.json", edit)
    _gate(bundle, match)


def _edit_layout_row(bundle: Path, fn) -> None:
    """Row 0 of layout.parquet changed by fn(tensors: list[dict]), the file relisted."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(bundle / "layout.parquet")
    rows = table.to_pylist()
    tensors = _json.loads(rows[0]["tensors"]) if isinstance(rows[0]["tensors"], str) else rows[0]["tensors"]
    fn(tensors)
    rows[0]["tensors"] = _json.dumps(tensors) if isinstance(rows[0]["tensors"], str) else tensors
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bundle / "layout.parquet")
    _relist(bundle, "layout.parquet")


def test_tensors_overlapping_in_an_extent_are_refused(bundle):
    def overlap(tensors):
        tensors[1]["offset"] = tensors[0]["offset"]
    _edit_layout_row(bundle, overlap)
    _gate(bundle, "overlap")


def test_a_tensor_moved_off_its_alignment_is_refused(bundle):
    def nudge(tensors):
        tensors[-1]["offset"] += 1
    _edit_layout_row(bundle, nudge)
    _gate(bundle, "aligned")


def _write_resident_header(bundle: Path, edit) -> None:
    import json as _json
    import struct

    p = bundle / "resident.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = _json.loads(raw[8:8 + n])
    edit(header)
    text = _json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    _relist(bundle, "resident.safetensors")


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.__setitem__("__metadata__", {"format": 3}), "__metadata__"),
    (lambda h: h.__setitem__(next(k for k in h if k != "__metadata__"), {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [-4, 0]}), "data_offsets"),
    (lambda h: h.__setitem__("zz", dict(h[next(k for k in h if k != "__metadata__")])), "overlap"),
])
def test_resident_headers_mlx_would_misread_are_refused(bundle, edit, match):
    _write_resident_header(bundle, edit)
    _gate(bundle, match)
    with pytest.raises(BundleError, match=match):
        moestream.plan_memory(bundle)


def test_an_error_quoting_a_huge_value_stays_a_readable_line(bundle, capsys):
    from moestream.cli import MAX_ERROR_CHARS, main

    _edit_json(bundle / "bundle.json", lambda m: m["experts"].__setitem__("num_experts", "x" * 1_000_000))
    assert main(["inspect", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < MAX_ERROR_CHARS + 200 and "more characters" in err


def test_whole_extent_fast_checksums_are_still_checked(bundle):
    """The first format 2 bundles carry one xxh3 digest per extent (not per MiB block): still read,
    and still checked on every read."""
    import mlx.core as mx
    import xxhash

    def whole(extents):
        out = []
        for e in extents:
            with open(bundle / e.file, "rb") as f:
                f.seek(e.offset)
                out.append(dataclasses.replace(e, fast_checksum=f"xxh3_64:{xxhash.xxh3_64_hexdigest(f.read(e.nbytes))}"))
        return out

    _rewrite_layout(bundle, whole)
    open_bundle(bundle, verify=True)
    with moestream.load(bundle) as (model, _):
        mx.eval(model(mx.array([[3, 17, 42, 7]])))
    for expert in range(16):
        _flip_byte(bundle, 1, expert, at=100 + expert)
    with moestream.load(bundle) as (model, _):
        with pytest.raises(BundleError, match=r"layer 1 expert \d+ .*do not match the extent's checksum"):
            mx.eval(model(mx.array([[3, 17, 42, 7, 99, 5, 23, 64]])))


@pytest.mark.parametrize("value,match", [
    ("md5:00", "is not 'xxh3_64/1MiB:<hex>'"),
    ("xxh3_64/1MiB:abc", r"1 digest\(s\) of 16 lowercase hex digits expected"),
    ("xxh3_64/1MiB:" + "g" * 16, "lowercase hex"),
])
def test_a_malformed_fast_checksum_is_refused_naming_the_row(bundle, value, match):
    _rewrite_layout(bundle, lambda extents: [dataclasses.replace(e, fast_checksum=value) if i == 5 else e
                                             for i, e in enumerate(extents)])
    with pytest.raises(BundleError, match=rf"layout.parquet row 5 \(layer \d+, expert \d+\): fast_checksum .*{match}"):
        open_bundle(bundle)


def test_fast_checksum_has_one_digest_per_mib_block():
    from moestream.manifests.bundle import fast_checksum, parse_fast_checksum

    data = bytearray(random.Random(0).randbytes((5 << 20) // 2))  # 2.5 MiB: blocks of 1, 1 and 0.5 MiB
    sums = parse_fast_checksum(fast_checksum(data), len(data))
    assert sums.block_bytes == 1 << 20 and len(sums.digests) == 3 and sums.matches(data)
    data[(2 << 20) + 7] ^= 1
    assert not sums.matches(data)
    assert [sums.block_matches(k, data[k << 20 : (k + 1) << 20]) for k in range(3)] == [True, True, False]
