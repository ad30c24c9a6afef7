"""The README's first command, as a user runs it: the trained fixture through the Prefect flow, then a
tool-calling answer inside a budget that holds a quarter of the experts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.run([sys.executable, "-m", "moestream.cli", "demo", "--workdir", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert '"name": "weather_forecast"' in out and '"Zagreb"' in out  # the trained model answers with the tool
    assert "hit rate" in out and "evictions" in out
    assert (tmp_path / "demo" / "qwen3-moe-tiny-tools-bundle" / "bundle.json").is_file()
