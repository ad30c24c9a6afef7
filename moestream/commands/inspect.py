"""Describe a bundle without loading its weights: family, experts, bits, sizes, bytes read per
token, and the memory budgets it runs in (the least it needs, and what caches 10, 25 or 50% of
its experts), for this machine's compute dtype."""

EXAMPLES = """examples:
  moestream inspect bundles/q3
  moestream inspect bundles/q3 --json"""

SHARES = (0.10, 0.25, 0.50)


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--json", action="store_true", help="print the description as JSON (sizes in bytes)")


def run(args) -> None:
    import json

    from moestream.manifests.describe import describe_bundle

    info = describe_bundle(args.bundle)
    info["memory"] = memory_budgets(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(describe_text(info))


def memory_budgets(path) -> dict:
    """The least budget that runs and the budgets that cache SHARES of the experts, in bytes."""
    import moestream

    plan = moestream.plan_memory(path)
    plans = {f"{share:.0%}": moestream.plan_memory(path, expert_cache_share=share) for share in SHARES}
    return {"dtype": plan_dtype(), "minimum_bytes": plan.minimum_bytes,
            "for_cache_share": {share: p.budget_bytes for share, p in plans.items()},
            # while decoding the cache also holds the room the budget keeps for a prefill chunk
            "decode_cache_share": {share: min(1.0, p.decode_cache_bytes / p.expert_bytes) if p.expert_bytes else 1.0
                                   for share, p in plans.items()}}


def plan_dtype() -> str:
    """The compute dtype plan_memory sizes for by default (as load picks it)."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "the source dtype"


def describe_text(info: dict) -> str:
    from moestream.common.units import fmt_bytes

    src = info.get("source") or {}
    origin = src.get("repo_id") or "a local checkpoint"
    if src.get("commit"):
        origin += f" @ {src['commit'][:12]}"
    bits = info["expert_bits"]
    quant = f"{bits}-bit, group {info['group_size']}" if isinstance(bits, int) and bits < 16 else str(bits)
    per_expert = info["expert_bytes"] / max(1, info["moe_layers"] * info["experts"])
    mem = info["memory"]
    # a share is what the cache keeps during a prompt's prefill; while decoding it also takes the
    # room the budget keeps for a prefill chunk
    decoding = mem.get("decode_cache_share", {})
    budgets = ", ".join(f"{fmt_bytes(b)} caches {share}" + (f" ({decoding[share]:.0%}" + (" while decoding)" if i == 0 else ")")
                                                              if share in decoding else "")
                        for i, (share, b) in enumerate(mem["for_cache_share"].items()))
    tools = ", ".join(f"{k} {v}" for k, v in sorted(info.get("tools", {}).items()))
    rows = [
        ("model", f"{info['family']} ({info['model_type']}), from {origin}"),
        ("layers", f"{info['layers']} ({info['moe_layers']} MoE) x {info['experts']} experts, "
                   f"top-{info['experts_per_token']}"),
        ("experts", f"{quant}: {fmt_bytes(info['expert_bytes'])} ({fmt_bytes(per_expert)} each)"),
        ("read per token", f"{fmt_bytes(info['expert_bytes_per_token'])} at most (every routed expert missed)"),
        ("resident", f"{fmt_bytes(info['resident_bytes'])} on disk "
                     f"({'source precision' if info['resident_bits'] is None else str(info['resident_bits']) + '-bit'})"),
        ("layout", f"{info['layout_order']} order"),
        ("memory budget", f"{fmt_bytes(mem['minimum_bytes'])} at least (compute in {mem['dtype']})"),
        ("", f"{budgets} of the experts"),
        ("format", f"{info['format']} version {info['format_version']}"),
        ("made with", tools or "unknown"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([info["path"]] + [f"  {k:<{width}}  {v}" for k, v in rows])
