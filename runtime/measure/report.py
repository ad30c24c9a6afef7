"""A `moestream bench` report read: its ceilings from the cells it measured (the sustained rate,
the best single window), its repeated runs summed up by --compare entry, and the report as text and
as a plot. Plain functions of the report's dict, so that scripts read reports of any age without
loading MLX."""

from __future__ import annotations

import numpy as np

from ...common.units import fmt_bytes

# A cold prefill's TTFT against its floor three ways: at the run's prefill ceiling, at the windows
# just before it, and against its experts read alone just after it; and the time its first token was
# known (before mlx-lm's loop ran the next token's step) against the floor at the prefill ceiling
PREFILL_RATIOS = ("ttft_over_floor", "ttft_over_floor_before", "ttft_over_read_alone", "first_token_known_over_floor")


def ceilings(cells: list[dict]) -> dict:
    """A report's ceilings from its read_ceiling_rounds cells: `ceiling`, the best random-read cell
    (a decode's misses are random reads; its rooflines use it), and `prefill_ceiling`, the best cell
    either way (a prefill's floor). The best cell is chosen on its even windows and its rate taken
    from its odd ones: the cell whose windows happened to run high wins a choice on all of them, so
    its mean over them leans high by as much as the windows vary (the winner's curse), where its
    other windows do not. Beside them: the best cell's mean over all its windows, and the best
    single window of each kind, bursts that no run of many windows holds."""
    def half(cell: dict, parity: int) -> float:
        return float(np.mean(cell["windows"][parity::2])) if cell["windows"][parity::2] else cell["gb_per_s"]

    def best(candidates: list[dict]) -> dict:
        chosen = max(candidates, key=lambda c: half(c, 0))
        return {**chosen, "gb_per_s": half(chosen, 1), "all_windows_gb_per_s": chosen["gb_per_s"]}

    random_cells = [c for c in cells if not c["sequential"]]
    return {"ceiling": best(random_cells), "prefill_ceiling": best(cells),
            "ceiling_best_cell_all_windows_gb_per_s": max(c["gb_per_s"] for c in random_cells),
            "prefill_ceiling_best_cell_all_windows_gb_per_s": max(c["gb_per_s"] for c in cells),
            "ceiling_burst_gb_per_s": max(c["best_window_gb_per_s"] for c in random_cells),
            "prefill_ceiling_burst_gb_per_s": max(c["best_window_gb_per_s"] for c in cells)}


def best_trial(report: dict, sequential: bool = False) -> float:
    """The best single trial (window) of a report's ceiling measurement: random reads at any thread
    count (a decode's misses), and with `sequential` reads in sequence too (a prefill's). A burst,
    given for comparison with reports made when the bench took it as the ceiling."""
    if "ceiling_cells" in report:
        return report["prefill_ceiling_burst_gb_per_s" if sequential else "ceiling_burst_gb_per_s"]
    rates = [report["ceiling"]["gb_per_s"], *report.get("ceiling_by_threads", {}).values()]
    if sequential:  # the prefill_ceiling is the best of these and the ones in sequence
        rates += report.get("ceiling_sequential_by_threads", {}).values()
    return max(rates)


def sustained_rate(report: dict, sequential: bool = False) -> float:
    """The disk's sustained rate a report measured, as `ceilings` takes it today from the report's
    cells (random reads; with `sequential`, reads in sequence too). In a report from before the
    cells, the mean of its trials at the runtime's thread count, the only setting it read more than
    twice (the oldest hold only their ceiling): random reads at one thread count, so for a prefill
    a looser floor than today's."""
    if "ceiling_cells" in report:
        return ceilings(report["ceiling_cells"])["prefill_ceiling" if sequential else "ceiling"]["gb_per_s"]
    trials = report.get("ceiling_trials") or [report["ceiling"]]
    return float(np.mean([t["gb_per_s"] for t in trials]))


