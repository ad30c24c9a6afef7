"""Fuzzing untrusted bundles: seeded mutations of a good bundle, each run in a child process.

A bundle comes from the Hub, so every byte of it is untrusted input. This harness takes a small
good bundle (the tiny synth qwen3_moe, prepared with a profile: the *seed*), applies one seeded
mutation per case (a *class* of mutation per file and field kind: `MUTATIONS`; about half of the
content mutations also "seal" bundle.json, i.e. update its sizes and checksums as a deliberate
attacker would), and runs, in a child process per case forked from a warmed worker (a pool of
`--workers` spawned processes), with a timeout per step:

    moestream inspect PATH --json, moestream verify PATH      (moestream.cli.main, rc and stderr)
    moestream.load(PATH)               + forward on a fixed prompt, 4 greedy tokens, the chat template
    moestream.load(PATH, verify=True)  + forward
    moestream.plan_memory(PATH, expert_cache_share=0.3), load in that budget (the profile policy
                                         "lrfu" when the seed has a profile) + forward, 4 tokens

Each case is one outcome, the worst of its steps (`classify`):

    same    no error, and the same logits / tokens / template tokens as the unmutated seed
    named   a moestream.MoestreamError (CLI: exit 2 with one line on stderr)
    wrong   no error but a different output: silent corruption
    crash   any other exception, a CLI traceback or exit code other than 0/2, or the child died
    hang    a step ran past the per-step timeout (the child is killed)
    escape  something outside the bundle folder was opened or listed (see "Escapes" below)

Escapes are seen two ways. In the child, an audit hook (`sys.addaudithook`) records `open` (also
`os.open`), `os.listdir`, `os.scandir` and file-modifying events whose path leads outside the
bundle; it sees Python-level opens only. Targets of the symlinks the mutations plant are canary
files in a per-case `outside/` folder watched with inotify, which also sees opens by C/C++/Rust code
(MLX's safetensors reader, pyarrow, the tokenizers library). A path is an escape when

  - it is lexically inside the bundle but resolves outside it (a symlink out, `..`): always, even
    to /dev, /proc or /etc; or
  - it resolves outside the bundle and outside what the interpreter legitimately reads: the stdlib,
    site-packages, moestream's own package folders, this file, /proc, /sys, /dev, a directory
    listing of a `sys.path` entry (the import system), and, for a bundle laid out as a Hugging Face
    cache snapshot, the repo's `blobs/` folder;
  - or the child starts a process or opens a socket.

The child also runs under an address-space limit (its parent's plus 4 GiB), so a memory bomb ends as
a MemoryError (a crash) rather than an OOM kill of the machine; its stdout/stderr go to the case's
child.log (its tail is kept for crashes and hangs).

The case id is `<class>-<seed>`: it alone reproduces the case (`--case ID --keep`). `--fast` (what
tests/test_fuzz.py uses) skips the remaining loads of a case once one is refused by name: they
pass the same gate first.

Long run, printing the per-class table:

    python tests/fuzz_bundles.py --cases 1000 --seed 0 [--json out.json] [--workers 2] [--timeout 20]

Importing this module has no side effects; the heavy imports (MLX, moestream) happen in workers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OUTCOMES = ("named", "same", "wrong", "crash", "hang", "escape")
FAILURES = ("wrong", "crash", "hang", "escape")
SEVERITY = {"skipped": -1, "same": 0, "named": 1, "wrong": 2, "crash": 3, "hang": 4, "escape": 5}
STEPS = ("inspect", "verify_cli", "load", "load_verify", "budget")
MODEL_STEPS = ("load", "load_verify", "budget")

PROMPT = list(range(11, 35))  # fixed token ids (the seed's vocabulary has 320)
GEN_TOKENS = 4
LOGIT_RTOL = 1e-5  # max |diff| <= LOGIT_RTOL * max |reference logit|
DEFAULT_TIMEOUT = 20.0
CHILD_MEMORY = 4 << 30  # address space a child may add to its parent's (a MemoryError, not an OOM kill)
EXPERT_CACHE_SHARE = 0.3
HERE = Path(__file__).resolve()
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
    # no allocator background thread in the process that forks a child per case
    "ARROW_DEFAULT_MEMORY_POOL": "system",
}


# ======================================================================= the seed bundle


def make_seed(out: str | Path, *, profile_tokens: int = 1024) -> Path:
    """The seed: tiny synth qwen3_moe prepared (plain engine) with a routing profile (~5 s).
    Reused if `out` already holds a bundle."""
    out = Path(out)
    if (out / "bundle.json").is_file():
        return out
    import moestream
    from moestream.stages.synth import synth_checkpoint

    ck = out.parent / (out.name + "-checkpoint")
    if not (ck / "config.json").is_file():
        synth_checkpoint("qwen3_moe", ck, preset="tiny")
    moestream.prepare(str(ck), str(out), engine="plain", profile=True, profile_tokens=profile_tokens)
    return out


# ======================================================================= mutation context


class Ctx:
    """What a mutation works on: the copied bundle, a per-case `outside/` folder next to it (canaries,
    symlink targets), a seeded RNG, and notes that describe what was done."""

    def __init__(self, bundle: Path, outside: Path, rng: random.Random, case_dir: Path):
        self.bundle, self.outside, self.rng, self.case_dir = bundle, outside, rng, case_dir
        self.notes: list[str] = []

    # ---- small helpers
    def note(self, text: str) -> None:
        self.notes.append(text if len(text) <= 300 else text[:300] + "...")

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def chance(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def path(self, rel: str) -> Path:
        return self.bundle / rel

    def _writable(self, path: Path) -> Path:
        """Refuse to write through a symlink or outside the case folder (the harness runs as any user,
        maybe root: a mutation must never touch /etc/passwd, only point at it)."""
        if path.is_symlink():
            raise RuntimeError(f"harness bug: writing through a symlink {path}")
        real = Path(os.path.realpath(path))
        if self.case_dir.resolve() not in real.parents:
            raise RuntimeError(f"harness bug: writing outside the case folder: {real}")
        return path

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self._writable(self.path(rel))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8", "surrogatepass"))

    def read_json(self, rel: str):
        return json.loads(self.path(rel).read_text())

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=1))

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if p.is_symlink() or p.is_file() or (p.exists() and not p.is_dir()):
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)

    # ---- bundle.json
    def meta(self) -> dict:
        return self.read_json("bundle.json")

    def set_meta(self, meta) -> None:
        self.write_json("bundle.json", meta)

    def files(self) -> list[str]:
        return sorted(self.meta()["files"])

    def seal(self, *rels: str) -> None:
        """Make bundle.json agree with the mutated files (sizes and checksums), as a deliberate
        attacker would; a file that is gone is unlisted."""
        try:
            meta = self.meta()
            files = meta["files"]
        except Exception:  # bundle.json itself is mutated: nothing to seal
            return
        for rel in rels:
            p = self.path(rel)
            if not p.is_file():
                files.pop(rel, None)
                continue
            info = files.setdefault(rel, {"checksum": None, "nbytes": 0})
            info["nbytes"] = p.stat().st_size
            if info.get("checksum") is not None or not rel.startswith("experts/"):
                info["checksum"] = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
        self.set_meta(meta)

    def maybe_seal(self, *rels: str) -> None:
        if self.chance(0.5):
            self.seal(*rels)
            self.note("sealed: bundle.json updated to match")
        else:
            self.note("unsealed")

    # ---- outside the bundle
    def canary(self, name: str, data: bytes | str = b"canary: read outside the bundle\n") -> Path:
        p = self.outside / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def outside_copy(self, rel: str) -> Path:
        """A copy of bundle file or folder `rel` in outside/ (same content: reading it works)."""
        src = self.path(rel)
        dst = self.outside / rel.replace("/", "__")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copyfile(src, dst)
        return dst

    def link(self, rel: str, target: str | Path) -> None:
        """Replace bundle entry `rel` (if any) by a symlink to `target`."""
        p = self.path(rel)
        if p.is_symlink() or p.exists():
            self.remove(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(str(target), p)

    def link_outside(self, rel: str) -> None:
        """`rel` becomes a symlink to a same-content copy outside the bundle (absolute or relative)."""
        copy = self.outside_copy(rel)
        if self.chance(0.5):
            target = str(copy)
        else:
            target = os.path.relpath(copy, self.path(rel).parent)
        self.link(rel, target)
        self.note(f"{rel} -> {target}")

    # ---- layout.parquet and other Parquet tables
    def table(self, rel: str):
        import pyarrow.parquet as pq

        return pq.read_table(self.path(rel))

    def write_table(self, rel: str, table) -> None:
        import pyarrow.parquet as pq

        self._writable(self.path(rel))
        pq.write_table(table, self.path(rel))

    def rows(self, rel: str = "layout.parquet") -> tuple[list[dict], object]:
        t = self.table(rel)
        return t.to_pylist(), t.schema

    def write_rows(self, rows: list[dict], schema, rel: str = "layout.parquet") -> None:
        import pyarrow as pa

        self.write_table(rel, pa.Table.from_pylist(rows, schema=schema))


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # the file (class of files) it mutates: the table's grouping
    func: Callable[[Ctx], None]
    layout: str = "folder"  # "folder" or "snapshot" (the bundle laid out as a HF cache snapshot)


MUTATIONS: dict[str, Mutation] = {}


def mutation(name: str, file: str, layout: str = "folder"):
    def deco(func):
        MUTATIONS[name] = Mutation(name, file, func, layout)
        return func

    return deco


# ---------------------------------------------------------------- value helpers


def _wrong_type(old, rng: random.Random):
    candidates = ["x", 1.5, 7, [], {}, None, True, [1, 2], {"a": 1}, "1", -3]
    ok = [c for c in candidates if type(c) is not type(old)]
    return ok[rng.randrange(len(ok))]


HUGE = [10**18, 2**63, 2**64 + 1, 10**100, 1e308, float("inf"), float("nan"), 2**31, 10**9]
NEGATIVE = [-1, -2**31, -10**18, -0.5, -16384]


def _random_path(obj, rng: random.Random, descend: float = 0.65, want: Callable | None = None):
    """A random key path into nested JSON (at least one step)."""
    for _ in range(200):
        path, cur = [], obj
        while isinstance(cur, (dict, list)) and cur and (not path or rng.random() < descend):
            key = rng.choice(list(cur)) if isinstance(cur, dict) else rng.randrange(len(cur))
            path.append(key)
            cur = cur[key]
        if path and (want is None or want(cur)):
            return path
    return None


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


def _delete(obj, path):
    parent = _get(obj, path[:-1])
    if isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


def _json_with(obj, path, raw: str) -> str:
    """obj as JSON text with the value at `path` replaced by the raw text `raw`."""
    marker = "__FUZZ_RAW_VALUE__"
    obj = json.loads(json.dumps(obj))
    _set(obj, path, marker)
    return json.dumps(obj, indent=1).replace(json.dumps(marker), raw, 1)


# ======================================================================= bundle.json


@mutation("bj.wrong_type", "bundle.json")
def _bj_wrong_type(ctx: Ctx):
    meta = ctx.meta()
    path = _random_path(meta, ctx.rng)
    old = _get(meta, path)
    new = _wrong_type(old, ctx.rng)
    _set(meta, path, new)
    ctx.set_meta(meta)
    ctx.note(f"{_dotted(path)}: {str(old)[:60]!r} -> {new!r}")


@mutation("bj.missing_key", "bundle.json")
def _bj_missing_key(ctx: Ctx):
    meta = ctx.meta()
    path = _random_path(meta, ctx.rng, descend=0.5)
    _delete(meta, path)
    ctx.set_meta(meta)
    ctx.note(f"deleted {_dotted(path)}")


@mutation("bj.huge_number", "bundle.json")
def _bj_huge_number(ctx: Ctx):
    meta = ctx.meta()
    path = _random_path(meta, ctx.rng, descend=0.9, want=_is_number)
    value = ctx.pick(HUGE)
    _set(meta, path, value)
    ctx.set_meta(meta)
    ctx.note(f"{_dotted(path)} = {value!r}")


@mutation("bj.negative_number", "bundle.json")
def _bj_negative_number(ctx: Ctx):
    meta = ctx.meta()
    path = _random_path(meta, ctx.rng, descend=0.9, want=_is_number)
    value = ctx.pick(NEGATIVE)
    _set(meta, path, value)
    ctx.set_meta(meta)
    ctx.note(f"{_dotted(path)} = {value!r}")


@mutation("bj.deep_nesting", "bundle.json")
def _bj_deep_nesting(ctx: Ctx):
    meta = ctx.meta()
    path = _random_path(meta, ctx.rng)
    depth, kind = ctx.pick([1000, 100_000, 1_000_000]), ctx.pick(["list", "dict"])
    ctx.write_text("bundle.json", _json_with(meta, path, _deep(depth, kind)))
    ctx.note(f"{_dotted(path)} = {kind} nested {depth} deep")


@mutation("bj.huge_string", "bundle.json")
def _bj_huge_string(ctx: Ctx):
    meta = ctx.meta()
    size = ctx.pick([1 << 16, 1 << 20, 8 << 20])
    where = ctx.pick(["value", "files key", "module"])
    if where == "value":
        path = _random_path(meta, ctx.rng)
        _set(meta, path, "A" * size)
        ctx.note(f"{_dotted(path)} = 'A' * {size}")
    elif where == "files key":
        meta["files"]["A" * size] = {"nbytes": 1, "checksum": None}
        ctx.note(f"files gets a key of {size} characters")
    else:
        meta["layers"][0]["module"] = "model." + "a." * (size // 2) + "switch_mlp"
        ctx.note(f"layers[0].module of {size} characters")
    ctx.set_meta(meta)


@mutation("bj.format_version", "bundle.json")
def _bj_format_version(ctx: Ctx):
    meta = ctx.meta()
    v = meta.get("format_version", 1)
    if ctx.chance(0.25):
        value = ctx.pick(["moestream-bundle-v0", "", None, 1, "MOESTREAM-BUNDLE", "moestream-bundle "])
        meta["format"] = value
        ctx.note(f"format = {value!r}")
    else:
        value = ctx.pick([v + 1, v - 1, 99, -1, str(v), float(v) + 0.5, None, [v], 2**64, 0, 1e308])
        meta["format_version"] = value
        ctx.note(f"format_version {v!r} -> {value!r}")
    ctx.set_meta(meta)


@mutation("bj.symlink_outside", "bundle.json")
def _bj_symlink_outside(ctx: Ctx):
    if ctx.chance(0.7):
        ctx.link_outside("bundle.json")
    else:
        ctx.link("bundle.json", "/etc/passwd")
        ctx.note("bundle.json -> /etc/passwd")


def _escaping_names(ctx: Ctx, rel: str) -> list[str]:
    base = rel.replace("/", "__")
    return [f"../outside/{base}", str(ctx.outside / base), f"experts/../../outside/{base}",
            f"./../outside/{base}", f"{rel}/../../outside/{base}", "/etc/passwd", "C:\\Windows\\win.ini",
            "\\\\server\\share\\x", f"..\\outside\\{base}", "~/.bashrc", "%2e%2e/outside/" + base, "", ".",
            "experts", f"experts/{'../' * 12}etc/passwd"]


@mutation("bj.path_escape", "bundle.json")
def _bj_path_escape(ctx: Ctx):
    meta = ctx.meta()
    rel = ctx.pick(sorted(meta["files"]))
    ctx.outside_copy(rel)  # so that the escaping name exists and has the right size
    name = ctx.pick(_escaping_names(ctx, rel))
    info = dict(meta["files"][rel])
    if ctx.chance(0.5):
        del meta["files"][rel]
        ctx.note(f"files[{rel!r}] renamed to {name!r}")
    else:
        ctx.note(f"files gets {name!r} (a copy of {rel})")
    meta["files"][name] = info
    ctx.set_meta(meta)


@mutation("bj.files_entries", "bundle.json")
def _bj_files_entries(ctx: Ctx):
    meta = ctx.meta()
    files = meta["files"]
    rel = ctx.pick(sorted(files))
    kind = ctx.pick(["duplicate key", "nonexistent", "directory", "info type", "nbytes string", "checksum format",
                     "many", "alias", "unlisted", "checksum null"])
    if kind == "duplicate key":  # JSON text with the key twice; the parser keeps the last
        text = json.dumps(meta, indent=1)
        entry = json.dumps(rel) + ": " + json.dumps({"nbytes": files[rel]["nbytes"] + ctx.pick([0, 1]),
                                                     "checksum": files[rel]["checksum"]})
        text = text.replace('"files": {', '"files": {\n  ' + entry + ",", 1)
        ctx.write_text("bundle.json", text)
        ctx.note(f"files lists {rel!r} twice")
        return
    if kind == "nonexistent":
        files[ctx.pick(["experts/layer_999.bin", "nothing.json", "profile/none.parquet"])] = {"nbytes": 10, "checksum": None}
    elif kind == "directory":
        files[ctx.pick(["experts", "profile", "experts/"])] = {"nbytes": 4096, "checksum": None}
    elif kind == "info type":
        files[rel] = ctx.pick([5, [], "x", None, True, [files[rel]]])
    elif kind == "nbytes string":
        files[rel]["nbytes"] = str(files[rel]["nbytes"])
    elif kind == "checksum format":
        files[rel]["checksum"] = ctx.pick(["md5:0", "sha256:", "sha256:" + "0" * 64, 5, "SHA256:" + "a" * 64])
    elif kind == "many":
        for i in range(ctx.pick([20_000, 100_000])):
            files[f"x/{i}.bin"] = {"nbytes": 0, "checksum": None}
    elif kind == "alias":
        alias = ctx.pick([f"./{rel}", rel.replace("/", "//"), rel.replace("/", "/./"), rel + "/", rel.upper()])
        files[alias] = dict(files[rel])
        if ctx.chance(0.5):
            del files[rel]
    elif kind == "unlisted":
        del files[rel]
    elif kind == "checksum null":
        files[rel]["checksum"] = None
    ctx.note(f"files: {kind} ({rel})")
    ctx.set_meta(meta)


@mutation("bj.layers", "bundle.json")
def _bj_layers(ctx: Ctx):
    meta = ctx.meta()
    layers = meta["layers"]
    kind = ctx.pick(["empty", "duplicate", "index", "module", "swap modules", "extra"])
    if kind == "empty":
        meta["layers"] = []
    elif kind == "duplicate":
        layers.append(dict(ctx.pick(layers)))
    elif kind == "index":
        ctx.pick(layers)["layer"] = ctx.pick([10**6, -1, 3, "0", 0.5, 2**63])
    elif kind == "module":
        ctx.pick(layers)["module"] = ctx.pick([
            "model.embed_tokens", "lm_head", "model.layers.0.mlp", "model.layers.0.mlp.switch_mlp.gate_proj",
            "model.layers.99.mlp.switch_mlp", "", "model.layers.0.mlp.switch_mlp.__class__", "__dict__",
            "model.layers.-1.mlp.switch_mlp", "model..layers.0.mlp.switch_mlp", "model.layers.0.self_attn"])
    elif kind == "swap modules":
        a, b = ctx.rng.sample(range(len(layers)), 2)
        layers[a]["module"], layers[b]["module"] = layers[b]["module"], layers[a]["module"]
    else:
        layers.append({"layer": len(layers), "module": f"model.layers.{len(layers)}.mlp.switch_mlp"})
    ctx.note(f"layers: {kind}")
    ctx.set_meta(meta)


@mutation("bj.experts", "bundle.json")
def _bj_experts(ctx: Ctx):
    meta = ctx.meta()
    key = ctx.pick(["num_experts", "experts_per_token", "bits", "group_size", "mode", "num_moe_layers"])
    value = ctx.pick({"num_experts": [0, 1, 15, 17, 10**9, -1], "experts_per_token": [0, 17, 10**9, -1, 2, "4"],
                      "bits": [3, 16, None, 0], "group_size": [0, 32, None], "mode": ["mxfp4", None, "x"],
                      "num_moe_layers": [0, 10**6]}[key])
    meta["experts"][key] = value
    ctx.note(f"experts.{key} = {value!r}")
    ctx.set_meta(meta)


# ======================================================================= config.json

INT_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "num_experts", "num_experts_per_tok", "vocab_size", "head_dim",
            "max_position_embeddings", "decoder_sparse_step", "eos_token_id", "bos_token_id")


def _config_int_keys(cfg: dict) -> list[str]:
    keys = [k for k in INT_KEYS if k in cfg]
    return keys or [k for k, v in cfg.items() if _is_number(v)]


@mutation("cfg.missing_key", "config.json")
def _cfg_missing_key(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    key = ctx.pick(sorted(cfg))
    del cfg[key]
    ctx.write_json("config.json", cfg)
    ctx.note(f"deleted {key}")
    ctx.maybe_seal("config.json")


@mutation("cfg.wrong_type", "config.json")
def _cfg_wrong_type(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    key = ctx.pick(sorted(cfg))
    new = _wrong_type(cfg[key], ctx.rng)
    ctx.note(f"{key}: {cfg[key]!r} -> {new!r}")
    cfg[key] = new
    ctx.write_json("config.json", cfg)
    ctx.maybe_seal("config.json")


@mutation("cfg.float_for_int", "config.json")
def _cfg_float_for_int(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    key = ctx.pick(_config_int_keys(cfg))
    new = float(cfg[key]) + ctx.pick([0.0, 0.5])
    ctx.note(f"{key}: {cfg[key]!r} -> {new!r}")
    cfg[key] = new
    ctx.write_json("config.json", cfg)
    ctx.maybe_seal("config.json")


@mutation("cfg.sizes", "config.json")
def _cfg_sizes(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    key = ctx.pick(_config_int_keys(cfg))
    new = ctx.pick([0, -1, 10**6, 10**9, 2**31, 10**18, 3])
    ctx.note(f"{key}: {cfg[key]!r} -> {new!r}")
    cfg[key] = new
    ctx.write_json("config.json", cfg)
    ctx.maybe_seal("config.json")


@mutation("cfg.model_type", "config.json")
def _cfg_model_type(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    new = ctx.pick(["foo", "base", "", "../qwen3_moe", "qwen3_moe/../llama", "mlx_lm.models.qwen3_moe", "llama",
                    "mixtral", "qwen3_moe ", "__init__", None, 5, "qwen3_moe.evil", "switch_layers", "cache",
                    "deepseek_v3"])
    ctx.note(f"model_type = {new!r}")
    cfg["model_type"] = new
    if ctx.chance(0.3):
        cfg["architectures"] = ctx.pick([["EvilForCausalLM"], "x", [], None])
        ctx.note(f"architectures = {cfg['architectures']!r}")
    ctx.write_json("config.json", cfg)
    ctx.maybe_seal("config.json")


@mutation("cfg.deep_nesting", "config.json")
def _cfg_deep_nesting(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    key = ctx.pick(["rope_scaling", "quantization", "text_config", "x", "num_experts"])
    cfg.setdefault(key, None)
    depth, kind = ctx.pick([1000, 100_000, 1_000_000]), ctx.pick(["list", "dict"])
    ctx.write_text("config.json", _json_with(cfg, [key], _deep(depth, kind)))
    ctx.note(f"{key} = {kind} nested {depth} deep")
    ctx.maybe_seal("config.json")


@mutation("cfg.quantization", "config.json")
def _cfg_quantization(ctx: Ctx):
    cfg = ctx.read_json("config.json")
    q = ctx.pick([{"group_size": 64, "bits": 4}, {"group_size": 0, "bits": 4}, {"group_size": 64, "bits": 0},
                  {"group_size": "x", "bits": 4}, {"bits": 3}, [], "4bit", 5,
                  {"group_size": 64, "bits": 8, "model.embed_tokens": {"group_size": 32, "bits": 3}},
                  {"group_size": 64, "bits": 4, "mode": "nf4"}, {"group_size": 10**9, "bits": 10**9}])
    cfg["quantization"] = q
    if ctx.chance(0.3):
        cfg["quantization_config"] = q
    ctx.note(f"quantization = {q!r}")
    ctx.write_json("config.json", cfg)
    ctx.maybe_seal("config.json")


@mutation("cfg.symlink_outside", "config.json")
def _cfg_symlink_outside(ctx: Ctx):
    ctx.link_outside("config.json")


# ======================================================================= layout.parquet


def _layout_row(ctx: Ctx, rows: list[dict]) -> int:
    return ctx.rng.randrange(len(rows))


@mutation("lay.offset", "layout.parquet")
def _lay_offset(ctx: Ctx):
    rows, schema = ctx.rows()
    i = _layout_row(ctx, rows)
    r = rows[i]
    size = ctx.path(r["file"]).stat().st_size
    others = [x["offset"] for x in rows if x["file"] == r["file"] and x["offset"] != r["offset"]]
    new = ctx.pick([None, -1, -16384, 2**62, 2**63 - 1, size, size - 1, r["offset"] + 1, r["offset"] + 16384,
                    ctx.pick(others) if others else 0])
    ctx.note(f"row {i} offset {r['offset']} -> {new}")
    r["offset"] = new
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.nbytes", "layout.parquet")
def _lay_nbytes(ctx: Ctx):
    rows, schema = ctx.rows()
    i = _layout_row(ctx, rows)
    r = rows[i]
    field = ctx.pick(["nbytes", "raw_nbytes", "both"])
    v = r["nbytes"]
    new = ctx.pick([v + 1, v - 1, 0, -1, None, 2**62, v * 2, v + 16384])
    for f in (("nbytes", "raw_nbytes") if field == "both" else (field,)):
        r[f] = new
    ctx.note(f"row {i} {field} {v} -> {new}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


def _tensor_target(ctx: Ctx, rows):
    """(rows to change, tensor index): one row, or the same tensor in every row."""
    i = _layout_row(ctx, rows)
    j = ctx.rng.randrange(len(rows[i]["tensors"]))
    every = ctx.chance(0.4)
    return (rows if every else [rows[i]]), j, ("every row" if every else f"row {i}")


@mutation("lay.tensor_name", "layout.parquet")
def _lay_tensor_name(ctx: Ctx):
    rows, schema = ctx.rows()
    targets, j, where = _tensor_target(ctx, rows)
    kind = ctx.pick(["gate_x", "weights", "empty", "dots", "null", "drop", "duplicate", "extra", "collide"])
    for r in targets:
        ts = r["tensors"]
        t = ts[j]
        if kind == "gate_x":
            t["name"] = t["name"].replace("gate_proj", "gate_x").replace("up_proj", "up_x").replace("down_proj", "down_x")
        elif kind == "weights":
            t["name"] = t["name"].replace(".weight", ".weights").replace(".scales", ".scale")
        elif kind == "empty":
            t["name"] = ""
        elif kind == "dots":
            t["name"] = "../../" + t["name"]
        elif kind == "null":
            t["name"] = None
        elif kind == "drop":
            ts.pop(j)
        elif kind == "duplicate":
            ts.append(dict(t))
        elif kind == "extra":
            ts.append({**t, "name": "evil_proj.weight"})
        else:  # two tensors of one projection share a name
            other = ts[(j + 1) % len(ts)]
            t["name"] = other["name"]
    ctx.note(f"{where} tensor {j}: {kind}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.tensor_dtype", "layout.parquet")
def _lay_tensor_dtype(ctx: Ctx):
    rows, schema = ctx.rows()
    targets, j, where = _tensor_target(ctx, rows)
    old = targets[0]["tensors"][j]["dtype"]
    choices = ["float64", "float32", "int8", "uint8", "int4", "bogus", "", None, "bool", "complex64", "uint32",
               "bfloat16", "float16", "int64"]
    # a float16 <-> bfloat16 relabel of scales keeps every size: a different valid model, not a damaged one
    excluded = {old, "float16", "bfloat16"} if old in ("float16", "bfloat16") else {old}
    new = ctx.pick([c for c in choices if c not in excluded])
    for r in targets:
        r["tensors"][j]["dtype"] = new
    ctx.note(f"{where} tensor {j} dtype {old} -> {new}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.tensor_shape", "layout.parquet")
def _lay_tensor_shape(ctx: Ctx):
    rows, schema = ctx.rows()
    targets, j, where = _tensor_target(ctx, rows)
    old = list(targets[0]["tensors"][j]["shape"])
    n = math.prod(old)
    new = ctx.pick([old[::-1], [n], old + [1], [0] + old[1:], [-1] + old[1:], [10**9] + old[1:], [],
                    [2**40, 2**40], None, [old[0] * 2, old[1] // 2] if len(old) == 2 and old[1] > 1 else [n, 1]])
    for r in targets:
        r["tensors"][j]["shape"] = new
    ctx.note(f"{where} tensor {j} shape {old} -> {new}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.tensor_quant", "layout.parquet")
def _lay_tensor_quant(ctx: Ctx):
    rows, schema = ctx.rows()
    targets, j, where = _tensor_target(ctx, rows)
    field = ctx.pick(["bits", "group_size", "mode"])
    new = ctx.pick({"bits": [None, 0, 1, 2, 3, 8, 16, 2**31 - 1], "group_size": [None, 0, 16, 32, 128, -64, 2**31 - 1],
                    "mode": [None, "mxfp4", "nf4", "", "affine "]}[field])
    whole = ctx.chance(0.5)  # every tensor of the projection (consistently) or just one
    for r in targets:
        t = r["tensors"][j]
        proj = t["name"].rsplit(".", 1)[0] if t["name"] else ""
        for u in r["tensors"]:
            if u is t or (whole and u["name"] and u["name"].rsplit(".", 1)[0] == proj):
                u[field] = new
    ctx.note(f"{where} tensor {j}{' (whole projection)' if whole else ''}: {field} = {new!r}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.tensor_offset", "layout.parquet")
def _lay_tensor_offset(ctx: Ctx):
    rows, schema = ctx.rows()
    targets, j, where = _tensor_target(ctx, rows)
    kind = ctx.pick(["-1", "-64", "raw", "raw-8", "huge", "overlap", "+1", "null"])
    for r in targets:
        t = r["tensors"][j]
        other = r["tensors"][(j + 1) % len(r["tensors"])]
        t["offset"] = {"-1": -1, "-64": -64, "raw": r["raw_nbytes"], "raw-8": r["raw_nbytes"] - 8, "huge": 2**62,
                       "overlap": other["offset"], "+1": t["offset"] + 1, "null": None}[kind]
    ctx.note(f"{where} tensor {j} offset: {kind}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.codec", "layout.parquet")
def _lay_codec(ctx: Ctx):
    rows, schema = ctx.rows()
    every = ctx.chance(0.4)
    targets = rows if every else [ctx.pick(rows)]
    new = ctx.pick(["zstd", "zstd*2", "lz4", "", "NONE", None, "none\x00", "gzip"])
    for r in targets:
        r["codec"] = "zstd" if new == "zstd*2" else new
        if new == "zstd*2":
            r["raw_nbytes"] = r["nbytes"] * 2
    ctx.note(f"{'every row' if every else 'one row'}: codec {new!r}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.rows", "layout.parquet")
def _lay_rows(ctx: Ctx):
    rows, schema = ctx.rows()
    i = _layout_row(ctx, rows)
    kind = ctx.pick(["expert 10**9", "layer 10**6", "expert -1", "layer -1", "expert = num_experts", "duplicate",
                     "delete", "past the file", "null layer"])
    r = dict(rows[i])
    if kind == "delete":
        rows.pop(i)
    elif kind == "duplicate":
        rows.append(r)
    else:
        if kind == "expert 10**9":
            r["expert"] = 10**9
        elif kind == "layer 10**6":
            r["layer"] = 10**6
        elif kind == "expert -1":
            r["expert"] = -1
        elif kind == "layer -1":
            r["layer"] = -1
        elif kind == "expert = num_experts":
            r["expert"] = max(x["expert"] for x in rows) + 1
        elif kind == "past the file":
            r["expert"] = max(x["expert"] for x in rows) + 1
            r["offset"] = ctx.path(r["file"]).stat().st_size + 16384
        else:
            r["layer"] = None
        rows.insert(ctx.rng.randrange(len(rows) + 1), r)
    ctx.note(f"row {i}: {kind}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.many_rows", "layout.parquet")
def _lay_many_rows(ctx: Ctx):
    import numpy as np
    import pyarrow as pa

    t = ctx.table("layout.parquet")
    n = ctx.pick([80_000, 20_000])
    reps = -(-n // t.num_rows)
    big = pa.concat_tables([t] * reps).slice(0, n).combine_chunks()
    kind = ctx.pick(["experts renumbered", "exact duplicates", "layers renumbered"])
    if kind == "experts renumbered":
        big = big.set_column(big.schema.get_field_index("expert"), "expert", pa.array(np.arange(n, dtype=np.int32)))
    elif kind == "layers renumbered":
        big = big.set_column(big.schema.get_field_index("layer"), "layer", pa.array(np.arange(n, dtype=np.int32)))
    ctx.write_table("layout.parquet", big)
    ctx.note(f"{n} rows: {kind}")
    ctx.maybe_seal("layout.parquet")


def _damage_bytes(ctx: Ctx, rel: str, flip_below: int | None = None) -> None:
    """Damage a whole file. flip_below: flip bytes only before this offset (a header: flipped tensor
    data with a sealed checksum would be a different valid file, not a damaged one)."""
    data = ctx.read_bytes(rel)
    kind = ctx.pick(["truncate", "empty", "junk", "flip", "json", "append", "zeros"])
    if kind == "truncate":
        data = data[: ctx.rng.randrange(1, len(data))]
    elif kind == "empty":
        data = b""
    elif kind == "junk":
        data = bytes(ctx.rng.randrange(256) for _ in range(len(data)))
    elif kind == "flip":
        b = bytearray(data)
        for _ in range(ctx.pick([1, 8, 64])):
            k = ctx.rng.randrange(min(len(b), flip_below or len(b)))
            b[k] ^= ctx.rng.randrange(1, 256)
        data = bytes(b)
    elif kind == "json":
        data = b'{"not": "parquet"}'
    elif kind == "append":
        data = data + bytes(ctx.rng.randrange(256) for _ in range(ctx.rng.randrange(1, 5000)))
    else:
        data = b"\0" * len(data)
    ctx.write_bytes(rel, data)
    ctx.note(f"{rel}: {kind}")


@mutation("lay.truncated", "layout.parquet")
def _lay_truncated(ctx: Ctx):
    _damage_bytes(ctx, "layout.parquet")
    ctx.maybe_seal("layout.parquet")


@mutation("lay.schema", "layout.parquet")
def _lay_schema(ctx: Ctx):
    import pyarrow as pa

    t = ctx.table("layout.parquet")
    kind = ctx.pick(["drop", "rename", "extra", "offset as string", "layer as float", "layer as half",
                     "tensors as string", "tensor struct without bits", "checksum as int", "empty"])
    names = t.column_names
    if kind == "drop":
        col = ctx.pick(names)
        t = t.drop([col])
        kind += f" {col}"
    elif kind == "rename":
        col = ctx.pick(names)
        t = t.rename_columns([c + "_x" if c == col else c for c in names])
        kind += f" {col}"
    elif kind == "extra":
        t = t.append_column("evil", pa.array(["x"] * t.num_rows))
    elif kind == "offset as string":
        t = t.set_column(names.index("offset"), "offset", pa.array([str(x) for x in t["offset"].to_pylist()]))
    elif kind == "layer as float":
        t = t.set_column(names.index("layer"), "layer", pa.array([float(x) for x in t["layer"].to_pylist()]))
    elif kind == "layer as half":
        t = t.set_column(names.index("layer"), "layer", pa.array([x + 0.5 for x in t["layer"].to_pylist()]))
    elif kind == "tensors as string":
        t = t.set_column(names.index("tensors"), "tensors", pa.array([json.dumps(x) for x in t["tensors"].to_pylist()]))
    elif kind == "tensor struct without bits":
        ts = [[{k: v for k, v in e.items() if k != "bits"} for e in x] for x in t["tensors"].to_pylist()]
        t = t.set_column(names.index("tensors"), "tensors", pa.array(ts))
    elif kind == "checksum as int":
        t = t.set_column(names.index("checksum"), "checksum", pa.array(list(range(t.num_rows))))
    else:
        t = t.slice(0, 0)
    ctx.write_table("layout.parquet", t)
    ctx.note(f"layout.parquet: {kind}")
    ctx.maybe_seal("layout.parquet")


@mutation("lay.file", "layout.parquet")
def _lay_file(ctx: Ctx):
    rows, schema = ctx.rows()
    i = _layout_row(ctx, rows)
    old = rows[i]["file"]
    base = old.replace("/", "__")
    ctx.outside_copy(old)
    new = ctx.pick([
        "experts", "experts/", "experts/layer_999.bin", "resident.safetensors", "config.json",
        f"../outside/{base}", str(ctx.outside / base), "/dev/zero", old.replace("/", "/./"), old.replace("/", "//"),
        "", None, f"profile/../{old}", "/etc/passwd", ctx.pick(sorted({r['file'] for r in rows} - {old}) or [old])])
    every = ctx.chance(0.5)
    for r in rows:
        if r["file"] == old and (every or r is rows[i]):
            r["file"] = new
    ctx.note(f"{'every row of ' + old if every else f'row {i}'}: file -> {new!r}")
    ctx.write_rows(rows, schema)
    ctx.maybe_seal("layout.parquet")


@mutation("lay.symlink_outside", "layout.parquet")
def _lay_symlink_outside(ctx: Ctx):
    ctx.link_outside("layout.parquet")


# ======================================================================= experts/*.bin


def _expert_files(ctx: Ctx) -> list[str]:
    return sorted(f"experts/{p.name}" for p in ctx.path("experts").iterdir())


@mutation("exp.flip", "experts/*.bin")
def _exp_flip(ctx: Ctx):
    rows, _ = ctx.rows()
    kind = ctx.pick(["one extent", "every extent of a file", "padding"])
    rel = ctx.pick(sorted({r["file"] for r in rows}))
    data = bytearray(ctx.read_bytes(rel))
    mine = [r for r in rows if r["file"] == rel]
    if kind == "padding":
        used = set()
        for r in mine:
            used.update(range(r["offset"], r["offset"] + r["nbytes"]))
        free = [k for k in range(len(data)) if k not in used]
        positions = ctx.rng.sample(free, min(8, len(free)))
    else:
        targets = mine if kind != "one extent" else [ctx.pick(mine)]
        positions = [ctx.rng.randrange(r["offset"], r["offset"] + r["nbytes"]) for r in targets
                     for _ in range(ctx.pick([1, 4]))]
    for k in positions:
        data[k] ^= ctx.rng.randrange(1, 256)
    ctx.write_bytes(rel, bytes(data))
    ctx.note(f"{rel}: {len(positions)} bytes flipped ({kind})")


@mutation("exp.truncate", "experts/*.bin")
def _exp_truncate(ctx: Ctx):
    rel = ctx.pick(_expert_files(ctx))
    data = ctx.read_bytes(rel)
    n = ctx.pick([0, 1, len(data) - 1, len(data) // 2, 16384, ctx.rng.randrange(len(data))])
    ctx.write_bytes(rel, data[:n])
    ctx.note(f"{rel}: truncated to {n} of {len(data)} bytes")
    ctx.maybe_seal(rel)


@mutation("exp.extend", "experts/*.bin")
def _exp_extend(ctx: Ctx):
    rel = ctx.pick(_expert_files(ctx))
    extra = bytes(ctx.rng.randrange(256) for _ in range(ctx.pick([1, 4096, 16384, 20000])))
    ctx.write_bytes(rel, ctx.read_bytes(rel) + extra)
    ctx.note(f"{rel}: {len(extra)} bytes appended")
    ctx.maybe_seal(rel)


@mutation("exp.symlink_outside", "experts/*.bin")
def _exp_symlink_outside(ctx: Ctx):
    if ctx.chance(0.2):
        copy = ctx.outside_copy("experts")
        ctx.link("experts", copy)
        ctx.note(f"experts/ -> {copy}")
    else:
        ctx.link_outside(ctx.pick(_expert_files(ctx)))


@mutation("exp.directory", "experts/*.bin")
def _exp_directory(ctx: Ctx):
    rel = ctx.pick(_expert_files(ctx))
    ctx.remove(rel)
    ctx.path(rel).mkdir()
    if ctx.chance(0.5):
        ctx.write_bytes(f"{rel}/x.bin", b"\0" * 4096)
    ctx.note(f"{rel} is a directory")


@mutation("exp.special", "experts/*.bin")
def _exp_special(ctx: Ctx):
    rel = ctx.pick(_expert_files(ctx))
    kind = ctx.pick(["fifo", "/dev/zero", "/dev/null", "dangling", "loop", "inside", "/proc/self/mem"])
    if kind == "fifo":
        ctx.remove(rel)
        os.mkfifo(ctx.path(rel))
    elif kind == "dangling":
        ctx.link(rel, "nowhere.bin")
    elif kind == "loop":
        ctx.link(rel, ctx.path(rel).name)
    elif kind == "inside":
        other = ctx.pick([f for f in _expert_files(ctx) if f != rel])
        ctx.link(rel, Path(other).name)
    else:
        ctx.link(rel, kind)
    ctx.note(f"{rel}: {kind}")


@mutation("exp.missing", "experts/*.bin")
def _exp_missing(ctx: Ctx):
    rel = ctx.pick(_expert_files(ctx))
    ctx.remove(rel)
    ctx.note(f"{rel} deleted")
    ctx.maybe_seal(rel)


# ======================================================================= resident.safetensors

RES = "resident.safetensors"


def _st_read(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _st_write(ctx: Ctx, header: dict | bytes, body: bytes, length: int | None = None) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    ctx.write_bytes(RES, struct.pack("<Q", len(h) if length is None else length % 2**64) + h + body)


def _st_tensors(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


@mutation("res.header_len", RES)
def _res_header_len(ctx: Ctx):
    data = ctx.read_bytes(RES)
    header, body = _st_read(data)
    n = struct.unpack("<Q", data[:8])[0]
    new = ctx.pick([0, 1, 7, n - 1, n + 1, len(data), 2**63, 2**64 - 1, 2**32, len(data) - 8])
    _st_write(ctx, header, body, length=new)
    ctx.note(f"header length {n} -> {new}")
    ctx.maybe_seal(RES)


@mutation("res.header_json", RES)
def _res_header_json(ctx: Ctx):
    header, body = _st_read(ctx.read_bytes(RES))
    kind = ctx.pick(["invalid", "list", "null", "number", "deep list", "deep dict", "not utf-8", "huge", "metadata"])
    raw = {"invalid": b"{", "list": b"[]", "null": b"null", "number": b"1",
           "deep list": _deep(100_000, "list").encode(), "deep dict": _deep(100_000, "dict").encode(),
           "not utf-8": b'{"\xff\xfe": 1}', "huge": b"{" + b" " * (16 << 20) + b"}"}.get(kind)
    if kind == "metadata":
        header["__metadata__"] = ctx.pick([{"format": 5}, {"format": "A" * (1 << 20)}, [], "x", {"x": {"y": 1}}])
        raw = json.dumps(header).encode()
    _st_write(ctx, raw, body)
    ctx.note(f"header: {kind}")
    ctx.maybe_seal(RES)


@mutation("res.offsets", RES)
def _res_offsets(ctx: Ctx):
    header, body = _st_read(ctx.read_bytes(RES))
    name = ctx.pick(_st_tensors(header))
    b, e = header[name]["data_offsets"]
    same_size = [k for k in _st_tensors(header) if k != name and
                 header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == e - b]
    kind = ctx.pick(["reversed", "huge", "negative", "one more", "past end", "overlap", "null", "float"])
    new = {"reversed": [e, b], "huge": [0, 10**12], "negative": [-1, e - b - 1], "one more": [b, e + 1],
           "past end": [len(body), len(body) + e - b], "null": None, "float": [float(b), float(e)],
           "overlap": header[ctx.pick(same_size)]["data_offsets"] if same_size else [0, e - b]}[kind]
    header[name]["data_offsets"] = new
    _st_write(ctx, header, body)
    ctx.note(f"{name} data_offsets [{b}, {e}] -> {new} ({kind})")
    ctx.maybe_seal(RES)


@mutation("res.shape", RES)
def _res_shape(ctx: Ctx):
    header, body = _st_read(ctx.read_bytes(RES))
    name = ctx.pick(_st_tensors(header))
    old = header[name]["shape"]
    n = math.prod(old)
    new = ctx.pick([old[::-1], [n], old + [1], [1] + old, [n // 2, 2] if n % 2 == 0 else [n, 1], [n + 1], [0],
                    [-1], [2**40, 2**40]])
    header[name]["shape"] = new
    _st_write(ctx, header, body)
    ctx.note(f"{name} shape {old} -> {new}")
    ctx.maybe_seal(RES)


@mutation("res.dtype", RES)
def _res_dtype(ctx: Ctx):
    header, body = _st_read(ctx.read_bytes(RES))
    name = ctx.pick(_st_tensors(header))
    old = header[name]["dtype"]
    # F16 <-> BF16 keeps every size: a different valid file, not a damaged one
    new = ctx.pick(["I16", "U16", "F32", "F64", "BOOL", "BOGUS", "F8_E4M3", "bf16", "", "I64", "U8"])
    header[name]["dtype"] = new
    _st_write(ctx, header, body)
    ctx.note(f"{name} dtype {old} -> {new}")
    ctx.maybe_seal(RES)


@mutation("res.tensors", RES)
def _res_tensors(ctx: Ctx):
    header, body = _st_read(ctx.read_bytes(RES))
    name = ctx.pick(_st_tensors(header))
    kind = ctx.pick(["drop", "extra", "rename", "expert weight", "empty"])
    if kind == "drop":
        del header[name]
    elif kind == "extra":
        header["model.evil.weight"] = dict(header[name])
    elif kind == "rename":
        header[name.replace(".weight", ".weights")] = header.pop(name)
    elif kind == "expert weight":
        header["model.layers.0.mlp.switch_mlp.gate_proj.weight"] = dict(header[name])
    else:
        header = {"__metadata__": {"format": "mlx"}}
        body = b""
    _st_write(ctx, header, body)
    ctx.note(f"{kind} ({name})")
    ctx.maybe_seal(RES)


@mutation("res.symlink_outside", RES)
def _res_symlink_outside(ctx: Ctx):
    ctx.link_outside(RES)


@mutation("res.truncated", RES)
def _res_truncated(ctx: Ctx):
    _damage_bytes(ctx, RES, flip_below=8 + struct.unpack("<Q", ctx.read_bytes(RES)[:8])[0])
    ctx.maybe_seal(RES)


# ======================================================================= tokenizer files

TEMPLATE_BOMBS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string repeat": "{% set s = 'a' * 1000000000 %}{{ s | length }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "raise_exception": "{{ raise_exception('no') }}",
    "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "include": "{% include '/etc/passwd' %}",
    "huge range": "{{ range(10**9) | list | length }}",
    "big output": "{% for i in range(100000) %}{{ messages }}{% endfor %}",
    "syntax error": "{% for %}",
}


@mutation("tok.json", "tokenizer files")
def _tok_json(ctx: Ctx):
    kind = ctx.pick(["invalid", "list", "string", "empty object", "model int", "vocab int", "truncated", "deep",
                     "not utf-8", "decoder junk"])
    text = ctx.path("tokenizer.json").read_text()
    tj = json.loads(text)
    data = {"invalid": "{", "list": "[]", "string": '"x"', "empty object": "{}", "model int": '{"model": 5}',
            "truncated": text[: len(text) // 2], "deep": _deep(100_000, "list")}.get(kind)
    if kind == "vocab int":
        tj["model"]["vocab"] = 5
        data = json.dumps(tj)
    elif kind == "decoder junk":
        tj["decoder"] = ctx.pick([5, [], {"type": 5}, {"type": "Sequence", "decoders": 5}, {"decoders": [1]}])
        data = json.dumps(tj)
    if kind == "not utf-8":
        ctx.write_bytes("tokenizer.json", b'{"\xff\xfe": 1}')
    else:
        ctx.write_text("tokenizer.json", data)
    ctx.note(f"tokenizer.json: {kind}")
    ctx.maybe_seal("tokenizer.json")


@mutation("tok.config", "tokenizer files")
def _tok_config(ctx: Ctx):
    tc = ctx.read_json("tokenizer_config.json")
    kind = ctx.pick(["chat_template int", "chat_template list", "chat_template dict", "eos dict", "max length str",
                     "added_tokens junk", "tokenizer_class", "auto_map", "tokenizer_file outside", "vocab_file outside",
                     "not an object", "chat_template_type"])
    if kind == "chat_template int":
        tc["chat_template"] = 5
    elif kind == "chat_template list":
        tc["chat_template"] = ctx.pick([[{"name": "default"}], [{"name": "default", "template": 5}], [1, 2]])
    elif kind == "chat_template dict":
        tc["chat_template"] = {"default": "x"}
    elif kind == "eos dict":
        tc["eos_token"] = ctx.pick([{"content": 5}, 5, ["a"], {"content": "<|im_end|>", "special": "x"}])
    elif kind == "max length str":
        tc["model_max_length"] = ctx.pick(["x", -1, None, 1e400 if False else 1e308])
    elif kind == "added_tokens junk":
        tc["added_tokens_decoder"] = ctx.pick([{"abc": {"content": "x"}}, [], {"5": 5}, {str(10**9): {"content": "x"}}])
    elif kind == "tokenizer_class":
        tc["tokenizer_class"] = ctx.pick(["EvilTokenizer", "LlamaTokenizer", 5, "", "os.system", "../x"])
    elif kind == "auto_map":
        ctx.write_text("evil_tokenizer.py", "raise SystemExit('remote code ran')\n")
        tc["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    elif kind == "tokenizer_file outside":
        tc["tokenizer_file"] = str(ctx.canary("tokenizer.json", ctx.read_bytes("tokenizer.json")))
    elif kind == "vocab_file outside":
        tc[ctx.pick(["vocab_file", "merges_file"])] = str(ctx.canary("vocab.json", "{}"))
    elif kind == "not an object":
        tc = ctx.pick([[], "x", 5, None])
    else:
        tc["chat_template_type"] = ctx.pick(["junk", "../x", "os", "", 5])
    ctx.write_json("tokenizer_config.json", tc)
    ctx.note(f"tokenizer_config.json: {kind}")
    ctx.maybe_seal("tokenizer_config.json")


@mutation("tok.template_symlink", "tokenizer files")
def _tok_template_symlink(ctx: Ctx):
    template = ctx.read_json("tokenizer_config.json").get("chat_template") or "{{ messages }}"
    if ctx.chance(0.7):  # the same template as inside: reading it changes nothing visible
        target = ctx.canary("chat_template.jinja", template)
    else:
        target = "/etc/passwd"
    ctx.link("chat_template.jinja", target)
    ctx.note(f"chat_template.jinja -> {target}")


@mutation("tok.template_bomb", "tokenizer files")
def _tok_template_bomb(ctx: Ctx):
    kind = ctx.pick(sorted(TEMPLATE_BOMBS))
    tc = ctx.read_json("tokenizer_config.json")
    template = TEMPLATE_BOMBS[kind]
    if ctx.chance(0.5):  # prefixed to the real template: if it finished, the output would be the same
        template = template + (tc.get("chat_template") or "")
    if ctx.chance(0.5):
        tc["chat_template"] = template
        ctx.write_json("tokenizer_config.json", tc)
        ctx.note(f"tokenizer_config.json chat_template: {kind}")
        ctx.maybe_seal("tokenizer_config.json")
    else:
        ctx.write_text("chat_template.jinja", template)
        ctx.note(f"chat_template.jinja (unlisted): {kind}")


@mutation("tok.tool_parser", "tokenizer files")
def _tok_tool_parser(ctx: Ctx):
    tc = ctx.read_json("tokenizer_config.json")
    key = ctx.pick(["tool_parser_type", "chat_template_type"])
    value = ctx.pick(["junk", "../json", "os", "", 5, "json_tools.x", "__init__", "mlx_lm.utils", None, [], "qwen3_coder "])
    tc[key] = value
    ctx.write_json("tokenizer_config.json", tc)
    ctx.note(f"{key} = {value!r}")
    ctx.maybe_seal("tokenizer_config.json")


@mutation("tok.additional_templates", "tokenizer files")
def _tok_additional_templates(ctx: Ctx):
    kind = ctx.pick(["file -> /etc/passwd", "file -> outside", "dir -> outside", "bomb", "not a dir"])
    template = ctx.read_json("tokenizer_config.json").get("chat_template") or "{{ messages }}"
    if kind == "file -> /etc/passwd":
        ctx.link("additional_chat_templates/x.jinja", "/etc/passwd")
    elif kind == "file -> outside":
        ctx.link("additional_chat_templates/tool_use.jinja", ctx.canary("tool_use.jinja", template))
    elif kind == "dir -> outside":
        ctx.canary("templates/tool_use.jinja", template)
        ctx.link("additional_chat_templates", ctx.outside / "templates")
    elif kind == "bomb":
        ctx.write_text("additional_chat_templates/tool_use.jinja", TEMPLATE_BOMBS["nested loops"])
    else:
        ctx.write_text("additional_chat_templates", "not a folder")
    ctx.note(f"additional_chat_templates: {kind}")


@mutation("tok.missing", "tokenizer files")
def _tok_missing(ctx: Ctx):
    rel = ctx.pick(["tokenizer.json", "tokenizer_config.json"])
    ctx.remove(rel)
    ctx.note(f"{rel} deleted")
    if rel == "tokenizer.json":
        ctx.maybe_seal(rel)
    else:  # unlisted too, it would be a valid bundle without a chat template (a base model's)
        ctx.note("still listed in bundle.json")


@mutation("tok.symlink_outside", "tokenizer files")
def _tok_symlink_outside(ctx: Ctx):
    ctx.link_outside(ctx.pick(["tokenizer.json", "tokenizer_config.json", "generation_config.json"]))


# ======================================================================= profile/

FREQ = "profile/frequency.parquet"


@mutation("prof.frequency", "profile/")
def _prof_frequency(ctx: Ctx):
    rows, schema = ctx.rows(FREQ)
    i = ctx.rng.randrange(len(rows))
    kind = ctx.pick(["expert 10**9", "layer 10**6", "expert -1", "share nan", "share inf", "count -5", "null expert",
                     "extra layer"])
    r = rows[i]
    if kind == "expert 10**9":
        r["expert"] = 10**9
    elif kind == "layer 10**6":
        r["layer"] = 10**6
    elif kind == "expert -1":
        r["expert"] = -1
    elif kind == "share nan":
        r["share"] = float("nan")
    elif kind == "share inf":
        r["share"] = float("inf")
    elif kind == "count -5":
        r["count"] = -5
    elif kind == "null expert":
        r["expert"] = None
    else:
        rows.append({**r, "layer": 99})
    ctx.write_rows(rows, schema, FREQ)
    ctx.note(f"{FREQ} row {i}: {kind}")
    ctx.maybe_seal(FREQ)


@mutation("prof.columns", "profile/")
def _prof_columns(ctx: Ctx):
    import pyarrow as pa

    t = ctx.table(FREQ)
    names = t.column_names
    kind = ctx.pick(["drop", "rename", "expert as string", "share as string", "empty", "extra"])
    if kind == "drop":
        col = ctx.pick(names)
        t = t.drop([col])
        kind += f" {col}"
    elif kind == "rename":
        col = ctx.pick(names)
        t = t.rename_columns([c + "_x" if c == col else c for c in names])
        kind += f" {col}"
    elif kind == "expert as string":
        t = t.set_column(names.index("expert"), "expert", pa.array([str(x) for x in t["expert"].to_pylist()]))
    elif kind == "share as string":
        col = "share" if "share" in names else names[-1]
        t = t.set_column(names.index(col), col, pa.array(["x"] * t.num_rows))
    elif kind == "empty":
        t = t.slice(0, 0)
    else:
        t = t.append_column("evil", pa.array([1] * t.num_rows))
    ctx.write_table(FREQ, t)
    ctx.note(f"{FREQ}: {kind}")
    ctx.maybe_seal(FREQ)


@mutation("prof.truncated", "profile/")
def _prof_truncated(ctx: Ctx):
    _damage_bytes(ctx, FREQ)
    ctx.maybe_seal(FREQ)


@mutation("prof.symlink_outside", "profile/")
def _prof_symlink_outside(ctx: Ctx):
    if ctx.chance(0.3):
        copy = ctx.outside_copy("profile")
        ctx.link("profile", copy)
        ctx.note(f"profile/ -> {copy}")
    else:
        ctx.link_outside(FREQ)


@mutation("prof.missing", "profile/")
def _prof_missing(ctx: Ctx):
    if ctx.chance(0.3):
        ctx.remove("profile")
        ctx.note("profile/ deleted")
        ctx.maybe_seal(*[r for r in ctx.files() if r.startswith("profile/")])
    else:
        ctx.remove(FREQ)
        ctx.note(f"{FREQ} deleted")
        ctx.maybe_seal(FREQ)


# ======================================================================= unlisted files and links


@mutation("extra.unlisted_file", "unlisted files")
def _extra_unlisted_file(ctx: Ctx):
    kind = ctx.pick(["chat_template.jinja", "chat_template.json", "added_tokens.json", "special_tokens_map.json",
                     "tokenizer.model", "experts/layer_003.bin", "model.safetensors", "evil.py",
                     "generation_config.json", "preprocessor_config.json", "vocab.json"])
    content = {
        "chat_template.jinja": "{{ 'pwned' }}",
        "chat_template.json": json.dumps({"chat_template": "{{ 'pwned' }}"}),
        "added_tokens.json": json.dumps({"<evil>": 5, "<evil2>": 10**9}),
        "special_tokens_map.json": json.dumps({"eos_token": "x", "bos_token": {"content": 5}}),
        "tokenizer.model": "\x00junk" * 100,
        "experts/layer_003.bin": "\x00" * 16384,
        "model.safetensors": "\x00" * 64,
        "evil.py": "raise SystemExit('bundle code ran')\n",
        "generation_config.json": json.dumps({"eos_token_id": [5, 10**9], "temperature": "x"}),
        "preprocessor_config.json": "{",
        "vocab.json": "[]",
    }[kind]
    if kind == "generation_config.json":  # listed in the seed: unlist it, then change it
        meta = ctx.meta()
        meta["files"].pop(kind, None)
        ctx.set_meta(meta)
        ctx.remove(kind)
    ctx.write_text(kind, content)
    ctx.note(f"unlisted {kind}")


@mutation("extra.unlisted_symlink", "unlisted files")
def _extra_unlisted_symlink(ctx: Ctx):
    template = ctx.read_json("tokenizer_config.json").get("chat_template") or "{{ messages }}"
    kind = ctx.pick(["special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                     "additional_chat_templates/x.jinja", "vocab.json", "tokenizer.model", "model.safetensors",
                     "experts/layer_003.bin", "profile/extra.parquet", "notes.txt"])
    if kind == "additional_chat_templates/x.jinja" or ctx.chance(0.2):
        target = "/etc/passwd"
    else:
        data = {"special_tokens_map.json": "{}", "added_tokens.json": "{}", "chat_template.jinja": template,
                "chat_template.json": json.dumps({"chat_template": template})}.get(kind, "canary")
        target = ctx.canary(kind.replace("/", "__"), data)
    ctx.link(kind, target)
    ctx.note(f"unlisted {kind} -> {target}")


# ======================================================================= bundle as a HF cache snapshot


def arrange_snapshot(seed: Path, case_dir: Path) -> tuple[Path, Path]:
    """Lay the seed out as huggingface_hub does: snapshots/<commit>/<file> -> ../../blobs/<sha256>.
    Returns (snapshot folder, blobs folder)."""
    repo = case_dir / "hub" / "models--fuzz--seed"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    for src in sorted(p for p in seed.rglob("*") if p.is_file()):
        rel = src.relative_to(seed)
        data = src.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap, blobs


@mutation("snap.clean", "HF snapshot", layout="snapshot")
def _snap_clean(ctx: Ctx):
    ctx.note("the seed as a HF cache snapshot (every file a link into blobs/)")


@mutation("snap.outside", "HF snapshot", layout="snapshot")
def _snap_outside(ctx: Ctx):
    rel = ctx.pick(["config.json", "tokenizer.json", "experts/layer_001.bin", RES, "layout.parquet", "bundle.json"])
    copy = ctx.canary(rel.replace("/", "__"), ctx.read_bytes(rel))
    ctx.link(rel, copy)
    ctx.note(f"snapshot {rel} -> {copy} (not a blob)")


@mutation("snap.blob_swap", "HF snapshot", layout="snapshot")
def _snap_blob_swap(ctx: Ctx):
    a, b = ctx.rng.sample(["config.json", "tokenizer.json", "tokenizer_config.json", "experts/layer_000.bin",
                           "experts/layer_001.bin", RES, "layout.parquet", FREQ], 2)
    target = os.readlink(ctx.path(b))
    ctx.link(a, os.path.relpath(os.path.join(ctx.path(b).parent, target), ctx.path(a).parent))
    ctx.note(f"snapshot {a} links to the blob of {b}")


@mutation("control", "control")
def _control(ctx: Ctx):
    ctx.note("unmutated seed")


# ======================================================================= case ids


def class_names() -> list[str]:
    return list(MUTATIONS)


def case_ids(n: int, seed: int = 0, classes: list[str] | None = None) -> list[str]:
    """n case ids, the classes in turn (every class gets n // len(classes) or one more)."""
    names = classes or class_names()
    out = []
    for i in range(n):
        case_seed = random.Random(f"{seed}:{i}").randrange(10**6)
        out.append(f"{names[i % len(names)]}-{case_seed}")
    return out


def parse_case_id(case_id: str) -> tuple[str, int]:
    name, _, seed = case_id.rpartition("-")
    if name not in MUTATIONS:
        raise ValueError(f"unknown mutation class in case id {case_id!r}")
    return name, int(seed)


def prepare_case(case_id: str, seed_bundle: Path, case_dir: Path) -> dict:
    """Copy the seed into case_dir, apply the case's mutation. Returns what the child needs."""
    name, seed = parse_case_id(case_id)
    m = MUTATIONS[name]
    case_dir.mkdir(parents=True)
    outside = case_dir / "outside"
    outside.mkdir()
    blobs = None
    if m.layout == "snapshot":
        bundle, blobs = arrange_snapshot(seed_bundle, case_dir)
    else:
        bundle = case_dir / "bundle"
        shutil.copytree(seed_bundle, bundle, symlinks=True)
    ctx = Ctx(bundle, outside, random.Random(f"{name}:{seed}"), case_dir)
    m.func(ctx)
    return {"bundle": str(bundle), "outside": str(outside), "blobs": str(blobs) if blobs else None,
            "notes": ctx.notes, "class": name, "file": m.file}


# ======================================================================= the child: run the steps


class _Audit:
    """The audit hook's state: what may be opened, and what was (outside that)."""

    def __init__(self, bundle: str, blobs: str | None, allowed_roots: list[str], allowed_files: list[str],
                 listable: list[str]):
        self.bundle_abs = os.path.abspath(bundle)
        self.bundle_real = os.path.realpath(bundle)
        self.blobs = os.path.realpath(blobs) if blobs else None
        self.roots = [r for r in allowed_roots if r]
        self.files = set(allowed_files)
        self.listable = set(listable)
        self.active = False
        self.escapes: list[dict] = []

    @staticmethod
    def _inside(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    def judge(self, event: str, path) -> str | None:
        """Why opening `path` is an escape, or None."""
        if isinstance(path, int) or path is None and event == "open":
            return None
        p = os.fsdecode(path) if path is not None else "."
        a = os.path.abspath(p)
        r = os.path.realpath(a)
        if self._inside(r, self.bundle_real) or (self.blobs and self._inside(r, self.blobs)):
            return None
        if self._inside(a, self.bundle_abs) or self._inside(a, self.bundle_real):
            return f"{p!s} leads out of the bundle to {r}"
        if event in ("os.listdir", "os.scandir") and (a in self.listable or r in self.listable):
            return None  # the import system lists sys.path entries
        if r in self.files or any(self._inside(r, root) for root in self.roots):
            return None
        return f"{r} is outside the bundle"

    def hook(self, event: str, args) -> None:
        if not self.active:
            return
        try:
            why = None
            if event == "open":
                why = self.judge(event, args[0])
            elif event in ("os.listdir", "os.scandir"):
                why = self.judge(event, args[0] if args else None)
            elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                           "os.chmod", "os.chown", "shutil.rmtree"):
                why = self.judge("open", args[0])
            elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                           "os.forkpty", "pty.spawn"):
                why = f"started a process: {event} {str(args)[:200]}"
            elif event in ("socket.connect", "socket.bind", "socket.getaddrinfo"):
                why = f"network: {event} {str(args)[:200]}"
            if why and len(self.escapes) < 20:
                self.escapes.append({"event": event, "why": why})
        except Exception:  # the hook must never change what it watches
            pass


