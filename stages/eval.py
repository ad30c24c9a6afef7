"""Quality of a bundle against its source: what do fewer bits and fewer experts cost?

Both models run through the runtime: the bundle with its BundleStore, the reference (the source
checkpoint, at source precision) with the CheckpointStore, so a reference larger than memory
works too. Suites:
- `kl` / `perplexity`: next-token KL(reference || bundle) (mean, p99 over positions), top-1
  agreement, and perplexity of both, on held-out text;
- `tools`: prompts with tool schemas; the share of greedy replies that parse as a tool call
  (mlx-lm's own tool parser for the model), name the expected tool, and give arguments that
  validate against the tool's JSON schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..common.errors import OptionsError

SUITES = ("perplexity", "kl", "tools")
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


@dataclass
class TextScores:
    tokens: int
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    ppl_bundle: float
    ppl_reference: float


@dataclass
class ToolScores:
    prompts: int
    parsed: float  # share of replies that parse as a tool call
    right_name: float
    valid_arguments: float  # right name and arguments that validate against the schema
    failures: list = field(default_factory=list)


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def text_scores(model, reference, token_ids: list[int], window: int = 256) -> TextScores:
    """KL, top-1 agreement and perplexity over non-overlapping windows of `window` tokens."""
    kls, agree, nll_b, nll_r = [], [], [], []
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        x, y = mx.array([chunk[:-1]]), np.array(chunk[1:])
        lb = _log_softmax(model(x).astype(mx.float32))[0]
        lr = _log_softmax(reference(x).astype(mx.float32))[0]
        kl = mx.sum(mx.exp(lr) * (lr - lb), axis=-1)
        lb_np, lr_np = np.array(lb), np.array(lr)
        kls.append(np.array(kl))
        agree.append(lb_np.argmax(-1) == lr_np.argmax(-1))
        rows = np.arange(len(y))
        nll_b.append(-lb_np[rows, y])
        nll_r.append(-lr_np[rows, y])
    kl_all, nb, nr = np.concatenate(kls), np.concatenate(nll_b), np.concatenate(nll_r)
    return TextScores(
        tokens=int(kl_all.size), kl_mean=float(kl_all.mean()), kl_p99=float(np.percentile(kl_all, 99)),
        top1_agreement=float(np.concatenate(agree).mean()), ppl_bundle=float(np.exp(nb.mean())),
        ppl_reference=float(np.exp(nr.mean())),
    )


def validate_arguments(args, schema: dict) -> str | None:
    """What is wrong with `args` for a JSON schema of type object (required keys, property types,
    enums, no unknown keys when additionalProperties is false), or None."""
    if not isinstance(args, dict):
        return f"arguments are {type(args).__name__}, not an object"
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in args:
            return f"missing required argument {key!r}"
    for key, value in args.items():
        if key not in props:
            if schema.get("additionalProperties") is False:
                return f"unknown argument {key!r}"
            continue
        spec = props[key]
        want = JSON_TYPES.get(spec.get("type"))
        if want and (not isinstance(value, want) or (spec.get("type") in ("integer", "number") and isinstance(value, bool))):
            return f"argument {key!r} should be {spec.get('type')}, got {type(value).__name__}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r}={value!r} not in {spec['enum']}"
    return None


def parse_tool_call(tokenizer, text: str, tools: list[dict]):
    """The first tool call in `text` as the model's own mlx-lm tool parser reads it, or None."""
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    if not start or start not in text:
        return None
    body = text.split(start, 1)[1]
    if end and end in body:
        body = body.split(end, 1)[0]
    try:
        call = tokenizer.tool_parser(body, tools)
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(call, list):
        call = call[0] if call else None
    return call if isinstance(call, dict) and "name" in call else None


def tool_scores(model, tokenizer, examples: list[dict], max_tokens: int = 96) -> ToolScores:
    """Each example: {"messages": [...], "tools": [...], "expected": {"name": ..., "arguments": {...}} or a list
    of such calls (the first is scored)}."""
    from mlx_lm.generate import generate

    if not getattr(tokenizer, "has_tool_calling", False):
        raise ValueError("the model's tokenizer has no tool-calling format that mlx-lm recognises")
    parsed = named = valid = 0
    failures = []
    for i, ex in enumerate(examples):
        prompt = tokenizer.apply_chat_template(ex["messages"], tools=ex["tools"], add_generation_prompt=True)
        text = generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)
        call = parse_tool_call(tokenizer, text, ex["tools"])
        want = ex["expected"]
        if isinstance(want, list):  # a list of calls: the first one is what the reply must start with
            want = want[0]
        if call is None:
            failures.append({"example": i, "why": "no parseable tool call", "text": text[:200]})
            continue
        parsed += 1
        if call.get("name") != want["name"]:
            failures.append({"example": i, "why": f"called {call.get('name')!r}, expected {want['name']!r}"})
            continue
        named += 1
        schema = next((t["function"]["parameters"] for t in ex["tools"] if t["function"]["name"] == want["name"]), {})
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                failures.append({"example": i, "why": "arguments are not JSON"})
                continue
        problem = validate_arguments(args, schema)
        if problem:
            failures.append({"example": i, "why": problem})
            continue
        valid += 1
    n = max(len(examples), 1)
    return ToolScores(len(examples), parsed / n, named / n, valid / n, failures)


def load_tool_examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def evaluate(bundle, reference, suites=SUITES, text: str | None = None, tool_examples: list[dict] | None = None,
             max_text_tokens: int = 2048, experts_per_token: int | None = None, memory_budget=None,
             reference_tools: dict | None = None) -> dict:
    """Score `bundle` against `reference` (a source checkpoint folder) on the given suites."""
    from ..runtime.model.load import load, runtime_of

    unknown = set(suites) - set(SUITES)
    if unknown:
        raise OptionsError(f"unknown suites {sorted(unknown)}; known: {', '.join(SUITES)}")
    with load(bundle, experts_per_token=experts_per_token, memory_budget=memory_budget) as (model, tokenizer), \
            load(reference) as (ref, ref_tokenizer):
        return _evaluate(model, tokenizer, ref, ref_tokenizer, bundle, reference, suites, text, tool_examples,
                         max_text_tokens, reference_tools, runtime_of(model))


def _evaluate(model, tokenizer, ref, ref_tokenizer, bundle, reference, suites, text, tool_examples, max_text_tokens,
              reference_tools, rt) -> dict:
    out: dict = {"bundle": str(bundle), "reference": str(reference), "experts_per_token": rt.experts_per_token}
    if {"kl", "perplexity"} & set(suites):
        if not text:
            raise OptionsError("the kl/perplexity suites need held-out text (--text FILE)")
        ids = tokenizer.encode(text)[:max_text_tokens]
        out["text"] = asdict(text_scores(model, ref, ids))
    if "tools" in suites:
        if not tool_examples:
            raise OptionsError("the tools suite needs examples (--tools FILE, JSON lines)")
        out["tools"] = asdict(tool_scores(model, tokenizer, tool_examples))
        # the reference's score does not depend on the bundle: a sweep passes it in once computed
        out["tools_reference"] = reference_tools or asdict(tool_scores(ref, ref_tokenizer, tool_examples))
    out["stats"] = rt.stats()
    return out
