"""Preparation cost: `moestream prepare` (Prefect flow) vs the same stages without Prefect vs
`mlx_lm.convert` quantizing only the experts, on one synth checkpoint, in one run.

Each job runs in its own subprocess, started cold (the checkpoint's pages are evicted from the
page cache with posix_fadvise(DONTNEED) first, after a sync), and is measured by
- wall time (launch to exit, imports and Prefect's embedded server included),
- peak RSS of its whole process tree (sum of every descendant's RSS, sampled from /proc every
  few tens of ms: Prefect's embedded server is a subprocess of `moestream prepare`),
- the kernel's exact peak RSS of its largest single process (os.wait4's ru_maxrss).

Jobs (each run --repeats times, interleaved so that machine noise hits them alike):
  prepare      `moestream prepare SRC --out B --expert-bits 4 --group-size 64`
  stages       the flow's stage functions in the flow's order, no Prefect, one layer at a time
               (as tests/conftest.py build_bundle does)
  stages-2t    the same with two layers packed at once (the flow's ThreadPoolTaskRunner(2))
  convert      mlx_lm.convert(quantize=True, q_bits=4, q_group_size=64, quant_predicate= only
               SwitchLinear, i.e. the `switch_mlp` experts; everything else stays bf16)

Then `moestream verify` on the bundle, and a byte-for-byte check that every expert tensor (and
every resident tensor) of the bundle equals mlx_lm.convert's output.

usage: python bench/prepare_vs_convert.py [--preset small] [--family qwen3_moe] [--layers N]
           [--workdir /tmp/moestream-bench-prepare] [--repeats 2] [--json FILE] [--keep]

Figures are printed, never asserted: the machine is shared and noisy; ratios come from one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from moestream.runtime.iobench import evict_page_cache, page_cache_bytes

CHILD_TAG = "BENCH_CHILD_JSON "
TARGET_WALL, TARGET_RSS = 1.2, 0.5  # the targets: prepare / convert
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- page cache


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- process-tree RSS


def _ppid_map() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        rest = stat[stat.rfind(b")") + 2 :].split()
        out[int(name)] = int(rest[1])
    return out


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    rest = stat[stat.rfind(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / TICK


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [Path(w.decode(errors="replace")).name if i == 0 or w.startswith(b"/") else w.decode(errors="replace")
             for i, w in enumerate(parts) if w]
    return " ".join(words)[:90]


class TreeRSS:
    """Samples the summed RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.025, rescan: float = 0.2):
        self.pid, self.interval, self.rescan = pid, interval, rescan
        self.peak = 0
        self.peak_procs = 0
        self.samples = 0
        self.per_process: dict[int, list] = {}  # pid -> [peak RSS, short command line, CPU s last seen]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid, ppid in _ppid_map().items():
            children.setdefault(ppid, []).append(pid)
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def _run(self) -> None:
        pids, last_scan = [self.pid], 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            if now - last_scan > self.rescan:
                pids, last_scan = self._descendants(), now
            each = {p: _rss_bytes(p) for p in pids}
            rss = sum(each.values())
            self.samples += 1
            if rss > self.peak:
                self.peak, self.peak_procs = rss, len([p for p in pids if each[p]])
            for p, n in each.items():
                if p not in self.per_process:
                    self.per_process[p] = [0, _cmdline(p), 0.0]
                self.per_process[p][0] = max(self.per_process[p][0], n)
                self.per_process[p][2] = max(self.per_process[p][2], _cpu_s(p))
            self._stop.wait(self.interval)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run cmd, return wall, tree peak RSS, single-process ru_maxrss, exit code, child JSON."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        started = dt.datetime.now()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        with TreeRSS(proc.pid) as tree:
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    child = {}
    for line in text.splitlines():
        if line.startswith(CHILD_TAG):
            child = json.loads(line[len(CHILD_TAG) :])
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "tree_peak_rss_bytes": tree.peak,
        "tree_peak_procs": tree.peak_procs,
        "rss_samples": tree.samples,
        "max_single_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        # [peak RSS, command, CPU s] per process, sampled (CPU: as last seen, a lower bound)
        "per_process": sorted((v for v in tree.per_process.values() if v[0]), key=lambda x: x[0], reverse=True),
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "started": started.isoformat(),
        "child": child,
        "log": str(log),
        "tail": "\n".join(text.splitlines()[-15:]) if proc.returncode else "",
    }