def _our_dirs() -> dict[str, str]:
    """Folder -> display prefix of moestream's own modules (a frame there is 'our code')."""
    out = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and (name == "moestream" or name.startswith("moestream.")):
            pkg = name if os.path.basename(f) == "__init__.py" else name.rpartition(".")[0]
            prefix = "moestream" if pkg == "moestream" else pkg[len("moestream.") :].replace(".", "/")
            out[os.path.dirname(os.path.realpath(f))] = prefix
            out[os.path.dirname(f)] = prefix
    return out


def _frame_text(fs, ours: dict[str, str] | None = None) -> str:
    d = os.path.dirname(fs.filename)
    if ours and d in ours:
        return f"{ours[d]}/{os.path.basename(fs.filename)}:{fs.lineno}"
    parts = Path(fs.filename).parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif len(parts) > 3:
        parts = parts[-3:]
    return f"{'/'.join(parts)}:{fs.lineno} ({fs.name})"


def _error_info(e: BaseException) -> dict:
    from moestream.common.errors import MoestreamError

    frames = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__), lookup_lines=False)
    ours = _our_dirs()
    mine = [f for f in frames if os.path.dirname(f.filename) in ours]
    t = type(e)
    return {
        "type": t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}",
        "named": isinstance(e, MoestreamError),
        "message": str(e)[:400],
        "where_ours": _frame_text(mine[-1], ours) if mine else None,
        "where": _frame_text(frames[-1], ours) if len(frames) else None,
    }


