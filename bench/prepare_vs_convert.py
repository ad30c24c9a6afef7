"""Preparation cost: `moestream prepare` (the Prefect flow) vs the same steps without Prefect vs
`mlx_lm.convert` quantizing only the experts, on one synth checkpoint, in one run.

Each job runs in its own subprocess, started cold (the checkpoint's pages evicted from the page
cache first), and is measured by wall time (launch to exit, imports and Prefect's embedded server
included), the peak RSS of its whole process tree (sampled: Prefect's embedded server is a
subprocess of `moestream prepare`) and the kernel's peak RSS of its largest process (ru_maxrss).

Jobs (each run --repeats times, interleaved so that machine noise hits them alike):
  prepare   moestream prepare SRC --out B --expert-bits 4 --group-size 64 (the flow, 2 threads)
  plain     the same with --engine plain: the same steps in one process, no Prefect
  dask      the same with --workers N: the flow's per-layer tasks on a local Dask cluster
  convert   mlx_lm.convert(quantize=True, q_bits=4, q_group_size=64) of the experts only
            (SwitchLinear, the `switch_mlp` projections; everything else stays bf16)

Then `moestream verify` on the flow's bundle, and a byte-for-byte check that every expert tensor
(and every resident tensor) of the bundle equals mlx_lm.convert's output.

    python bench/prepare_vs_convert.py [--preset small] [--family qwen3_moe] [--layers N] [--source DIR]
        [--jobs prepare,plain,convert] [--workers 2] [--repeats 2] [--workdir DIR] [--json FILE] [--keep]

Figures are printed, never asserted: the machine is shared and noisy; ratios come from one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import common

TARGET_WALL, TARGET_RSS = 1.2, 0.5  # the targets: prepare / convert


# ---------------------------------------------------------------- measuring a process tree


class TreeRSS:
    """Samples the summed RSS of a process and all its descendants until stopped; also each
    process's peak RSS and CPU time as last seen."""

    def __init__(self, pid: int, interval: float = 0.025):
        import psutil  # with the prepare extra (Dask's distributed requires it)

        self.root, self.interval = psutil.Process(pid), interval
        self.peak = self.peak_procs = 0
        self.per_process: dict[int, list] = {}  # pid -> [peak RSS, command line, CPU s]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = procs = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    rss, cpu = p.memory_info().rss, sum(p.cpu_times()[:2])
                    if p.pid not in self.per_process:
                        cmd = " ".join(Path(w).name if w.startswith("/") else w for w in p.cmdline())
                        self.per_process[p.pid] = [0, cmd[:90], 0.0]
                    entry = self.per_process[p.pid]
                except psutil.Error:
                    continue
                entry[0], entry[2] = max(entry[0], rss), max(entry[2], cpu)
                total, procs = total + rss, procs + 1
            if total > self.peak:
                self.peak, self.peak_procs = total, procs
            self._stop.wait(self.interval)