def spread(values: list[float]) -> dict:
    """A distribution of repeated runs' ratios: the median, the least and the most."""
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def prefill_summary(report: dict, within: float = 1.1) -> dict:
    """The cold runs' TTFT ratios by --compare entry (repeats together): how many runs, the median,
    the least and the most, and how many were within `within`; a distribution, where one run's ratio
    moves with the disk's rate at that moment."""
    groups: dict[str, list[dict]] = {}
    for x in report.values():
        if isinstance(x, dict) and "variant" in x and "ttft_over_floor" in x:
            groups.setdefault(x["variant"], []).append(x)
    out = {}
    for variant, runs in groups.items():
        out[variant] = {"runs": len(runs), "within": within}
        for key in PREFILL_RATIOS:
            values = [x[key] for x in runs if key in x]
            if values:
                out[variant][key] = {**spread(values), "within_count": sum(v <= within for v in values)}
    return out


def prefill_summary_lines(summary: dict, label: str = "") -> list[str]:
    """prefill_summary as text: a line per --compare entry, each ratio as median (least-most, count within)."""
    width = max([14] + [len(v) + 2 for v in summary])
    return [f"  {label}{variant:<{width}}{g['runs']:>3} runs  " + "  /  ".join(
        f"{g[k]['median']:.2f} ({g[k]['min']:.2f}-{g[k]['max']:.2f}, {g[k]['within_count']} in)" if k in g else "-"
        for k in PREFILL_RATIOS) for variant, g in summary.items()]


def streams_runs(report: dict) -> list[str]:
    """The names of a report's runs of several streams decoded together, in order."""
    return [n for n, x in report.items() if isinstance(x, dict) and "share_of_batch_roofline" in x]


# The share of its batch roofline that several streams decoded together should reach
STREAMS_TARGET = 0.85


def streams_summary(report: dict, target: float = STREAMS_TARGET) -> dict:
    """The streams runs' shares of their batch roofline by --compare entry (repeats together), cold
    and warm apart: how many runs, the median, the least and the most, and how many reached `target`."""
    out: dict[str, dict] = {}
    for name in streams_runs(report):
        x = report[name]
        kind = "cold" if name.endswith("cold") else "warm"
        out.setdefault(x.get("variant", "default"), {"target": target}).setdefault(kind, []).append(x["share_of_batch_roofline"])
    for group in out.values():
        for kind in ("cold", "warm"):
            if kind in group:
                v = group[kind]
                group[kind] = {"runs": len(v), **spread(v), "reached_count": sum(x >= target for x in v)}
    return out


def streams_summary_lines(summary: dict) -> list[str]:
    """streams_summary as text: a line per --compare entry, cold / warm as runs, median (least-most, count reached)."""
    width = max([14] + [len(v) + 2 for v in summary])
    return [f"  {variant:<{width}}" + "  /  ".join(
        f"{g[k]['runs']} runs {g[k]['median']:.2f} ({g[k]['min']:.2f}-{g[k]['max']:.2f}, {g[k]['reached_count']} reached)"
        if k in g else "-" for k in ("cold", "warm")) for variant, g in summary.items()]


