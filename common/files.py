"""Files and folders written atomically: to a temporary name beside the target, flushed to disk,
then renamed into place, so that a crash or a full disk leaves the old file or none, never half
of a new one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MoestreamError

TEMPORARY_PREFIX = ".tmp-"


def is_temporary(name: str) -> bool:
    """A file `atomic_path` was writing (left behind only by a killed process)."""
    return name.startswith(TEMPORARY_PREFIX)


class WriteError(MoestreamError, OSError):
    """A file could not be written (a full disk, a file size limit, no permission); names the
    file and the cause. Its temporary file is removed."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it is fsynced and renamed to `path`,
    on error removed. The temporary name ends like `path` (writers that add a missing suffix,
    such as mx.save_safetensors, keep it) and starts with TEMPORARY_PREFIX. A failure to write
    (an OSError, or the RuntimeError MLX raises without an errno) is a WriteError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, MoestreamError):
            tmp.unlink(missing_ok=True)
            raise
        cause = _cause(e, tmp)
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {cause}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cause(e: BaseException, tmp: Path) -> str:
    """What stopped a write, in words: the errno's text; where the writer gave none (MLX says only
    "Unable to write N bytes"), the errno of writing a little more to the same file ourselves."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.strerror or str(e)
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        with open(tmp, "ab") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return f"{probe.strerror or probe} ({message})"
    return message


def write_atomic(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | Path, obj, **dumps) -> None:
    """JSON with sorted keys and a 2-space indent (as transformers writes config.json)."""
    options = {"indent": 2, "sort_keys": True, **dumps}
    write_atomic(path, json.dumps(obj, **options) + "\n")


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file  # a folder's entries are made durable the same way


def replace_dir(new: Path, out: Path) -> None:
    """Rename the finished folder `new` to `out`; an existing `out` is moved aside first and
    deleted afterwards, so `out` is always either the old folder or the new one."""
    new, out = Path(new), Path(out)
    if not out.exists():
        os.replace(new, out)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def tree_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` now, links counted as links (an HF cache snapshot's links to
    its blobs are not the blobs twice); files removed meanwhile count as nothing."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total