def _b64(a) -> str:
    return base64.b64encode(a.tobytes()).decode()


def _tokens(x) -> list[int]:
    if hasattr(x, "get") and not isinstance(x, list):  # a BatchEncoding
        x = x.get("input_ids", x)
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [int(t) for t in x]


def _run_model(audit: _Audit, bundle: str, step: str, policy: str) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    import moestream

    out: dict = {}
    with_budget = step == "budget"
    audit.active = True
    try:
        if with_budget:
            plan = moestream.plan_memory(bundle, expert_cache_share=EXPERT_CACHE_SHARE)
            lm = moestream.load(bundle, memory_budget=plan.budget_bytes, cache_policy=policy)
        else:
            lm = moestream.load(bundle, verify=step == "load_verify")
        model, tokenizer = lm
        try:
            logits = model(mx.array([PROMPT])).astype(mx.float32)
            mx.eval(logits)
            out["logits"] = np.array(logits)
            if step in ("load", "budget"):
                toks = []
                for (tok, _), _i in zip(generate_step(mx.array(PROMPT), model, max_tokens=GEN_TOKENS),
                                        range(GEN_TOKENS), strict=False):
                    toks.append(int(tok))
                out["tokens"] = toks
            if step == "load":
                if getattr(tokenizer, "has_chat_template", True) is False:
                    out["template"] = None  # no template at all: nothing to apply (compared as such)
                else:
                    out["template"] = _tokens(tokenizer.apply_chat_template(
                        [{"role": "user", "content": "hi"}], add_generation_prompt=True))
        finally:
            moestream.runtime_of(model).close()
    finally:
        audit.active = False
    a = out.pop("logits")
    out["logits_shape"] = list(a.shape)
    out["logits"] = _b64(a.astype("float32"))
    return out