# ---------------------------------------------------------------- Prefect log phases

_PREFECT_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+ +\| (.*)$")


def prefect_phases(log: Path, started: str, wall: float) -> dict:
    """Split a `moestream prepare` run into server start, flow body and shutdown, from the
    timestamps of Prefect's own log lines (time of day, millisecond resolution)."""
    t0 = dt.datetime.fromisoformat(started)
    marks: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _PREFECT_LINE.match(line)
        if not m:
            continue
        h, mi, s, ms, msg = m.groups()
        t = t0.replace(hour=int(h), minute=int(mi), second=int(s), microsecond=int(ms) * 1000)
        if t < t0 - dt.timedelta(seconds=1):
            t += dt.timedelta(days=1)  # crossed midnight
        rel = (t - t0).total_seconds()
        if "Starting temporary server" in msg:
            marks.setdefault("server_starting", rel)
        elif "Beginning flow run" in msg:
            marks.setdefault("flow_begins", rel)
        elif "pack-layer" in msg and "Finished in state" in msg:
            marks["last_layer_done"] = rel
        elif msg.startswith("Task run 'write") and "Finished" in msg:
            marks["write_done"] = rel
        elif msg.startswith("Task run 'verify") and "Finished" in msg:
            marks["verify_done"] = rel
        elif msg.startswith("Flow run") and "Finished in state" in msg:
            marks["flow_finished"] = rel
        elif "Stopping temporary server" in msg:
            marks["server_stopping"] = rel
    out = {"marks_s": marks}
    if "flow_begins" in marks:
        out["to_flow_start_s"] = marks["flow_begins"]  # imports + embedded server start
    if "flow_begins" in marks and "flow_finished" in marks:
        out["flow_body_s"] = marks["flow_finished"] - marks["flow_begins"]
    if "flow_finished" in marks:
        out["after_flow_s"] = wall - marks["flow_finished"]  # artifact, server stop, exit
    return out


# ---------------------------------------------------------------- children


