"""Shared fixtures: tiny random MoE checkpoints (synth) and bundles made from them with the
plain stage functions (no Prefect: the flow itself is tested in test_flow.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# MLX's CPU backend runs with one thread per core; keep the tests' threads from fighting.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A suite started as a background job of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and so would every command a test starts: the tests that stop `serve`, `chat` and
# `prepare` with Ctrl-C would wait for them forever. Python's own handler here resets to the
# default in each child (a caught signal does not survive exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def build_bundle(checkpoint: Path, out: Path, bits: int = 4, group_size: int = 64, resident_bits=None,
                 **options) -> Path:
    """checkpoint -> bundle with the preparation's steps in this process (the plain engine)."""
    from moestream.stages.prepare import PrepareOptions, prepare_in_process

    prepare_in_process(PrepareOptions(str(checkpoint), out, expert_bits=bits, group_size=group_size,
                                      resident_bits=resident_bits, **options))
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A function family -> tiny checkpoint folder, made once per test session."""
    from moestream.stages.synth import synth_checkpoint

    made = {}
    root = tmp_path_factory.mktemp("synth")

    def make(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in made:
            made[key] = synth_checkpoint(family, root / f"{family}-{seed}", preset="tiny", seed=seed).path
        return made[key]

    return make


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, synth_dir):
    """A function (family, bits, group_size) -> bundle folder, made once per test session."""
    made = {}
    root = tmp_path_factory.mktemp("bundles")

    def make(family: str = "qwen3_moe", bits: int = 4, group_size: int = 64) -> Path:
        key = (family, bits, group_size)
        if key not in made:
            made[key] = build_bundle(synth_dir(family), root / f"{family}-{bits}-{group_size}", bits, group_size)
        return made[key]

    return make