def _run_cli(audit: _Audit, argv: list[str]) -> dict:
    import warnings

    from moestream import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audit.active = True
        try:
            rc = cli.main(argv)
        finally:
            audit.active = False
    err = stderr.getvalue()
    lines = [x for x in err.splitlines() if x.strip()]
    out = {"rc": rc, "stdout": stdout.getvalue()[-4000:], "stderr": err[:1000] + ("..." + err[-1000:] if len(err) > 2000 else err[1000:2000]),
           "stderr_lines": len(lines), "stderr_chars": len(err), "stderr_first": lines[0][:300] if lines else "",
           "warnings": [str(w.message)[:200] for w in caught[:5]]}
    if argv[0] == "inspect" and rc == 0:
        try:
            info = json.loads(stdout.getvalue())
            info.pop("path", None)
            out["inspect"] = info
        except ValueError:
            out["inspect_error"] = "not JSON"
    return out


def _child(spec: dict, wfd: int) -> None:
    """In the forked child: run every step, one JSON line each to the pipe; never returns."""
    def send(obj) -> None:
        data = (json.dumps(obj, default=str) + "\n").encode()
        while data:
            data = data[os.write(wfd, data):]

    try:
        os.setpgrp()
        log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        import resource

        vm = _vm_bytes()
        limit = vm + CHILD_MEMORY
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        audit = _Audit(spec["bundle"], spec.get("blobs"), spec["allowed_roots"], spec["allowed_files"],
                       spec["listable"])
        sys.addaudithook(audit.hook)
        bundle, policy = spec["bundle"], spec["policy"]
        skip_models = False
        for step in spec.get("steps", STEPS):
            if skip_models and step in MODEL_STEPS:
                send({"skipped": step})
                continue
            send({"start": step})
            t0 = time.perf_counter()
            seen = len(audit.escapes)
            res: dict = {"step": step}
            try:
                if step == "inspect":
                    res["out"] = _run_cli(audit, ["inspect", bundle, "--json"])
                elif step == "verify_cli":
                    res["out"] = _run_cli(audit, ["verify", bundle])
                elif step == "probe":  # harness self-test: read outside the bundle on purpose
                    audit.active = True
                    try:
                        _probe(spec)
                    finally:
                        audit.active = False
                    res["out"] = {}
                else:
                    res["out"] = _run_model(audit, bundle, step, policy)
                res["ok"] = True
            except BaseException as e:  # noqa: B036 - SystemExit from argparse etc. is a finding too
                audit.active = False
                res["ok"] = False
                res["error"] = _error_info(e)
            res["seconds"] = round(time.perf_counter() - t0, 3)
            res["escapes"] = audit.escapes[seen:]
            send(res)
            if spec.get("fast") and step in MODEL_STEPS and not res["ok"] and res["error"]["named"]:
                skip_models = True  # the other loads pass the same gate first
        send({"done": True})
    except BaseException as e:  # noqa: B036
        try:
            send({"harness_error": repr(e), "traceback": traceback.format_exc()[-3000:]})
        except BaseException:  # noqa: B036
            pass
    finally:
        os._exit(0)