def child_stages(src: str, out: str, workers: int) -> None:
    """The flow's stages without Prefect, in the flow's order (see flows/prepare.py)."""
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    from moestream.manifests.checkpoint import SourceCheckpoint
    from moestream.stages.fetch import fetch_source
    from moestream.stages.pack import LayerJob, pack_layer
    from moestream.stages.quantize import ExpertRecipe
    from moestream.stages.write import SourceInfo, finalize, staging_dir, write_bundle

    times = {"import_s": time.perf_counter() - t0}
    bits, group_size = 4, 64
    t = time.perf_counter()
    fetched = fetch_source(src)
    ckpt = SourceCheckpoint.open(fetched.path)  # the flow's inspect task
    times["fetch_inspect_s"] = time.perf_counter() - t
    out_path = Path(out).absolute()
    recipe = ExpertRecipe(bits=bits, group_size=group_size)
    staging = staging_dir(out_path)
    staging.mkdir(parents=True, exist_ok=True)
    n = ckpt.dims.num_experts
    jobs = [LayerJob(layer, recipe, tuple(range(n)), (bits,) * n) for layer in ckpt.expert_layers]
    t = time.perf_counter()
    if workers > 1:
        with ThreadPoolExecutor(workers) as ex:  # each task opens its own checkpoint, as the flow's does
            parts = list(ex.map(lambda j: pack_layer(SourceCheckpoint.open(fetched.path), j, staging), jobs))
    else:
        parts = [pack_layer(ckpt, j, staging) for j in jobs]
    extents = [e for p in parts for e in p]
    times["pack_s"] = time.perf_counter() - t
    t = time.perf_counter()
    source_info = SourceInfo(fetched.repo_id, fetched.revision, fetched.commit)
    write_bundle(SourceCheckpoint.open(fetched.path), staging, extents, recipe, source_info, None)
    times["write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    finalize(staging, out_path, False)
    times["finalize_verify_s"] = time.perf_counter() - t
    times["total_in_process_s"] = time.perf_counter() - t0
    print(CHILD_TAG + json.dumps(times), flush=True)


def child_convert(src: str, out: str) -> None:
    t0 = time.perf_counter()
    from mlx_lm.convert import convert
    from mlx_lm.models.switch_layers import SwitchLinear

    times = {"import_s": time.perf_counter() - t0}
    t = time.perf_counter()
    # Only the routed experts (SwitchLinear: the `switch_mlp` projections) go to 4 bits; the
    # predicate's False keeps every other Linear (attention, router, lm_head) in bf16.
    convert(src, out, quantize=True, q_bits=4, q_group_size=64,
            quant_predicate=lambda path, module: isinstance(module, SwitchLinear))
    times["convert_s"] = time.perf_counter() - t
    times["total_in_process_s"] = time.perf_counter() - t0
    print(CHILD_TAG + json.dumps(times), flush=True)


# ---------------------------------------------------------------- sanity: same bytes


def compare_outputs(bundle: Path, converted: Path) -> dict:
    """Every expert tensor of the bundle vs the same rows of convert's stacked switch_mlp
    tensors, byte for byte; and every resident tensor vs convert's tensor of that name."""
    from moestream.manifests.open import open_bundle
    from moestream.manifests.safetensors_index import index_folder

    b = open_bundle(bundle)
    conv = index_folder(converted)
    res = index_folder(bundle)  # resident.safetensors
    fds: dict[Path, int] = {}

    def pread(path: Path, offset: int, n: int) -> bytes:
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(fds[path], n, offset)

    checked = mismatched = missing = 0
    expert_bytes = 0
    first_bad = []
    try:
        for (layer, expert), ext in sorted(b.extents.items()):
            module = b.layers[layer]
            for entry in ext.tensors:
                name = f"{module}.{entry.name}"
                info = conv.get(name)
                if info is None:
                    missing += 1
                    first_bad.append(f"{name}: not in convert output")
                    continue
                off, n = info.rows_range(expert, expert + 1)
                ours = pread(b.path(ext.file), ext.offset + entry.offset, entry.nbytes)
                theirs = pread(info.file, off, n)
                checked += 1
                expert_bytes += entry.nbytes
                if ours != theirs or info.dtype != entry.dtype:
                    mismatched += 1
                    first_bad.append(f"{name}[{expert}]: bytes differ ({entry.dtype} vs {info.dtype})")
        res_checked = res_mismatched = 0
        for name, info in res.items():
            other = conv.get(name)
            res_checked += 1
            if other is None or other.dtype != info.dtype or other.shape != info.shape or \
                    pread(info.file, info.offset, info.nbytes) != pread(other.file, other.offset, other.nbytes):
                res_mismatched += 1
                first_bad.append(f"resident {name}: differs from convert's")
    finally:
        for fd in fds.values():
            os.close(fd)
    return {
        "expert_tensors_checked": checked,
        "expert_bytes_checked": expert_bytes,
        "expert_tensors_mismatched": mismatched,
        "expert_tensors_missing": missing,
        "resident_tensors_checked": res_checked,
        "resident_tensors_mismatched": res_mismatched,
        "examples": first_bad[:5],
        "same": not (mismatched or missing or res_mismatched),
    }


# ---------------------------------------------------------------- driver


def moestream_cmd() -> list[str]:
    exe = shutil.which("moestream")
    return [exe] if exe else [sys.executable, "-m", "moestream.cli"]


def mb(n: float) -> str:
    return f"{n / 1e6:8.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset")
    ap.add_argument("--workdir", default="/tmp/moestream-bench-prepare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jobs", default="prepare,stages,stages-2t,convert",
                    help="comma list of prepare, stages, stages-2t, convert")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the last round")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, src, out = args.child[:3]
        if kind == "stages":
            child_stages(src, out, int(args.child[3]) if len(args.child) > 3 else 1)
        elif kind == "convert":
            child_convert(src, out)
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / (f"{args.family}-{args.preset}" + (f"-{args.layers}l" if args.layers else ""))
    if not (src / "config.json").is_file():
        print(f"synth {args.family} {args.preset} -> {src}", flush=True)
        subprocess.run(moestream_cmd() + ["synth", args.family, "--out", str(src), "--preset", args.preset]
                       + (["--layers", str(args.layers)] if args.layers else []), check=True)
    inputs = files_under(src)
    src_bytes = sum(p.stat().st_size for p in inputs)
    print(f"source: {src} ({src_bytes / 1e6:.0f} MB in {len(inputs)} files); {os.cpu_count()} CPUs; "
          f"{args.repeats} rounds, each job cold (inputs evicted from the page cache)", flush=True)

    me = [sys.executable, str(Path(__file__).resolve())]
    commands = {
        "prepare": lambda out: moestream_cmd() + ["prepare", str(src), "--out", str(out), "--expert-bits", "4",
                                                  "--group-size", "64"],
        "stages": lambda out: me + ["--child", "stages", str(src), str(out), "1"],
        "stages-2t": lambda out: me + ["--child", "stages", str(src), str(out), "2"],
        "convert": lambda out: me + ["--child", "convert", str(src), str(out)],
    }
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in commands]
    if unknown:
        ap.error(f"unknown jobs {unknown}; known: {list(commands)}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # flows/__init__.py means to raise Prefect's 20 s embedded-server start timeout to 90 s, but the CLI
    # imports prefect before that module runs, so the default stays 20 s and a busy machine times out.
    # Give the child the value the package intends (a user's own setting wins).
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    load0 = os.getloadavg()

    results: dict[str, list[dict]] = {j: [] for j in jobs}
    for rnd in range(1, args.repeats + 1):
        for job in jobs:
            out = work / f"out-{job}"
            for stale in (out, out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"):
                shutil.rmtree(stale, ignore_errors=True)
            os.sync()
            evict_page_cache(inputs)
            before = page_cache_bytes(inputs)
            r = run_measured(commands[job](out), work / f"{job}-{rnd}.log", env)
            r["round"] = rnd
            r["inputs_cached_before_bytes"] = before
            if job == "prepare":
                r["phases"] = prefect_phases(Path(r["log"]), r["started"], r["wall_s"])
            results[job].append(r)
            cold = "?" if before is None else f"{before / 1e6:.0f} MB"
            print(f"  round {rnd} {job:<10} rc {r['rc']}  wall {r['wall_s']:6.2f} s  tree peak RSS "
                  f"{r['tree_peak_rss_bytes'] / 1e6:6.0f} MB ({r['tree_peak_procs']} procs)  largest process "
                  f"{r['max_single_rss_bytes'] / 1e6:6.0f} MB  (inputs cached before: {cold})", flush=True)
            if r["rc"]:
                print(r["tail"])

    # ---- the table
    print()
    print("wall s and peak RSS MB per round; ratios against mlx_lm.convert of the same round")
    print("(tree RSS: all processes of the job summed, sampled; single: kernel peak of its largest process)")
    head = f"{'job':<11}{'round':>6}{'wall s':>9}{'tree RSS':>10}{'single':>9}{'cpu s':>8}{'wall/conv':>11}{'RSS/conv':>10}"
    print(head)
    print("-" * len(head))
    conv = results.get("convert", [])
    for job in jobs:
        for r in results[job]:
            c = conv[r["round"] - 1] if len(conv) >= r["round"] else None
            ok = c is not None and not c["rc"] and not r["rc"]
            wr = f"{r['wall_s'] / c['wall_s']:10.2f}x" if ok else f"{'-':>11}"
            rr = f"{r['tree_peak_rss_bytes'] / c['tree_peak_rss_bytes']:9.2f}x" if ok else f"{'-':>10}"
            print(f"{job:<11}{r['round']:>6}{r['wall_s']:9.2f}{mb(r['tree_peak_rss_bytes']):>10}"
                  f"{mb(r['max_single_rss_bytes']):>9}{r['user_s'] + r['sys_s']:8.1f}{wr}{rr}")
    load1 = os.getloadavg()
    print(f"load average (1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, at end "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} CPUs (other work shares the machine)")
    print(f"targets (issue): prepare wall <= {TARGET_WALL}x convert, prepare peak RSS <= {TARGET_RSS}x convert")
    summary = {}
    if conv and results.get("prepare"):
        best = {j: min(rs, key=lambda r: r["wall_s"]) for j, rs in results.items() if rs}
        pw, cw = best["prepare"]["wall_s"], best["convert"]["wall_s"]
        prss = max(r["tree_peak_rss_bytes"] for r in results["prepare"])
        crss = max(r["tree_peak_rss_bytes"] for r in conv)
        summary = {"prepare_wall_ratio_best": pw / cw, "prepare_rss_ratio_max": prss / crss,
                   "wall_target_met": pw / cw <= TARGET_WALL, "rss_target_met": prss / crss <= TARGET_RSS}
        print(f"best-of-{args.repeats}: prepare {pw:.2f} s vs convert {cw:.2f} s = {pw / cw:.2f}x "
              f"({'meets' if pw / cw <= TARGET_WALL else 'misses'} {TARGET_WALL}x); peak RSS (max over rounds) "
              f"{prss / 1e6:.0f} MB vs {crss / 1e6:.0f} MB = {prss / crss:.2f}x "
              f"({'meets' if prss / crss <= TARGET_RSS else 'misses'} {TARGET_RSS}x)")
        for j in ("stages", "stages-2t"):
            if j in best:
                sw = best[j]["wall_s"]
                summary[f"{j}_wall_ratio_best"] = sw / cw
                summary[f"orchestration_overhead_vs_{j}_s"] = pw - sw
                print(f"best-of-{args.repeats}: {j} {sw:.2f} s = {sw / cw:.2f}x convert; Prefect adds {pw - sw:.2f} s "
                      f"over it")

    # ---- where the time goes
    print()
    for job in jobs:
        for r in results[job]:
            if len(r["per_process"]) > 1:
                procs = "; ".join(f"{n / 1e6:.0f} MB, {cpu:.1f} CPU s: {cmd[:60]}" for n, cmd, cpu in r["per_process"][:4])
                print(f"{job} round {r['round']} per process (peak RSS, CPU s as last sampled): {procs}")
            if r["child"]:
                parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["child"].items())
                print(f"{job} round {r['round']} in-process s: {parts}")
            if "phases" in r:
                p = r["phases"]
                parts = ", ".join(f"{k} {v:.2f}" for k, v in p["marks_s"].items())
                print(f"prepare round {r['round']} (Prefect log, s since launch): {parts}")
                if "to_flow_start_s" in p and "flow_body_s" in p:
                    print(f"  -> launch to flow start {p['to_flow_start_s']:.2f} s (imports + embedded server), flow body "
                          f"{p['flow_body_s']:.2f} s, after the flow {p.get('after_flow_s', 0):.2f} s")

    # ---- checks on the last round's outputs
    print()
    checks = {}
    bundle, converted = work / "out-prepare", work / "out-convert"
    if bundle.is_dir():
        t = time.perf_counter()
        v = subprocess.run(moestream_cmd() + ["verify", str(bundle)], capture_output=True, text=True)
        checks["verify"] = {"rc": v.returncode, "wall_s": time.perf_counter() - t,
                            "output": (v.stdout + v.stderr).strip()[-500:]}
        print(f"moestream verify {bundle}: exit {v.returncode} ({checks['verify']['wall_s']:.1f} s): "
              f"{checks['verify']['output']}")
    if bundle.is_dir() and converted.is_dir():
        cmp = compare_outputs(bundle, converted)
        checks["same_bytes_as_convert"] = cmp
        print(f"bundle vs mlx_lm.convert: {cmp['expert_tensors_checked']} expert tensors "
              f"({cmp['expert_bytes_checked'] / 1e6:.0f} MB) checked, {cmp['expert_tensors_mismatched']} differ, "
              f"{cmp['expert_tensors_missing']} missing; {cmp['resident_tensors_checked']} resident tensors checked, "
              f"{cmp['resident_tensors_mismatched']} differ -> {'SAME' if cmp['same'] else 'DIFFERENT'}")
        for ex in cmp["examples"]:
            print(f"  {ex}")
        for name in ("out-prepare", "out-convert"):
            d = work / name
            print(f"  {name}: {sum(p.stat().st_size for p in files_under(d)) / 1e6:.1f} MB on disk")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": str(src), "source_bytes": src_bytes, "preset": args.preset, "family": args.family,
                       "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1, "results": results, "summary": summary, "checks": checks}, f, indent=2)
        print(f"wrote {args.json}")
    if not args.keep:
        for job in jobs:
            shutil.rmtree(work / f"out-{job}", ignore_errors=True)
    failed = [j for j, rs in results.items() if any(r["rc"] for r in rs)]
    return 1 if failed or (checks.get("verify", {}).get("rc")) else 0


if __name__ == "__main__":
    sys.exit(main())