def print_report(r: dict) -> None:
    print("\n== setup ==")
    b = r["bundle"]
    bits = f"{b['expert_bits']}-bit" if isinstance(b["expert_bits"], int) else str(b["expert_bits"])
    print(f"{b['family']}: {b['moe_layers']} MoE layers x {b['experts']} experts, top-{b['experts_per_token']}, "
          f"{bits} experts ({b['expert_bytes'] / 1e9:.2f} GB), resident {b['resident_bytes'] / 1e9:.2f} GB")
    bud = r["budget"]
    decoding = bud.get("decode_cache_bytes") or bud["expert_cache_bytes"]
    print(f"budget {bud['budget_bytes'] / 1e9:.2f} GB (expert cache {bud['expert_cache_bytes'] / 1e9:.2f} GB = "
          f"{bud['expert_cache_bytes'] / bud['expert_bytes_in_memory']:.0%} of experts during the plan's prefill chunk, "
          f"{decoding / 1e9:.2f} GB = {decoding / bud['expert_bytes_in_memory']:.0%} while decoding); "
          f"prompt {r['args']['prompt_tokens']} tok, greedy {r['args']['gen_tokens']} tok")
    p = r["platform"]
    print(f"platform: {p['machine']}, Python {p['python']}, MLX {p['mlx']}, {p['device']}")
    print("\n".join(ceiling_lines(r)))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()))
    print(f"warm-up (kernel compilation): {r.get('warmup_s', 0):.1f}s")
    print("\n== decode ==")
    width = max([18] + [len(n) + 1 for n in table_runs(r)])
    print(f"{'run':<{width}}{'TTFT s':>8}{'tok/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'MB/tok':>8}{'hit':>7}{'GB/s io':>9}{'eff':>6}{'roof':>8}{'share':>7}{'flight':>7}")
    for name in table_runs(r):
        x = r[name]
        # a run that read nothing (every expert a hit) is bound by compute, not the disk: no roofline
        read = x["bytes_read_per_token"] > 0
        roof, share = (f"{x['roofline_tokens_per_s']:>8.2f}", f"{x['share_of_roofline']:>7.2f}") if read else (f"{'-':>8}", f"{'-':>7}")
        print(f"{name:<{width}}{x['ttft_s']:>8.2f}{x['tokens_per_s']:>8.2f}{x['p50_token_ms']:>8.0f}{x['p99_token_ms']:>8.0f}"
              f"{x['bytes_read_per_token'] / 1e6:>8.1f}{x['hit_rate']:>7.1%}{x['read_gb_per_s_during_io']:>9.2f}"
              f"{x['io_efficiency']:>6.2f}{roof}{share}{x.get('reads_in_flight', 0):>7.1f}")
    print(f"\n== prefill ({r['args']['prompt_tokens']} tokens; floor: each distinct expert it routes to read once at "
          f"the prefill ceiling) ==")
    print(f"{'run':<{width}}{'TTFT s':>8}{'floor s':>9}{'TTFT/floor':>11}{'before':>7}{'TTFT/bef':>9}{'alone s':>8}{'t':>3}{'TTFT/alone':>11}{'experts':>9}{'MB':>9}{'chunk':>7}{'pf hit':>8}"
          f"{'dec hit':>8}{'read s':>8}{'GB/s':>6}{'flight':>7}{'wait s':>8}{'sync s':>8}{'mm s':>7}{'allocs':>7}  admission")
    for name in table_runs(r):
        x = r[name]
        rate = x.get("prefill_read_bytes", 0) / max(x.get("prefill_read_s", 0), 1e-9) / 1e9
        alone = (f"{x['prefill_read_alone_s']:>8.3f}{x.get('prefill_read_alone_threads', '-'):>3}{x['ttft_over_read_alone']:>11.2f}"
                 if "prefill_read_alone_s" in x else f"{'-':>8}{'-':>3}{'-':>11}")
        before = (f"{x['ceiling_before_gb_per_s']:>7.2f}{x['ttft_over_floor_before']:>9.2f}" if "ttft_over_floor_before" in x
                  else f"{'-':>7}{'-':>9}")
        print(f"{name:<{width}}{x['ttft_s']:>8.2f}{x['prefill_read_floor_s']:>9.3f}{x['ttft_over_floor']:>11.2f}{before}{alone}"
              f"{x['prefill_distinct_experts']:>9}{x['prefill_expert_bytes'] / 1e6:>9.1f}{x['prefill_step_size']:>7}"
              f"{x['prefill_hit_rate']:>8.1%}{x['hit_rate']:>8.1%}{x.get('prefill_read_s', 0):>8.2f}{rate:>6.2f}"
              f"{x.get('prefill_reads_in_flight', 0):>7.1f}"
              f"{x.get('prefill_wait_s', 0):>8.2f}{x.get('prefill_route_sync_s', 0):>8.2f}"
              f"{x.get('prefill_expert_compute_s', 0):>7.2f}{x.get('prefill_staging_allocations', 0):>7}  {x['prefill_admission']}")
    print("(before: the GB/s of the best of three ceiling windows just before a cold run, TTFT/bef: TTFT over the floor at that rate; "
          "alone s: a cold run's distinct experts read again just after it by a reader doing "
          "nothing else (the fastest of: sub-reads in layout order taken in turn by its threads, one contiguous share per thread, "
          "or the sub-reads in a random order; at the runtime's threads or half; t: that reader's threads); read s: the disk busy with the prefill pipeline's reads; GB/s: their rate; "
          "flight: reads the reader's threads kept in flight meanwhile, on average (of its threads); "
          "wait s: the layers waiting for them; sync s: at the routing's host sync, i.e. computing all before each MoE "
          "input (embedding, attention); mm s: the groups' matmuls; allocs: staging slots made)")
    print(f"\n{'disk idle in TTFT, s':<22}{'before':>8}{'in layer':>9}{'between':>9}{'after':>8}{'early':>7}{'unused':>7}{'next':>7}"
          "  (before the first read / between one layer's groups / between layers / after the last read;"
          " experts read before their call's routing, of them not routed to; next: of the TTFT, from the first"
          " token known to its hand-out, the next token's step that mlx-lm's loop runs first)")
    for name in table_runs(r):
        x = r[name]
        if "prefill_idle_before_s" in x:
            print(f"{name:<{max(22, width)}}" + "".join(f"{x[f'prefill_idle_{k}_s']:>{w}.3f}" for k, w in
                                         (("before", 8), ("within_layers", 9), ("between_layers", 9), ("after", 8)))
                  + f"{x.get('prefill_speculated', 0):>7}{x.get('prefill_speculated_unused', 0):>7}"
                  + (f"{x['ttft_s'] - x['first_token_known_s']:>7.3f}" if "first_token_known_s" in x else f"{'-':>7}"))
    summary = r.get("prefill_summary", {})
    if summary:
        print("\ncold runs by --compare entry, TTFT over: the floor at the prefill ceiling / at the windows just "
              "before / the same experts read alone just after; the first token known over the floor (median, least-most, runs within "
              f"{next(iter(summary.values()))['within']}x)")
        print("\n".join(prefill_summary_lines(summary)))
    for name, settings in r.items():
        pc = settings.get("page_cache") if name.endswith("settings") and isinstance(settings, dict) else None
        if pc:
            run = name[: -len("settings")].rstrip("_")
            how = (f"{fmt_bytes(pc['bytes'])} of other memory held ({'locked' if pc['locked'] else 'not locked'}), "
                   f"leaving {fmt_bytes(pc['available_during'])} available" if pc["bytes"] else f"nothing held: {pc['why_not']}")
            what = {"equal": "the budget beyond the least budget: the same total memory",
                    "cache": "what the budget gave the expert cache",
                    "all": "every free byte"}[pc["memory"]]
            print(f"{run}: the OS page cache instead of the expert cache, on {fmt_bytes(pc['target_bytes'])} "
                  f"({what}): {how}")
    for name in streams_runs(r):
        x = r[name]
        print(f"{name}: {x['streams']} streams, {x['aggregate_tokens_per_s']:.2f} tok/s in all "
              f"({x['per_stream_tokens_per_s']:.2f} each; p50 {x['p50_token_ms']:.0f} ms, p99 {x['p99_token_ms']:.0f} ms), "
              f"{x['bytes_read_per_step'] / 1e6:.1f} MB read per step, hit {x['hit_rate']:.1%}; batch roofline "
              f"{x['batch_roofline_tokens_per_s']:.2f}, share {x['share_of_batch_roofline']:.2f}; "
              f"{x['distinct_experts_per_layer_step']:.1f} distinct experts per layer step (sharing {x['sharing']:.2f}); "
              f"{x.get('staging_allocations', 0)} staging slots made; {x.get('reads_in_flight', 0):.1f} reads in flight; "
              f"{x['aggregate_over_one_stream']:.2f}x one "
              f"stream's {'cold' if name.endswith('cold') else 'warm'} run")
        if "step_ms" in x:
            ms = x["step_ms"]
            print(f"  a step, {ms['step']:.1f} ms: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in ms.items() if k != "step"))
    if r.get("streams_summary"):
        target = next(iter(r["streams_summary"].values()))["target"]
        print(f"streams by --compare entry, share of the batch roofline cold / warm (median, least-most, runs reaching {target}):")
        print("\n".join(streams_summary_lines(r["streams_summary"])))
    if "naive" in r:
        print(f"naive loader (per-tensor buffered reads, no cache): {r['naive']['tokens_per_s']:.2f} tok/s; "
              f"moestream warm is {r['warm']['tokens_per_s'] / r['naive']['tokens_per_s']:.1f}x")
    if "mlx_lm_in_memory" in r:
        print(f"mlx-lm in memory: {r['mlx_lm_in_memory']['tokens_per_s']:.2f} tok/s")
    timed = r.get("phases", r["warm"])
    print(f"\n== per MoE layer, per call ({'warm pass with attention and routing timed apart' if 'phases' in r else 'warm'}) ==")
    for k, v in timed["per_layer_ms"].items():
        print(f"  {k:<58}{v:8.2f} ms")
    for k, v in timed.get("checksum_ms", {}).items():
        print(f"    {'of which checksums, ' + k:<56}{v:8.2f} ms")
    for k, v in timed.get("per_token_ms", {}).items():
        print(f"  {'per token, ' + k:<58}{v:8.2f} ms")
    s = r["warm"]["scaled"]
    if s["layers_scaled_to"] == s["layers_measured"]:
        return
    print(f"\nSCALED to {s['layers_scaled_to']} layers (not measured): {s['tokens_per_s_scaled']:.2f} tok/s warm, "
          f"{r['cold']['scaled']['tokens_per_s_scaled']:.2f} tok/s cold")


def ceiling_lines(r: dict) -> list[str]:
    """The ceilings as text: the two ceilings, with the best cell over all its windows and the best
    window beside them, then each cell's rate over all its windows, and the windows."""
    c, pc = r["ceiling"], r["prefill_ceiling"]

    def cell(x: dict) -> str:
        return f"{x['threads']} threads, {fmt_bytes(x['chunk_bytes'])}, {'in sequence' if x['sequential'] else 'random'}"

    lines = [f"ceiling: {c['gb_per_s']:.2f} GB/s sustained (O_DIRECT; the best random-read cell on its even windows, "
             f"{cell(c)}, at its odd ones; over all its windows {c['all_windows_gb_per_s']:.2f}; the best cell over all "
             f"its windows {r['ceiling_best_cell_all_windows_gb_per_s']:.2f}; the best window {r['ceiling_burst_gb_per_s']:.2f})",
             f"prefill ceiling: {pc['gb_per_s']:.2f} GB/s sustained (the best cell either way, so chosen: {cell(pc)}; "
             f"the best cell over all its windows {r['prefill_ceiling_best_cell_all_windows_gb_per_s']:.2f}; "
             f"the best window {r['prefill_ceiling_burst_gb_per_s']:.2f})",
             "ceiling cells, GB/s: over all windows (each window in turn)"]
    lines += [f"  {cell(x):<36}{x['gb_per_s']:>6.2f}  (" + " ".join(f"{w:.2f}" for w in x["windows"]) + ")"
              for x in r["ceiling_cells"]]
    return lines


def table_runs(report: dict) -> list[str]:
    """The runs the table shows, in order: every decode run with a roofline."""
    return [n for n, x in report.items() if isinstance(x, dict) and "share_of_roofline" in x]


def plot_report(report: dict, path) -> None:
    """Two panels: tokens/s of every run (values on the bars; the naive loader and mlx-lm in
    memory too), and each run's share of its own roofline, where 1.0 is the disk's limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = table_runs(report)
    extra = [n for n in ("naive", "mlx_lm_in_memory") if n in report]
    names = runs + extra
    vals = [report[n]["tokens_per_s"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4),
                                      gridspec_kw={"width_ratios": [len(names), max(len(runs), 1)]})
    bars = left.bar(names, vals, color=["#4a7"] * len(runs) + ["#888"] * len(extra))
    left.bar_label(bars, fmt="%.1f", fontsize=8)
    if max(vals) > 20 * max(min(vals), 1e-9):
        left.set_yscale("log")  # mlx-lm in memory would flatten every streaming bar
    left.set_ylabel("decode tokens/s")
    left.tick_params(axis="x", rotation=45, labelsize=8)
    shares = [report[n]["share_of_roofline"] for n in runs]
    bars = right.bar(runs, shares, color="#47a")
    right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.axhline(1.0, ls="--", lw=1, color="#a44")
    right.set_ylabel("share of the roofline")
    right.set_title("roofline: disk ceiling / bytes missed per token", fontsize=8)
    right.tick_params(axis="x", rotation=45, labelsize=8)
    b = report["bundle"]
    fig.suptitle(f"{b['family']}: {b['moe_layers']} MoE layers, budget {fmt_bytes(report['budget']['budget_bytes'])}, "
                 f"ceiling {report['ceiling']['gb_per_s']:.2f} GB/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