def _probe(spec: dict) -> None:
    """Self-test of the escape detectors: a Python-level read of one canary (the audit hook must see
    it) and a C-level read of another (only inotify can)."""
    import numpy as np

    outside = Path(spec["outside"])
    with open(outside / "probe_python.txt") as f:
        f.read()
    np.fromfile(str(outside / "probe_c.bin"), dtype=np.uint8)


def _vm_bytes() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


# ======================================================================= inotify (C-level opens of canaries)


class _Inotify:
    """IN_OPEN / IN_ACCESS events on the canary folders (Linux); None elsewhere."""

    IN_ACCESS, IN_OPEN, IN_ISDIR = 0x1, 0x20, 0x40000000

    def __init__(self):
        self.fd = None
        self.wds: dict[int, str] = {}
        if not sys.platform.startswith("linux"):
            return
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            self.fd = fd if fd >= 0 else None
        except (OSError, AttributeError):
            self.fd = None

    def watch(self, folder: Path) -> None:
        if self.fd is None:
            return
        for d in [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(d), self.IN_OPEN | self.IN_ACCESS)
            if wd >= 0:
                self.wds[wd] = str(d)

    def events(self) -> list[str]:
        if self.fd is None:
            return []
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            i = 0
            while i + 16 <= len(data):
                wd, mask, _cookie, n = struct.unpack_from("iIII", data, i)
                name = data[i + 16 : i + 16 + n].split(b"\0", 1)[0].decode(errors="replace")
                i += 16 + n
                if wd in self.wds:
                    what = "listed" if mask & self.IN_ISDIR else "opened"
                    out.append(f"{what} {os.path.join(self.wds[wd], name) if name else self.wds[wd]}")
        return sorted(set(out))

    def close(self) -> None:
        if self.fd is not None:
            for wd in self.wds:
                self.libc.inotify_rm_watch(self.fd, wd)
            os.close(self.fd)
            self.fd = None


