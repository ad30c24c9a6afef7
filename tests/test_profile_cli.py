"""The profile -> layout -> replay path through the CLI, on a tiny model."""

from __future__ import annotations

import json

from conftest import build_bundle

from moestream.cli import main
from moestream.manifests.open import open_bundle


def test_profile_then_profile_ordered_bundle_then_replay(tmp_path, synth_dir, capsys):
    src = synth_dir("qwen3_moe")
    prof = tmp_path / "prof"
    assert main(["profile", str(src), "--out", str(prof), "--max-tokens", "512"]) == 0
    assert (prof / "trace.parquet").is_file() and (prof / "summary.json").is_file()
    bundle = open_bundle(build_bundle(src, tmp_path / "ordered", profile=prof), verify=True)
    meta = bundle.meta
    assert meta["layout"]["order"] == "profile" and "profile" in meta
    assert any(f.startswith("profile/") for f in meta["files"])
    # the file order follows the profile, not the expert ids, in at least one layer
    offsets = {layer: [bundle.extent(layer, e).offset for e in range(16)] for layer in bundle.layers}
    assert any(o != sorted(o) for o in offsets.values())
    identity = build_bundle(src, tmp_path / "identity")
    out = tmp_path / "replay.json"
    assert main(["replay", str(identity), "--trace", str(prof / "trace.parquet"), "--budget", "25%,50%",
                 "--policy", "lru,prior", "--profile", str(prof), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["policy"], r["budget"]) for r in rows} >= {("lru", 0.25), ("prior", 0.5)}
    assert "hit" in capsys.readouterr().out.lower()


def test_sharded_profile_merges_into_exactly_the_whole_runs_trace(tmp_path, synth_dir):
    import pyarrow.parquet as pq

    from moestream.stages.profile import merge_profiles, profile_model

    src = synth_dir("qwen3_moe")
    whole = profile_model(src, None, tmp_path / "whole", 1024, seq_len=128, plots=False)
    shards = [profile_model(src, None, tmp_path / f"s{i}", 1024, seq_len=128, plots=False, shard=(i, 3)).out
              for i in range(3)]
    merged = merge_profiles(shards, tmp_path / "merged", plots=False)
    a = pq.read_table(whole.trace).select(["seq", "token", "layer", "experts", "weights"])
    b = pq.read_table(merged.trace).select(["seq", "token", "layer", "experts", "weights"])
    assert a.equals(b)
    assert merged.summary["next_token_reuse"] == whole.summary["next_token_reuse"]
    assert merged.run["tokens"] == whole.run["tokens"]
