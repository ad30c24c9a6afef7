"""Untrusted bundles, fuzzed (the harness is tests/fuzz_bundles.py; its docstring says how it works).

A seeded sample of a few hundred mutated bundles, every mutation class in turn, each run in a child
process: inspect and verify through the CLI, load (plain, verify=True, in a memory budget), a
forward pass, a few greedy tokens and the chat template. Every case must end in a named error or in
the seed's own output: never another exception type, a wrong output, a hang, or a read outside the
bundle. The long run (`python tests/fuzz_bundles.py --cases 1000`) prints the per-class table.

The harness checks itself first: the unmutated seed (as a folder and as a HF cache snapshot) must be
"same" with no escape, a deliberate read outside the bundle must be seen by both detectors (the
audit hook for Python-level opens, inotify for a C-level read), and every mutation must change the
bundle.
"""

from __future__ import annotations

import os
from pathlib import Path

import fuzz_bundles as fb
import pytest

CASES = 272  # four per mutation class
SEED = 0
STEP_TIMEOUT = 30.0  # seconds per step (the gate itself gives a chat template 5 s per load); longer is a hang


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory) -> Path:
    return fb.make_seed(tmp_path_factory.mktemp("fuzz-seed") / "seed")


@pytest.fixture(scope="module")
def fuzz_runner(fuzz_seed, tmp_path_factory):
    with fb.FuzzRunner(fuzz_seed, tmp_path_factory.mktemp("fuzz-cases"), workers=2, timeout=STEP_TIMEOUT) as runner:
        yield runner


def _tree(root: Path) -> dict:
    """Every entry under root: its kind and content (file bytes' hash, link target)."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("special",)
    return out


def test_every_mutation_changes_the_bundle(fuzz_seed, tmp_path):
    clean = fb.prepare_case("snap.clean-0", fuzz_seed, tmp_path / "snap.clean-0")
    baseline = {"folder": _tree(fuzz_seed), "snapshot": _tree(Path(clean["bundle"]))}
    unchanged = []
    for name, m in fb.MUTATIONS.items():
        if name in ("control", "snap.clean"):
            continue
        case_id = f"{name}-1"
        prep = fb.prepare_case(case_id, fuzz_seed, tmp_path / case_id)
        if _tree(Path(prep["bundle"])) == baseline[m.layout]:
            unchanged.append(case_id)
    assert not unchanged, f"mutations that left the bundle as it was: {unchanged}"


def test_harness_sees_the_seed_as_same_and_reads_outside_as_escapes(fuzz_runner):
    same = fuzz_runner.run(["control-1", "snap.clean-1"])
    for r in same:
        assert r["outcome"] == "same" and not r["escapes"], fb.describe_failure(r)
        assert [s["outcome"] for s in r["steps"]] == ["same"] * len(fb.STEPS), r["steps"]
    (probe,) = fuzz_runner.run(["control-2"], probe=True)
    assert probe["outcome"] == "escape", probe
    text = " ".join(probe["escapes"])
    assert "probe: " in text and "probe_python.txt" in text, text  # the audit hook (Python open)
    assert "inotify: opened" in text and "probe_c.bin" in text, text  # inotify (numpy's C fopen)
    assert [s["outcome"] for s in probe["steps"]] == ["same"] * (len(fb.STEPS) + 1), probe["steps"]


@pytest.mark.slow  # ~40 s: in the full suite (CI), out of the fast one
def test_fuzzed_bundles_fail_by_name_or_run_unchanged(fuzz_runner):
    ids = fb.case_ids(CASES, SEED)
    # fast: once a load is refused by name, the other two loads (which pass the same gate first) are skipped
    results = fuzz_runner.run(ids, fast=True)
    assert len(results) == CASES
    harness = [r for r in results if r["outcome"] == "harness"]
    assert not harness, "\n".join(fb.describe_failure(r) for r in harness)
    bad = [r for r in results if r["outcome"] in fb.FAILURES]
    assert not bad, (f"{len(bad)} of {CASES} fuzzed bundles failed otherwise than by name "
                     f"(reproduce one: python tests/fuzz_bundles.py --case ID --keep)\n"
                     + fb.outcome_table(results) + "\n" + fb.failure_examples(results, 5))