# ======================================================================= classification


def _decode_logits(out: dict):
    import numpy as np

    return np.frombuffer(base64.b64decode(out["logits"]), dtype=np.float32).reshape(out["logits_shape"])


def compare_model_output(out: dict, ref: dict) -> str | None:
    """Why a model step's output differs from the seed's, or None."""
    if out.get("logits_shape") != ref.get("logits_shape"):
        return f"logits shape {out.get('logits_shape')} != {ref.get('logits_shape')}"
    import numpy as np

    a, b = _decode_logits(out), _decode_logits(ref)
    if not np.all(np.isfinite(a)):
        return "logits not finite"
    scale = float(np.max(np.abs(b))) or 1.0
    diff = float(np.max(np.abs(a - b)))
    if diff > LOGIT_RTOL * scale:
        return f"logits differ (max |diff| {diff:.3g}, max |logit| {scale:.3g})"
    for key in ("tokens", "template"):
        if out.get(key) != ref.get(key):
            return f"{key} differ: {str(out.get(key))[:80]} != {str(ref.get(key))[:80]}"
    return None


def classify_step(res: dict, ref: dict | None) -> tuple[str, str]:
    """(outcome, detail) of one finished step."""
    step = res["step"]
    if not res.get("ok"):
        err = res["error"]
        kind = "named" if err["named"] else "crash"
        return kind, f"{err['type']}: {err['message'][:160]}"
    out = res["out"]
    if step in ("inspect", "verify_cli"):
        rc, err, n = out["rc"], out["stderr"].strip(), out["stderr_lines"]
        if rc == 2 and n == 1 and out["stderr_first"].startswith("moestream "):
            size = f" [a line of {out['stderr_chars']} characters]" if out["stderr_chars"] > 1000 else ""
            return "named", out["stderr_first"][:200] + size
        if rc == 0 and not n and "inspect_error" not in out:
            return "same", ""
        return "crash", f"rc {rc}, {n} lines on stderr: {err[-300:]!r}{' (not JSON)' if 'inspect_error' in out else ''}"
    if step == "probe":
        return "same", ""
    why = compare_model_output(out, ref[step]) if ref and step in ref else None
    return ("wrong", why) if why else ("same", "")


