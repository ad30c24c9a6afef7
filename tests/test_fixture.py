"""The trained fixture model fixtures/qwen3-moe-tiny-tools (see its README.md for how it was made).

Checks what the rest of the suite relies on: it is small, it is a Hub-layout qwen3_moe checkpoint
that mlx-lm loads strictly, its tokenizer carries a tool-calling chat template that mlx-lm maps to
its json_tools parser, it answers held-out tool prompts with parseable tool calls at source
precision, and its training log records the held-out loss.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "qwen3-moe-tiny-tools"
TRAIN = ROOT / "fixtures" / "train"
# Two held-out prompts (lines of heldout_tools.jsonl, tool kinds seen in training asked with held-out
# values: a forecast among distractor tools, and reading a file). The greedy choice leads the runner-up
# by >= 3.7 logits at every generated token, so float noise cannot flip them.
PROMPT_LINES = (1, 4)


def _toolgen():
    spec = importlib.util.spec_from_file_location("fixture_toolgen", TRAIN / "toolgen.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def loaded():
    import mlx.core as mx
    from mlx_lm.utils import load

    model, tok = load(str(FIXTURE))  # strict: every tensor present, none left over
    model.set_dtype(mx.float32)  # source precision on CPU: bf16 weights, float32 compute
    return model, tok


def test_folder_is_small():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert total < 10 * 2**20, total
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "training_log.json"):
        assert (FIXTURE / name).is_file(), name


def test_config_is_qwen3_moe_with_quantizable_dims():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["num_experts"] == 32 and cfg["num_experts_per_tok"] == 4
    # every expert matmul's input dim is a multiple of 64 (group-size-64 quantization)
    assert cfg["hidden_size"] % 64 == 0 and cfg["moe_intermediate_size"] % 64 == 0


def test_checkpoint_is_hub_per_expert_layout():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    hdr = _header(FIXTURE / "model.safetensors")
    hdr.pop("__metadata__", None)
    assert not [k for k in hdr if k.endswith(("gate_up_proj", "experts.down_proj"))]  # not fused
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    for layer in range(cfg["num_hidden_layers"]):
        assert hdr[f"model.layers.{layer}.mlp.gate.weight"]["shape"] == [cfg["num_experts"], h]
        for e in range(cfg["num_experts"]):
            pre = f"model.layers.{layer}.mlp.experts.{e}"
            assert hdr[f"{pre}.gate_proj.weight"]["shape"] == [i, h]
            assert hdr[f"{pre}.up_proj.weight"]["shape"] == [i, h]
            assert hdr[f"{pre}.down_proj.weight"]["shape"] == [h, i]
    assert {v["dtype"] for v in hdr.values()} == {"BF16"}


def test_loads_strictly_in_mlx_lm(loaded):
    from mlx_lm.models.qwen3_moe import Model

    model, _ = loaded
    assert isinstance(model, Model)
    assert len(model.model.layers) == json.loads((FIXTURE / "config.json").read_text())["num_hidden_layers"]


def test_tokenizer_has_tool_template_and_parser(loaded):
    from transformers import AutoTokenizer

    _, tok = loaded
    assert tok.has_tool_calling
    assert tok.tool_call_start == "<tool_call>" and tok.tool_call_end == "</tool_call>"
    assert tok.tool_parser.__module__ == "mlx_lm.tool_parsers.json_tools"
    hf = AutoTokenizer.from_pretrained(str(FIXTURE))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    text = hf.apply_chat_template([{"role": "user", "content": "Weather in Oslo?"}], tools=tools,
                                  tokenize=False, add_generation_prompt=True)
    assert "<tools>\n" in text and '"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    # the markers are single tokens
    for marker in ("<tool_call>", "</tool_call>", "<|im_start|>", "<|im_end|>"):
        assert len(hf.encode(marker, add_special_tokens=False)) == 1


def test_greedy_tool_calls_on_heldout_prompts(loaded):
    from mlx_lm import generate

    model, tok = loaded
    toolgen = _toolgen()
    rows = (TRAIN / "heldout_tools.jsonl").read_text(encoding="utf-8").splitlines()
    for line in PROMPT_LINES:
        row = json.loads(rows[line])
        prompt = tok.apply_chat_template(row["messages"], tools=row["tools"], add_generation_prompt=True, tokenize=False)
        text = generate(model, tok, prompt, max_tokens=96, verbose=False)
        calls = toolgen.parse_tool_calls(text)
        assert calls and calls[0] is not None, text
        assert calls[0]["name"] == row["expected"][0]["name"], text
        ok, why = toolgen.validate_call(calls[0], row["tools"])
        assert ok, (why, text)
        assert calls[0]["arguments"] == row["expected"][0]["arguments"], text


def test_training_log_records_heldout_loss():
    log = json.loads((FIXTURE / "training_log.json").read_text())
    cfg = json.loads((FIXTURE / "config.json").read_text())
    assert math.isfinite(log["heldout_loss"]) and 0 < log["heldout_loss"] < 5
    assert log["loss_curve"] and log["loss_curve"][-1]["loss"] < log["loss_curve"][0]["loss"]
    load = log["shipped_eval"]["expert_load"]
    assert len(load) == cfg["num_hidden_layers"] and all(len(row) == cfg["num_experts"] for row in load)
    assert all(abs(sum(row) - 1) < 1e-6 for row in load)
    assert "all" in log["shipped_eval"]["tool_calls"]["summary"]
