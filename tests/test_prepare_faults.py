"""Preparing into a disk that fills up: one line naming the file and the cause, no temporary file
left, nothing a verify would accept; a rerun with room resumes. The full disk is a file size limit
(RLIMIT_FSIZE) on the preparing process: writes past it fail as ENOSPC's cousin EFBIG would, and
MLX's own writer fails the same way, without an errno."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moestream.common.files import is_temporary

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs setrlimit in a child process")]

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
limit, when = int(sys.argv[1]), sys.argv[2]

def fill_up():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

if when == "now":
    fill_up()
else:  # the disk fills up once the layers are packed, while the resident weights are written
    import moestream.stages.write as write
    real = write.write_resident
    def write_resident(*args):
        fill_up()
        return real(*args)
    write.write_resident = write_resident
from moestream.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _prepare(src, out, limit: int, when: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), when, "prepare", str(src), "--out", str(out),
                           "--engine", "plain"], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["experts/layer_000.bin", "resident.safetensors"])
def test_a_full_disk_is_one_line_naming_the_file_and_a_rerun_resumes(tmp_path, synth_dir, bundle_dir, where):
    src, out = synth_dir("qwen3_moe"), tmp_path / "bundle"
    done = bundle_dir("qwen3_moe")  # the same preparation with room: its file sizes
    limit = (done / where).stat().st_size // 2
    failed = _prepare(src, out, limit, "now" if where.startswith("experts") else "resident")
    assert failed.returncode == 2, failed.stderr[-2000:]
    lines = [line for line in failed.stderr.strip().splitlines() if not line.startswith("layer ")]  # progress lines
    assert len(lines) == 1 and where in lines[0] and ("too large" in lines[0] or "space" in lines[0]), lines
    staging = out.parent / f".{out.name}.partial"
    assert not out.exists()
    assert not [p for p in staging.rglob("*") if is_temporary(p.name)], "temporary files removed"
    verify = subprocess.run([sys.executable, "-m", "moestream.cli", "verify", str(staging)], capture_output=True, text=True)
    assert verify.returncode == 2, "nothing a verify accepts is left"
    again = subprocess.run([sys.executable, "-m", "moestream.cli", "prepare", str(src), "--out", str(out), "--engine",
                            "plain"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert subprocess.run([sys.executable, "-m", "moestream.cli", "verify", str(out)]).returncode == 0