def classify(results: list[dict], ref: dict | None, *, timed_out: bool, exit_status: str | None,
             inotify: list[str]) -> dict:
    """The case's outcome: the worst of its steps; escapes first (audit hook or inotify)."""
    steps, started, finished, escapes = [], None, set(), []
    harness_error = None
    for msg in results:
        if "start" in msg:
            started = msg["start"]
        elif "step" in msg:
            finished.add(msg["step"])
            kind, detail = classify_step(msg, ref)
            steps.append({"step": msg["step"], "outcome": kind, "detail": detail, "seconds": msg.get("seconds"),
                          "error": msg.get("error")})
            escapes += [f"{msg['step']}: {e['why']}" for e in msg.get("escapes", [])]
        elif "skipped" in msg:
            steps.append({"step": msg["skipped"], "outcome": "skipped", "detail": "fast mode: an earlier load was refused"})
        elif "harness_error" in msg:
            harness_error = msg
    done = any(msg.get("done") for msg in results)
    if started and started not in finished:
        if timed_out:
            steps.append({"step": started, "outcome": "hang", "detail": "ran past the per-step timeout"})
        else:
            steps.append({"step": started, "outcome": "crash", "detail": f"the child died: {exit_status}"})
    elif not done and not timed_out:
        steps.append({"step": started or "-", "outcome": "crash",
                      "detail": f"the child died between steps: {exit_status}"})
    elif timed_out and not done:
        steps.append({"step": started or "-", "outcome": "hang", "detail": "ran past the per-step timeout"})
    escapes += [f"inotify: {e}" for e in inotify]
    outcome = max((s["outcome"] for s in steps), key=SEVERITY.__getitem__, default="crash")
    if escapes:
        outcome = "escape"
    return {"outcome": outcome, "steps": steps, "escapes": escapes,
            "harness_error": harness_error}


# ======================================================================= running one case (in a worker)

_WORKER: dict = {}


def _allowed() -> dict:
    """What the interpreter may open besides the bundle (computed once per worker)."""
    import site
    import sysconfig

    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib", "include", "platinclude"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(os.path.realpath(p))
    for p in [*site.getsitepackages(), site.getusersitepackages(), sys.prefix, sys.base_prefix, sys.exec_prefix]:
        if p and os.path.basename(p) in ("site-packages", "dist-packages"):
            roots.add(os.path.realpath(p))
    roots.add(os.path.realpath(os.path.join(sys.base_prefix, "lib")))  # lib/pythonX.Y, lib-dynload, zip
    for pkg in ("moestream", "moestream.common", "moestream.manifests", "moestream.runtime", "moestream.stages",
                "moestream.flows", "moestream.calibration"):
        import importlib.util

        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            roots.add(os.path.realpath(loc))
    roots.update(["/proc", "/sys", "/dev"])
    files = [str(HERE), str(HERE.with_suffix(".pyc"))]
    listable = sorted({os.path.realpath(p or os.getcwd()) for p in sys.path} |
                      {os.path.abspath(p or os.getcwd()) for p in sys.path})
    return {"allowed_roots": sorted(roots), "allowed_files": files, "listable": listable}


def _worker_init(env: dict | None = None) -> None:
    """Set the environment, then import what every case uses, so that the per-case child (a fork)
    starts warm. No MLX computation happens here: a fork must not inherit MLX's worker threads."""
    os.environ.update(WORKER_ENV)
    os.environ.pop("MOESTREAM_DEBUG", None)
    if env:
        os.environ.update(env)
    tempfile.gettempdir()  # resolved now, not by a probe file in the child
    import mlx.core  # noqa: F401
    import mlx_lm.generate  # noqa: F401
    import mlx_lm.tokenizer_utils  # noqa: F401
    import numpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import transformers  # noqa: F401

    import moestream
    import moestream.cli  # noqa: F401
    import moestream.manifests.describe  # noqa: F401
    import moestream.runtime.model.load  # noqa: F401

    try:
        import mlx_lm.models.qwen3_moe  # noqa: F401
    except ImportError:
        pass
    _WORKER.update(_allowed())
    _WORKER["moestream"] = moestream.__file__


