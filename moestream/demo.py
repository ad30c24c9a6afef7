"""`moestream demo`: the whole job on a model small enough for any machine.

The default model is the trained fixture shipped in the repo (fixtures/qwen3-moe-tiny-tools: a
4.4M-parameter qwen3_moe trained on Python source and tool-call transcripts); `--family/--preset`
synthesises a random-weight one instead. The preparation flow (Prefect) makes a verified bundle,
then the model answers a tool-calling request with a memory budget that holds only a quarter of
the experts, so tokens stream experts from disk; the figures are printed."""

from __future__ import annotations

import json
import time
from pathlib import Path

CACHE_SHARE = 0.25
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "qwen3-moe-tiny-tools"
DEMO_REQUEST = "What's the forecast for Zagreb for the next 7 days?"
# tool schemas from the fixture's held-out set (fixtures/train/heldout_tools.jsonl, first example)
DEMO_TOOLS = json.loads('[{"type": "function", "function": {"name": "query_database", "description": "Query the database with SQL.", "parameters": {"type": "object", "properties": {"sql": {"type": "string", "description": "SQL statement"}, "db": {"type": "string", "description": "Database name"}}, "required": ["sql"]}}}, {"type": "function", "function": {"name": "set_thermostat", "description": "Change the heating temperature.", "parameters": {"type": "object", "properties": {"temperature": {"type": "number", "description": "Target temperature in degrees"}, "room": {"type": "string", "description": "Room"}}, "required": ["temperature"]}}}, {"type": "function", "function": {"name": "find_flights", "description": "Find available flights.", "parameters": {"type": "object", "properties": {"from_airport": {"type": "string", "description": "IATA code of the departure airport"}, "destination": {"type": "string", "description": "IATA code of the arrival airport"}, "departure_date": {"type": "string", "description": "Date as YYYY-MM-DD"}}, "required": ["from_airport", "destination", "departure_date"]}}}, {"type": "function", "function": {"name": "weather_forecast", "description": "Get a multi-day weather forecast.", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"}, "days": {"type": "integer", "description": "Number of days, 1-14"}}, "required": ["location", "days"]}}}, {"type": "function", "function": {"name": "get_order_status", "description": "Get the status of an order.", "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "description": "Order id like ORD-12345"}}, "required": ["order_id"]}}}]')


def run_demo(workdir: str | Path = "moestream-demo", family: str | None = None, preset: str = "tiny") -> dict:
    import moestream
    from moestream.common.units import fmt_bytes
    from moestream.runtime.frontends.generate import format_prompt, generate_text
    from moestream.stages.synth import synth_checkpoint

    workdir = Path(workdir)
    t0 = time.perf_counter()
    trained = family is None and (FIXTURE / "config.json").exists()
    if trained:
        checkpoint, bundle = FIXTURE, workdir / "qwen3-moe-tiny-tools-bundle"
        print(f"[1/3] model: the trained fixture {checkpoint} (a 4.4M-parameter qwen3_moe)")
    else:
        family = family or "qwen3_moe"
        checkpoint, bundle = workdir / f"{family}-{preset}", workdir / f"{family}-{preset}-bundle"
    if not trained and not (checkpoint / "config.json").exists():
        print(f"[1/3] synth: a random {family} MoE ({preset}) in the Hugging Face layout -> {checkpoint}")
        synth_checkpoint(family, checkpoint, preset=preset, seed=0)
    elif not trained:
        print(f"[1/3] synth: reusing {checkpoint}")
    print(f"[2/3] prepare: 4-bit experts, source-precision resident weights -> {bundle}")
    moestream.prepare(str(checkpoint), bundle, expert_bits=4, overwrite=True)

    plan = moestream.plan_memory(bundle, expert_cache_share=CACHE_SHARE)
    budget, cache = plan.budget_bytes, plan.cache_bytes
    print(f"[3/3] generate: memory budget {fmt_bytes(budget)} = resident {fmt_bytes(plan.resident_bytes)} + "
          f"KV reserve {fmt_bytes(plan.kv_reserve_bytes)} + buffers {fmt_bytes(plan.buffer_bytes)} + prefill "
          f"activations {fmt_bytes(plan.activation_bytes)} + expert cache {fmt_bytes(cache)} ({plan.cache_share:.0%} "
          f"of the {fmt_bytes(plan.expert_bytes)} of experts) + what cached experts hold beyond their bytes "
          f"{fmt_bytes(plan.held_extra_bytes)}; while decoding, the expert cache also takes the prefill's room: "
          f"{fmt_bytes(plan.decode_cache_bytes)}")
    loaded = moestream.load(bundle, memory_budget=budget)
    model, tokenizer = loaded
    if trained:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": DEMO_REQUEST}], tools=DEMO_TOOLS,
                                               add_generation_prompt=True)
        names = ", ".join(t["function"]["name"] for t in DEMO_TOOLS)
        print(f"--- user: {DEMO_REQUEST} (tools: {names}) ---")
    else:
        prompt = format_prompt(tokenizer, "Write a haiku about streaming experts from disk.")
        print("--- output (random weights: expect gibberish) ---")
    with loaded:
        _, report = generate_text(model, tokenizer, prompt, max_tokens=48)
    print("\n---")
    print(report.line())
    s = report.stats
    print(f"[moestream] {s['cache_misses']} expert reads missed the cache, {s['evictions']} evictions, "
          f"{s['reads']} disk reads of {fmt_bytes(s['mean_read_bytes'])} on average; "
          f"expert cache peak {fmt_bytes(s['expert_cache_peak_bytes'])} of {fmt_bytes(s['cache_capacity_bytes'])}")
    print(f"[moestream] demo done in {time.perf_counter() - t0:.1f}s; try: moestream generate {bundle} "
          f"--prompt 'hello' --memory-budget {budget}")
    return report.as_dict()
