"""Peak disk and peak RSS of preparing a checkpoint by Hub repo id, with and without --drop-source-shards.

    python bench/prepare_by_repo.py --workdir /tmp/prepare-by-repo [--family qwen3_moe] [--preset small]
        [--layers 8] [--bits 4] [--json results.json]

A synth checkpoint (made once in the work folder) is put on the fake Hub of tests/hf_fake.py:
huggingface_hub's real client over an injected HTTP transport, the files streamed from disk so that
the checkpoint does not sit in the preparing process's memory. Each variant runs in a process of its
own with an empty HF cache and prepares with the plain engine (no Prefect): peak RSS is that
process's ru_maxrss (imports included; the RSS just before preparing is printed beside it); peak
disk is what moestream reports: the bundle being made, its work folder and the repo's shards in the
HF cache, sampled after every download and every step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
from moestream.common.files import tree_bytes

REPO = "bench/synth-moe"
VARIANTS = {"keep": False, "drop": True}  # variant -> drop_source_shards
TESTS = Path(__file__).resolve().parent.parent / "tests"  # hf_fake.py


def _rss_now() -> int:
    with open("/proc/self/statm") as f:  # Linux; elsewhere, psutil
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def child(args) -> dict:
    """One variant, in this (fresh) process: serve the checkpoint, prepare it by repo id."""
    import pytest

    sys.path.insert(0, str(TESTS))
    from hf_fake import DiskFile, FakeHub, hub_env

    import moestream

    home = Path(args.workdir) / f"hub-{args.child}"
    shutil.rmtree(home, ignore_errors=True)
    patch = pytest.MonkeyPatch()
    hub_env(patch, home, offline=False)  # an empty HF cache of its own
    source = Path(args.source)
    hub = FakeHub()
    hub.add_repo(REPO, {p.name: DiskFile(p) for p in sorted(source.iterdir()) if p.is_file()})
    out = Path(args.workdir) / f"bundle-{args.child}"
    rss_before = _rss_now()
    with hub.installed():
        t = time.perf_counter()
        result = moestream.prepare(REPO, out, engine="plain", expert_bits=args.bits, overwrite=True,
                                   drop_source_shards=VARIANTS[args.child])
        seconds = time.perf_counter() - t
    cache = home / "hf_home" / "hub"
    left = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))  # shards still in the cache
    blobs = {f.sha256 for name, f in hub.files(REPO).items() if name.endswith(".safetensors")}
    downloads = [r for r in hub.requests if r.method == "GET" and r.url.rsplit("/", 1)[-1] in blobs
                 and (r.range is None or not r.range.endswith("99999"))]  # not the header reads
    row = {"variant": args.child, "drop_source_shards": VARIANTS[args.child], "peak_disk_bytes": result.peak_disk_bytes,
           "peak_rss_bytes": _peak_rss(), "rss_before_bytes": rss_before, "seconds": seconds,
           "bundle_bytes": tree_bytes(out), "shards_left_bytes": left, "shard_downloads": len(downloads)}
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    patch.undo()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/moestream-bench/prepare-by-repo")
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--preset", default="small", help="synth preset: tiny, small (~110 MB a layer in 256 MB shards)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--variants", default="keep,drop", help="keep (the shards stay in the cache), drop (--drop-source-shards)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source, _ = common.synth(work, args.family, args.preset, args.layers)
    shards = sorted(source.glob("*.safetensors"))
    source_bytes = sum(s.stat().st_size for s in shards)
    print(common.setup_line())
    print(f"source: {args.family} {args.preset}, {args.layers} layers, {len(shards)} shards, {source_bytes / 1e6:.1f} MB "
          f"(largest shard {max(s.stat().st_size for s in shards) / 1e6:.1f} MB); expert bits {args.bits}", flush=True)
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--source", str(source), "--workdir", str(work),
               "--bits", str(args.bits)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mb = 1e6
    print(common.table(rows, [
        ("variant", "variant", ""),
        ("peak disk MB", lambda r: r["peak_disk_bytes"] / mb, ".1f"),
        ("peak RSS MB", lambda r: r["peak_rss_bytes"] / mb, ".1f"),
        ("RSS before MB", lambda r: r["rss_before_bytes"] / mb, ".1f"),
        ("bundle MB", lambda r: r["bundle_bytes"] / mb, ".1f"),
        ("shards left MB", lambda r: r["shards_left_bytes"] / mb, ".1f"),
        ("shard downloads", "shard_downloads", "d"),
        ("seconds", "seconds", ".1f"),
    ]))
    common.write_json(args.json, {"setup": common.setup_line(), "source_bytes": source_bytes, "shards": len(shards),
                                  "family": args.family, "preset": args.preset, "layers": args.layers, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
