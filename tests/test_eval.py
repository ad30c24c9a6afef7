"""The quality harness: KL/top-1/perplexity against the source, and the tool-calling scorer."""

from __future__ import annotations

import pytest
from conftest import build_bundle

from moestream.stages.eval import evaluate, parse_tool_call, validate_arguments

TEXT = "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n" * 20
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False}}}


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_source_precision_bundle_matches_reference_and_2bit_does_not(tmp_path, synth_dir):
    src = synth_dir("qwen3_moe")
    exact = evaluate(build_bundle(src, tmp_path / "b16", bits=16), src, suites=("kl", "perplexity"), text=TEXT)["text"]
    assert exact["kl_mean"] < 1e-6 and exact["top1_agreement"] == 1.0
    assert exact["ppl_bundle"] == pytest.approx(exact["ppl_reference"], rel=1e-5)
    low = evaluate(build_bundle(src, tmp_path / "b2", bits=2), src, suites=("kl",), text=TEXT)["text"]
    four = evaluate(build_bundle(src, tmp_path / "b4", bits=4), src, suites=("kl",), text=TEXT)["text"]
    assert low["kl_mean"] > four["kl_mean"] > exact["kl_mean"]
    assert low["kl_p99"] >= low["kl_mean"] and 0 < low["tokens"] <= 2048


def test_validate_arguments():
    schema = WEATHER["function"]["parameters"]
    assert validate_arguments({"city": "Paris", "days": 3}, schema) is None
    assert "missing required" in validate_arguments({"days": 3}, schema)
    assert "should be integer" in validate_arguments({"city": "Paris", "days": "3"}, schema)
    assert "should be integer" in validate_arguments({"city": "Paris", "days": True}, schema)
    assert "not in" in validate_arguments({"city": "Paris", "unit": "k"}, schema)
    assert "unknown argument" in validate_arguments({"city": "Paris", "x": 1}, schema)
    assert "not an object" in validate_arguments(["Paris"], schema)


def test_parse_tool_call_uses_the_models_parser(synth_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(synth_dir("qwen3_moe"))
    assert tok.has_tool_calling
    good = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert parse_tool_call(tok, good, [WEATHER]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert parse_tool_call(tok, "<tool_call>{'name': 'get_weather'}</tool_call>", [WEATHER]) is None  # bad quoting
    assert parse_tool_call(tok, "no call here", [WEATHER]) is None


def test_unknown_suite_and_missing_inputs(tmp_path, synth_dir, bundle_dir):
    with pytest.raises(ValueError, match="unknown suites"):
        evaluate(bundle_dir("qwen3_moe"), synth_dir("qwen3_moe"), suites=("vibes",))
    with pytest.raises(ValueError, match="held-out text"):
        evaluate(bundle_dir("qwen3_moe"), synth_dir("qwen3_moe"), suites=("kl",))


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_sweep_table_plot_and_card_rows(tmp_path, synth_dir):
    import json

    from moestream.stages.sweep import sweep

    rows = sweep(synth_dir("qwen3_moe"), tmp_path / "sw", [2, 4], [2, 4], ("kl", "perplexity"), text=TEXT,
                 progress=lambda *_: None)
    assert [(r.bits, r.experts_per_token) for r in rows] == [(2, 2), (2, 4), (4, 2), (4, 4)]
    by = {(r.bits, r.experts_per_token): r for r in rows}
    assert by[(2, 4)].kl_mean > by[(4, 4)].kl_mean
    assert by[(4, 2)].bytes_per_token * 2 == by[(4, 4)].bytes_per_token
    assert by[(2, 4)].bytes_per_token < by[(4, 4)].bytes_per_token
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert (tmp_path / "sw" / name).stat().st_size > 0
    card_rows = json.loads((tmp_path / "sw" / "bundles" / "b4-g64" / "quality.json").read_text())["rows"]
    assert [r["experts_per_token"] for r in card_rows] == [2, 4]
    # a second sweep reuses the prepared bundles
    before = (tmp_path / "sw" / "bundles" / "b4-g64" / "experts" / "layer_000.bin").stat().st_mtime_ns
    sweep(synth_dir("qwen3_moe"), tmp_path / "sw", [4], [4], ("kl",), text=TEXT, progress=lambda *_: None)
    assert (tmp_path / "sw" / "bundles" / "b4-g64" / "experts" / "layer_000.bin").stat().st_mtime_ns == before
