"""A bundle is untrusted input: each kind of damage gets a clear error naming the file and row,
both from the format's reader and from `moestream.load` (before any token is produced)."""

from __future__ import annotations

import dataclasses
import json
import os
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