def run_measured(cmd: list[str], log: Path, env: dict) -> dict:
    """Run cmd (output to log): wall time, tree peak RSS, largest single process's ru_maxrss."""
    with open(log, "wb") as out:
        started, t0 = dt.datetime.now(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        with TreeRSS(proc.pid) as tree:
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "wall_s": wall, "tree_peak_rss_bytes": tree.peak, "tree_peak_procs": tree.peak_procs,
            "max_single_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
            "cpu_s": usage.ru_utime + usage.ru_stime, "started": started.isoformat(), "log": str(log),
            "per_process": sorted((v for v in tree.per_process.values() if v[0]), key=lambda v: -v[0]),
            "tail": "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if rc else ""}


_PREFECT_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+ +\| (.*)$")
_PREFECT_MARKS = (("server_starting", "Starting temporary server"), ("flow_begins", "Beginning flow run"),
                  ("flow_finished", "Finished in state"), ("server_stopping", "Stopping temporary server"))


def prefect_phases(log: Path, started: str, wall: float) -> dict:
    """A flow run split into launch to flow start (imports + embedded server), flow body and after
    the flow (server stop, exit), from the timestamps of Prefect's own log lines."""
    t0 = dt.datetime.fromisoformat(started)
    marks: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _PREFECT_LINE.match(line)
        if not m:
            continue
        h, mi, s, ms, msg = m.groups()
        t = t0.replace(hour=int(h), minute=int(mi), second=int(s), microsecond=int(ms) * 1000)
        t += dt.timedelta(days=1) if t < t0 - dt.timedelta(seconds=1) else dt.timedelta()  # past midnight
        for name, text in _PREFECT_MARKS:
            if text in msg and (name != "flow_finished" or msg.startswith("Flow run")):
                marks[name] = (t - t0).total_seconds()
    out = {"marks_s": marks}
    if {"flow_begins", "flow_finished"} <= set(marks):
        out.update(to_flow_start_s=marks["flow_begins"], flow_body_s=marks["flow_finished"] - marks["flow_begins"],
                   after_flow_s=wall - marks["flow_finished"])
    return out


# ---------------------------------------------------------------- the convert job and the byte check


def child_convert(src: str, out: str) -> None:
    from mlx_lm.convert import convert
    from mlx_lm.models.switch_layers import SwitchLinear

    convert(src, out, quantize=True, q_bits=4, q_group_size=64,
            quant_predicate=lambda path, module: isinstance(module, SwitchLinear))


def compare_outputs(bundle: Path, converted: Path) -> dict:
    """Every expert tensor of the bundle vs the same rows of convert's stacked switch_mlp tensors,
    byte for byte; and every resident tensor vs convert's tensor of that name."""
    from moestream.manifests.open import open_bundle
    from moestream.manifests.safetensors_index import index_folder

    def pread(path: Path, offset: int, n: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(n)

    b, conv, resident = open_bundle(bundle), index_folder(converted), index_folder(bundle)
    bad, checked, nbytes = [], 0, 0
    for (layer, expert), ext in sorted(b.extents.items()):
        for entry in ext.tensors:
            name = f"{b.layers[layer]}.{entry.name}"
            info = conv.get(name)
            checked += 1
            nbytes += entry.nbytes
            if info is None:
                bad.append(f"{name}: not in convert's output")
                continue
            off, n = info.rows_range(expert, expert + 1)
            if info.dtype != entry.dtype or pread(b.path(ext.file), ext.offset + entry.offset, entry.nbytes) != pread(info.file, off, n):
                bad.append(f"{name}[{expert}]: bytes differ")
    for name, info in resident.items():
        other = conv.get(name)
        if other is None or (other.dtype, other.shape) != (info.dtype, info.shape) or \
                pread(info.file, info.offset, info.nbytes) != pread(other.file, other.offset, other.nbytes):
            bad.append(f"resident {name}: differs from convert's")
    return {"expert_tensors_checked": checked, "expert_bytes_checked": nbytes, "resident_tensors_checked": len(resident),
            "differences": len(bad), "examples": bad[:5], "same": not bad}


# ---------------------------------------------------------------- driver


def moestream_cmd() -> list[str]:
    exe = shutil.which("moestream")
    return [exe] if exe else [sys.executable, "-m", "moestream.cli"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset")
    ap.add_argument("--source", default=None, help="a checkpoint folder to prepare instead of a synth one")
    ap.add_argument("--workdir", default="/tmp/moestream-bench-prepare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jobs", default="prepare,plain,convert", help="comma list of prepare, plain, dask, convert")
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes of the dask job")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the last round")
    ap.add_argument("--child-convert", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_convert:
        child_convert(*args.child_convert)
        return 0

    from moestream.runtime.io.pagecache import evict_page_cache, page_cache_bytes

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.source) if args.source else common.synth(work, args.family, args.preset, args.layers)[0]
    inputs = sorted(p for p in src.rglob("*") if p.is_file())
    prepare = moestream_cmd() + ["prepare", str(src), "--expert-bits", "4", "--group-size", "64", "--out"]
    commands = {"prepare": lambda out: prepare + [str(out)],
                "plain": lambda out: prepare + [str(out), "--engine", "plain"],
                "dask": lambda out: prepare + [str(out), "--workers", str(args.workers)],
                "convert": lambda out: [sys.executable, str(Path(__file__).resolve()), "--child-convert", str(src), str(out)]}
    jobs = [j for j in args.jobs.split(",") if j]
    if set(jobs) - set(commands):
        ap.error(f"unknown jobs {sorted(set(jobs) - set(commands))}; known: {', '.join(commands)}")
    # the CLI imports prefect before flows/ can raise the embedded server's 20 s start timeout: a busy
    # machine times out without this (a user's own setting wins)
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
    print(common.setup_line())
    print(f"source: {src} ({sum(p.stat().st_size for p in inputs) / 1e6:.0f} MB in {len(inputs)} files); "
          f"{args.repeats} rounds, each job cold (inputs evicted from the page cache)", flush=True)

    runs = []
    for rnd in range(1, args.repeats + 1):
        for job in jobs:
            out = work / f"out-{job}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            evict_page_cache(inputs)
            r = {"job": job, "round": rnd, "inputs_cached_before_bytes": page_cache_bytes(inputs)}
            r.update(run_measured(commands[job](out), work / f"{job}-{rnd}.log", env))
            if job in ("prepare", "dask"):
                r["phases"] = prefect_phases(Path(r["log"]), r["started"], r["wall_s"])
            runs.append(r)
            print(f"  round {rnd} {job:<8} rc {r['rc']}  wall {r['wall_s']:6.2f} s  tree peak RSS "
                  f"{r['tree_peak_rss_bytes'] / 1e6:5.0f} MB ({r['tree_peak_procs']} procs)", flush=True)
            if r["rc"]:
                print(r["tail"])

    convert = {r["round"]: r for r in runs if r["job"] == "convert" and not r["rc"]}
    for r in runs:
        c = convert.get(r["round"])
        r["wall_vs_convert"] = r["wall_s"] / c["wall_s"] if c and not r["rc"] else None
        r["rss_vs_convert"] = r["tree_peak_rss_bytes"] / c["tree_peak_rss_bytes"] if c and not r["rc"] else None
    print("\nper round; ratios against mlx_lm.convert of the same round (tree RSS: every process of the job, "
          "summed, sampled; largest: the kernel's peak of its largest process)")
    print(common.table(runs, [
        ("job", "job", ""), ("round", "round", "d"), ("wall s", "wall_s", ".2f"),
        ("tree RSS MB", lambda r: r["tree_peak_rss_bytes"] / 1e6, ".0f"),
        ("largest MB", lambda r: r["max_single_rss_bytes"] / 1e6, ".0f"), ("CPU s", "cpu_s", ".1f"),
        ("wall/convert", "wall_vs_convert", ".2f"), ("RSS/convert", "rss_vs_convert", ".2f")]))
    for r in runs:
        if len(r["per_process"]) > 1:
            print(f"{r['job']} round {r['round']} per process (peak RSS, CPU s): "
                  + "; ".join(f"{n / 1e6:.0f} MB, {cpu:.1f} s: {cmd[:60]}" for n, cmd, cpu in r["per_process"][:4]))
        p = r.get("phases", {})
        if "flow_body_s" in p:
            print(f"{r['job']} round {r['round']}: launch to flow start {p['to_flow_start_s']:.2f} s (imports + embedded "
                  f"server), flow body {p['flow_body_s']:.2f} s, after the flow {p['after_flow_s']:.2f} s")
    if convert:
        print(f"targets (issue): prepare wall <= {TARGET_WALL}x convert, prepare peak RSS <= {TARGET_RSS}x convert")
    print(f"load average at end {os.getloadavg()[0]:.1f}")

    checks = {}
    bundle = next((work / f"out-{j}" for j in ("prepare", "plain", "dask") if (work / f"out-{j}").is_dir()), None)
    if bundle:
        v = subprocess.run(moestream_cmd() + ["verify", str(bundle)], capture_output=True, text=True)
        checks["verify"] = {"rc": v.returncode, "output": (v.stdout + v.stderr).strip()[-500:]}
        print(f"moestream verify {bundle}: exit {v.returncode}: {checks['verify']['output']}")
        if (work / "out-convert").is_dir():
            cmp = checks["same_bytes_as_convert"] = compare_outputs(bundle, work / "out-convert")
            print(f"bundle vs mlx_lm.convert: {cmp['expert_tensors_checked']} expert tensors "
                  f"({cmp['expert_bytes_checked'] / 1e6:.0f} MB) and {cmp['resident_tensors_checked']} resident tensors "
                  f"checked, {cmp['differences']} differ -> {'SAME' if cmp['same'] else 'DIFFERENT'}")
            for ex in cmp["examples"]:
                print(f"  {ex}")
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "source": str(src), "runs": runs,
                                  "checks": checks})
    if not args.keep:
        for job in jobs:
            shutil.rmtree(work / f"out-{job}", ignore_errors=True)
    return 1 if any(r["rc"] for r in runs) or checks.get("verify", {}).get("rc") else 0


if __name__ == "__main__":
    sys.exit(main())
