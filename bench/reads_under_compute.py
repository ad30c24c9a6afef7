"""Whether a prefill's reads keep their pace while the main thread computes a layer's attention.

A long prompt's prefill reads a layer's experts on a background thread while the main thread waits
for them or computes (a group's matmuls; between layers, the next layer's attention over every
prompt token, which for a linear-attention layer on a backend without its fused kernel is a Python
loop of small ops per token). This loads a model inside its budget (as `moestream bench` does),
then reads one MoE layer's experts in layout order, in groups of --group-mb, on a background thread,
(a) alone, (b) while the main thread runs the model's first attention over --tokens tokens again
and again, and times that attention alone; each at every GIL switch interval of --switch (Python's
default is 0.005 s: a thread that wants the GIL waits up to that long for a busy holder).

    python bench/reads_under_compute.py BUNDLE [--tokens 2048] [--group-mb 450] [--switch 0.005,0.0005] [--json FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time

import common


def attention_of(model):
    """(the first layer's attention module, its name): a linear attention (Qwen3.5's GatedDeltaNet)
    or a softmax one."""
    found = [(int(m.group(1)), name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in ("linear_attn", "self_attn") and (m := re.search(r"layers\.(\d+)\.", name))]
    if not found:
        raise SystemExit("no attention module (linear_attn, self_attn) found in the model")
    _, name, module = min(found, key=lambda f: f[0])
    return module, name


def read_groups(rt, layer: int, group_bytes: int) -> list[list[int]]:
    """The layer's experts in layout order, cut into runs of at most group_bytes (at least one)."""
    order = rt.streamer.layout_order(layer, range(rt.num_experts))
    groups, used = [[]], 0
    for e in order:
        size = rt.store.nbytes(layer, e)
        if groups[-1] and used + size > group_bytes:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += size
    return groups


def read_layer(rt, layer: int, groups: list[list[int]], out: dict) -> None:
    """Read every group once, one at a time, evaluating the arrays in this thread (as the prefill's
    reader does); its bytes and seconds into out."""
    import mlx.core as mx

    t0, nbytes = time.perf_counter(), 0
    for group in groups:
        arrays = rt.store.read(layer, group)
        mx.eval([a for tensors in arrays.values() for a in tensors.values()])
        nbytes += sum(rt.store.nbytes(layer, e) for e in group)
        del arrays
    out["read_s"], out["read_bytes"] = time.perf_counter() - t0, nbytes


def measure(rt, attend, layer: int, groups, switch: float, calls: int) -> dict:
    sys.setswitchinterval(switch)
    row = {"switch_s": switch}
    alone: dict = {}
    read_layer(rt, layer, groups, alone)
    row["alone_gb_per_s"] = alone["read_bytes"] / alone["read_s"] / 1e9
    t0 = time.perf_counter()
    for _ in range(calls):
        attend()
    row["attention_ms"] = (time.perf_counter() - t0) / calls * 1e3
    together: dict = {}
    reader = threading.Thread(target=read_layer, args=(rt, layer, groups, together))
    n, t0 = 0, time.perf_counter()
    reader.start()
    while reader.is_alive():
        attend()
        n += 1
    busy = time.perf_counter() - t0
    reader.join()
    row["together_gb_per_s"] = together["read_bytes"] / together["read_s"] / 1e9
    row["together_attention_ms"] = busy / max(n, 1) * 1e3
    row["read_share"] = row["together_gb_per_s"] / row["alone_gb_per_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="a bundle folder (or a checkpoint moestream.load reads)")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens the attention runs over")
    ap.add_argument("--group-mb", type=float, default=450.0, help="bytes of experts read per call, in MB")
    ap.add_argument("--share", type=float, default=0.25, help="expert cache share the budget is planned for")
    ap.add_argument("--switch", default="0.005,0.0005", help="GIL switch intervals to run at, in s")
    ap.add_argument("--calls", type=int, default=5, help="attention calls timed alone")
    ap.add_argument("--repeats", type=int, default=2, help="the switch intervals, interleaved, this many times")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import mlx.core as mx
    from mlx.utils import tree_flatten

    import moestream
    from moestream.runtime.model.load import runtime_of

    plan = common.budget(args.bundle, args.share)
    print(common.setup_line())
    default_switch = sys.getswitchinterval()
    rows = []
    with moestream.load(args.bundle, memory_budget=plan.budget_bytes) as (model, _):
        rt = runtime_of(model)
        attn, name = attention_of(model)
        layer = min(rt.store.layers)
        groups = read_groups(rt, layer, int(args.group_mb * 1e6))
        hidden = next(m.weight.shape[-1] for n, m in model.named_modules() if n.endswith("embed_tokens"))
        dtype = next(a.dtype for _, a in tree_flatten(attn.parameters()) if mx.issubdtype(a.dtype, mx.floating))
        x = mx.random.normal((1, args.tokens, hidden)).astype(dtype)
        mask = "causal" if name.endswith("self_attn") else None

        def attend():
            mx.eval(attn(x, mask=mask))

        attend()  # compiled once, outside every timing
        print(f"{name} over {args.tokens} tokens; layer {layer}: {sum(map(len, groups))} experts in {len(groups)} "
              f"groups of at most {args.group_mb:g} MB")
        try:
            for _ in range(args.repeats):
                for switch in (float(s) for s in args.switch.split(",")):
                    rows.append(measure(rt, attend, layer, groups, switch, args.calls))
        finally:
            sys.setswitchinterval(default_switch)
    print(common.table(rows, [("switch s", "switch_s", ".4f"), ("reads alone GB/s", "alone_gb_per_s", ".2f"),
                              ("attention ms", "attention_ms", ".1f"), ("reads beside it GB/s", "together_gb_per_s", ".2f"),
                              ("of alone", "read_share", ".2f"), ("attention beside ms", "together_attention_ms", ".1f")]))
    common.write_json(args.json, {"args": vars(args), "setup": common.setup_line(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
