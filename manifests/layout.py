"""layout.parquet: one row per (layer, expert) saying where its extent lives and what it holds."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .bundle import BundleError, ExpertExtent, TensorEntry
from .profile import write_table

TENSOR_TYPE = pa.struct(
    [
        ("name", pa.string()),
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("bits", pa.int32()),
        ("group_size", pa.int32()),
        ("mode", pa.string()),
    ]
)

SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("expert", pa.int32()),
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("checksum", pa.string()),
        ("codec", pa.string()),
        ("raw_nbytes", pa.int64()),
        ("tensors", pa.list_(TENSOR_TYPE)),
        ("fast_checksum", pa.string()),  # format 2
    ]
)
OPTIONAL = ("fast_checksum",)  # absent in format 1


def write_layout(path: Path, extents: list[ExpertExtent]) -> None:
    """Write layout.parquet atomically (temp name, fsync, rename)."""
    rows = sorted(extents, key=lambda e: (e.layer, e.expert))
    columns = {name: [] for name in SCHEMA.names}
    for e in rows:
        for name in SCHEMA.names:
            if name == "tensors":
                columns[name].append(
                    [
                        {
                            "name": t.name, "offset": t.offset, "nbytes": t.nbytes, "dtype": t.dtype,
                            "shape": list(t.shape), "bits": t.bits, "group_size": t.group_size, "mode": t.mode,
                        }
                        for t in e.tensors
                    ]
                )
            else:
                columns[name].append(getattr(e, name))
    write_table(pa.table(columns, schema=SCHEMA), path)


def read_layout(path: Path, expected_rows: int | None = None) -> list[ExpertExtent]:
    """Read layout.parquet, checking its columns, types and (before reading it whole) its row
    count; rows are not validated here."""
    try:
        if expected_rows is not None and (n := pq.ParquetFile(path).metadata.num_rows) != expected_rows:
            raise BundleError(f"{path}: {n} rows, but bundle.json's layers and experts make {expected_rows}")
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleError(f"{path}: cannot read as Parquet ({e})") from None
    for name in OPTIONAL:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SCHEMA.field(name).type))
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise BundleError(f"{path}: missing columns {missing}")
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise BundleError(f"{path}: columns have the wrong types ({e})") from None
    extents = []
    for i, row in enumerate(table.to_pylist()):
        if any(row[n] is None for n in SCHEMA.names if n not in OPTIONAL):
            raise BundleError(f"{path} row {i}: null in a required column")
        try:
            tensors = tuple(
                TensorEntry(
                    name=t["name"], offset=t["offset"], nbytes=t["nbytes"], dtype=t["dtype"],
                    shape=tuple(t["shape"]), bits=t["bits"], group_size=t["group_size"], mode=t["mode"],
                )
                for t in row["tensors"]
            )
        except (TypeError, KeyError) as e:
            raise BundleError(f"{path} row {i}: malformed tensor list ({e})") from None
        for t in tensors:
            if None in (t.name, t.offset, t.nbytes, t.dtype) or None in t.shape:
                raise BundleError(f"{path} row {i}: tensor {t.name!r} has a null name, offset, size, dtype or dimension")
        extents.append(
            ExpertExtent(
                layer=row["layer"], expert=row["expert"], file=row["file"], offset=row["offset"],
                nbytes=row["nbytes"], checksum=row["checksum"], codec=row["codec"],
                raw_nbytes=row["raw_nbytes"], tensors=tensors, fast_checksum=row["fast_checksum"],
            )
        )
    return extents