def run_case(spec: dict) -> dict:
    """Prepare, run and classify one case (in a worker process that `_worker_init` warmed).

    spec: id, seed_bundle, workdir, timeout, reference (path of the seed's results or None),
    policy, keep, steps (optional), probe (optional: the escape detectors' self-test)."""
    if not _WORKER:
        _worker_init()
    t0 = time.perf_counter()
    case_id = spec["id"]
    case_dir = Path(spec["workdir"]) / case_id.replace("/", "_")
    if case_dir.exists():
        shutil.rmtree(case_dir)
    result = {"id": case_id, "class": case_id.rpartition("-")[0]}
    try:
        prep = prepare_case(case_id, Path(spec["seed_bundle"]), case_dir)
    except Exception as e:  # a mutation that cannot apply is a harness bug: report it, loudly
        result.update(outcome="harness", notes=[f"mutation failed: {e!r}"], steps=[], escapes=[],
                      file=MUTATIONS[result["class"]].file if result["class"] in MUTATIONS else "?",
                      traceback=traceback.format_exc()[-2000:])
        if not spec.get("keep"):
            shutil.rmtree(case_dir, ignore_errors=True)
        return result
    steps = list(spec.get("steps") or STEPS)
    if spec.get("probe"):
        (Path(prep["outside"]) / "probe_python.txt").write_text("canary")
        (Path(prep["outside"]) / "probe_c.bin").write_bytes(b"canary")
        steps = ["probe", *steps]
    child_spec = {**prep, **{k: _WORKER[k] for k in ("allowed_roots", "allowed_files", "listable")},
                  "log": str(case_dir / "child.log"), "policy": spec["policy"], "steps": steps,
                  "fast": bool(spec.get("fast"))}
    ino = _Inotify()
    ino.watch(Path(prep["outside"]))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(rfd)
        _child(child_spec, wfd)
    os.close(wfd)
    messages, buf, timed_out = [], b"", False
    deadline = time.monotonic() + spec["timeout"]  # per step: renewed as each step starts
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([rfd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            new = [json.loads(x) for x in lines if x.strip()]
            if any("start" in m for m in new):
                deadline = time.monotonic() + spec["timeout"]
            messages += new
    if timed_out:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(rfd)
    if os.WIFSIGNALED(status):
        exit_status = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        exit_status = f"exit code {os.WEXITSTATUS(status)}"
    inotify = ino.events()
    ino.close()
    ref = _load_reference(spec.get("reference"))
    verdict = classify(messages, ref, timed_out=timed_out, exit_status=exit_status, inotify=inotify)
    log_tail = ""
    with contextlib.suppress(OSError):
        log_tail = (case_dir / "child.log").read_text(errors="replace")[-1500:]
    if verdict["harness_error"]:
        verdict["outcome"] = "harness"
    verdict["escapes"] = [e.replace(str(case_dir), "<case>") for e in verdict["escapes"]]
    result.update(file=prep["file"], notes=prep["notes"], **verdict, exit=exit_status, timed_out=timed_out,
                  seconds=round(time.perf_counter() - t0, 2), log_tail=log_tail if verdict["outcome"] in
                  ("crash", "hang", "harness") else "")
    if spec.get("raw"):
        result["raw"] = messages
    if not spec.get("keep"):
        shutil.rmtree(case_dir, ignore_errors=True)
    else:
        result["case_dir"] = str(case_dir)
    return result


_REF_CACHE: dict = {}


def _load_reference(path: str | None) -> dict | None:
    if not path:
        return None
    if path not in _REF_CACHE:
        _REF_CACHE[path] = json.loads(Path(path).read_text())
    return _REF_CACHE[path]


def _reference(spec: dict) -> dict:
    """Run the unmutated seed once; its step outputs are what `same` means."""
    r = run_case({**spec, "id": f"control-{spec.get('ref_seed', 0)}", "reference": None, "raw": True})
    bad = [s for s in r["steps"] if s["outcome"] != "same"]
    if r["outcome"] != "same" or bad:
        raise RuntimeError(f"the seed bundle does not run cleanly, so nothing can be compared: {json.dumps(r)[:3000]}")
    ref = {m["step"]: m["out"] for m in r["raw"] if "step" in m}
    return ref


# ======================================================================= running many cases


class FuzzRunner:
    """A pool of warmed workers (spawned processes) that run cases; each case forks one child.

    workers=0 runs the cases in this process (it then imports MLX and moestream itself)."""

    def __init__(self, seed_bundle: str | Path, workdir: str | Path, *, workers: int = 2,
                 timeout: float = DEFAULT_TIMEOUT, keep: bool = False):
        self.seed_bundle = Path(seed_bundle).resolve()
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.timeout, self.keep, self.workers = timeout, keep, workers
        self.policy = "lrfu" if (self.seed_bundle / FREQ).is_file() else "lru"
        self.env = {"HF_HOME": str(self.workdir / "hf-home"), "MOESTREAM_CACHE": str(self.workdir / "moestream-cache")}
        self.pool = None
        if workers > 0:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init,
                                                                  initargs=(self.env,))
        else:
            _worker_init(self.env)
        base = self._spec("control-0")
        ref = self._call(_reference, base)
        self.reference_path = self.workdir / "reference.json"
        self.reference_path.write_text(json.dumps(ref))
        self.reference = ref

    def _spec(self, case_id: str, **extra) -> dict:
        return {"id": case_id, "seed_bundle": str(self.seed_bundle), "workdir": str(self.workdir),
                "timeout": self.timeout, "policy": self.policy, "keep": self.keep,
                "reference": str(getattr(self, "reference_path", "")) or None, **extra}

    def _call(self, fn, arg):
        return self.pool.apply(fn, (arg,)) if self.pool else fn(arg)

    def run(self, ids: list[str], progress: Callable[[dict], None] | None = None, **extra) -> list[dict]:
        specs = [self._spec(i, **extra) for i in ids]
        results = []
        it = self.pool.imap_unordered(run_case, specs, chunksize=1) if self.pool else map(run_case, specs)
        for r in it:
            results.append(r)
            if progress:
                progress(r)
        order = {i: k for k, i in enumerate(ids)}
        return sorted(results, key=lambda r: order.get(r["id"], 0))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ======================================================================= reporting


def outcome_table(results: list[dict]) -> str:
    """Cases per class and outcome, grouped by file, with subtotals and a total."""
    cols = list(OUTCOMES) + (["harness"] if any(r["outcome"] == "harness" for r in results) else [])
    by_class: dict[str, Counter] = defaultdict(Counter)
    file_of = {}
    for r in results:
        by_class[r["class"]][r["outcome"]] += 1
        file_of[r["class"]] = r.get("file", "?")
    order = [c for c in MUTATIONS if c in by_class] + sorted(c for c in by_class if c not in MUTATIONS)
    w = max([len(c) for c in order] + [24]) + 2
    head = f"{'class':<{w}}{'cases':>6}" + "".join(f"{c:>8}" for c in cols)
    lines = [head, "-" * len(head)]
    total: Counter = Counter()
    files: dict[str, list[str]] = defaultdict(list)
    for c in order:
        files[file_of[c]].append(c)

    def row(label, counter):
        return f"{label:<{w}}{sum(counter.values()):>6}" + "".join(f"{counter.get(c, 0) or '.':>8}" for c in cols)

    for f, classes in files.items():
        sub: Counter = Counter()
        for c in classes:
            lines.append(row("  " + c, by_class[c]))
            sub.update(by_class[c])
        lines.append(row(f"[{f}]", sub))
        total.update(sub)
    lines.append("-" * len(head))
    lines.append(row("TOTAL", total))
    return "\n".join(lines)


def _failure_step(r: dict) -> dict | None:
    if r["outcome"] == "escape":
        for e in r["escapes"]:
            step = e.split(":", 1)[0]
            hit = [s for s in r["steps"] if s["step"] == step]
            if hit:
                return hit[0]
    return max(r["steps"], key=lambda s: SEVERITY.get(s["outcome"], 0), default=None)


def describe_failure(r: dict) -> str:
    s = _failure_step(r) or {}
    err = s.get("error") or {}
    parts = [f"{r['id']} [{r['outcome']}] {'; '.join(r.get('notes', []))[:200]}"]
    if r["outcome"] == "escape":
        parts.append("    seen: " + "; ".join(dict.fromkeys(e.split(": ", 1)[-1] for e in r["escapes"]))[:400])
    if s:
        parts.append(f"    step {s['step']} ({s['outcome']}): {s.get('detail', '')[:240] or 'no error'}")
    if err:
        parts.append(f"    {err.get('type')} raised at {err.get('where')}; innermost moestream frame: "
                     f"{err.get('where_ours')}")
    if r["outcome"] in ("crash", "hang") and not err and r.get("log_tail"):
        parts.append("    child log: " + r["log_tail"].strip().replace("\n", " | ")[-300:])
    return "\n".join(parts)


def failure_examples(results: list[dict], per_kind: int = 5) -> str:
    """A few failures of each kind, as varied as possible: distinct (error type, where) first,
    then distinct classes."""
    out = []
    for kind in (*FAILURES, "harness"):
        rs = [r for r in results if r["outcome"] == kind]
        if not rs:
            continue
        picked, seen_err, seen_class = [], set(), set()
        for r in rs:
            s = _failure_step(r) or {}
            err = s.get("error") or {}
            key = (err.get("type") or s.get("detail", "")[:40], err.get("where_ours"))
            if key not in seen_err and r["class"] not in seen_class:
                picked.append(r)
                seen_err.add(key)
                seen_class.add(r["class"])
        picked = (picked + [r for r in rs if r not in picked])[:per_kind]
        out.append(f"== {kind}: {len(rs)} cases; examples:")
        out += [describe_failure(r) for r in picked]
    return "\n".join(out)


def summarize(results: list[dict]) -> dict:
    return {
        "cases": len(results),
        "outcomes": dict(Counter(r["outcome"] for r in results)),
        "by_class": {c: dict(Counter(r["outcome"] for r in results if r["class"] == c))
                     for c in dict.fromkeys(r["class"] for r in results)},
    }


# ======================================================================= command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fuzz moestream with mutated bundles (see the module docstring).")
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every case's result here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per case")
    p.add_argument("--classes", default=None, help="comma list of class names or prefixes (e.g. lay.,tok.json)")
    p.add_argument("--case", action="append", default=[], help="run this case id (repeatable)")
    p.add_argument("--seed-bundle", default=None, help="a prepared seed bundle to reuse (made if missing)")
    p.add_argument("--workdir", default=None, help="where cases are made (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep each case's folder")
    p.add_argument("--fast", action="store_true",
                   help="skip the other loads once one is refused by name (what tests/test_fuzz.py does)")
    p.add_argument("--examples", type=int, default=5, help="example failures per outcome kind")
    p.add_argument("--list", action="store_true", help="list the mutation classes")
    args = p.parse_args(argv)
    if args.list:
        for name, m in MUTATIONS.items():
            print(f"{name:<28} {m.file}")
        return 0
    classes = None
    if args.classes:
        wanted = [x for x in args.classes.split(",") if x]
        classes = [c for c in MUTATIONS if any(c == w or c.startswith(w) for w in wanted)]
        if not classes:
            p.error(f"no class matches {args.classes}")
    ids = args.case or case_ids(args.cases, args.seed, classes)
    for i in ids:
        parse_case_id(i)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="moestream-fuzz-")))
        t0 = time.perf_counter()
        seed = make_seed(Path(args.seed_bundle) if args.seed_bundle else workdir / "seed")
        t_seed = time.perf_counter() - t0
        runner = stack.enter_context(FuzzRunner(seed, workdir / "cases", workers=args.workers,
                                                timeout=args.timeout, keep=args.keep))
        t1 = time.perf_counter()
        done = [0]

        def progress(r):
            done[0] += 1
            if r["outcome"] in FAILURES or len(ids) <= 20:
                print(f"[{done[0]}/{len(ids)}] {r['id']}: {r['outcome']}", file=sys.stderr, flush=True)

        results = runner.run(ids, progress, fast=args.fast)
        t_cases = time.perf_counter() - t1
    print(outcome_table(results))
    print()
    print(f"{len(results)} cases in {t_cases:.1f} s ({args.workers} workers, {args.timeout:g} s per step"
          f"{', fast' if args.fast else ''}; "
          f"seed {t_seed:.1f} s, workers and reference {t1 - t0 - t_seed:.1f} s)")
    ex = failure_examples(results, args.examples)
    if ex:
        print()
        print(ex)
    if args.case:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "raw"}, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summarize(results),
                                               "seconds": {"seed": t_seed, "cases": t_cases},
                                               "results": results}, indent=1, default=str))
    return 1 if any(r["outcome"] in (*FAILURES, "harness") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
