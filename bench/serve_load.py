"""What N concurrent users get from one disk through `moestream serve`: N OpenAI clients (the official
`openai` package, streaming chat completions, temperature 0) against one server on 127.0.0.1.

Starts `moestream serve BUNDLE --host 127.0.0.1 --port 0` as a subprocess (every option after `--` is
passed to it, e.g. `--memory-budget`), waits until it listens, sends --warmup requests (not counted:
kernel compilation, first reads), then runs the one-stream baseline (N=1) and the N-stream load on
the same server (so their ratio shares a run), each stream doing --requests requests one after
another, and stops the server (also on Ctrl-C or an error).

Reports, per phase: aggregate generated tok/s over its wall time (and the N/1 ratio), per-stream
tok/s (each request's tokens over the time from sending it to its last token: p50, and p99 = 99% of
requests got at least this), time to first token, gaps between streamed chunks, requests
completed/failed, where token counts came from (the server's usage, asked for with
stream_options.include_usage, else one per content chunk), and from the server's GET
/moestream/stats the bytes read per token, the disk's rate and the expert cache's hit rate.

Batching: mlx_lm.server decodes concurrent requests in one batch when the model's KV caches merge
(up to its `--decode-concurrency` requests, `--prompt-concurrency` prompts prefilled together), else
one at a time; a request that arrives while a batch runs joins it at the end of mlx-lm's 0.5 s
scheduling window. The script does not assume either: "generating >1" is the share of the time any
request was generating (first to last token, as the server's generation thread made them) during
which more than one was, against the same share for requests in flight, and the verdict line says
"batched" or "one at a time" from them.

    python bench/serve_load.py BUNDLE --streams 8 --requests 2 --max-tokens 64 --json load.json \\
        -- --memory-budget 40GB
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

READY_LINE = re.compile(r"moestream serve: (http://\S+)/v1")
FILLER = ("the disk streams experts while the model decodes one token after another and the cache keeps the "
          "hot ones close").split()


# ---------------------------------------------------------------- the server


class Server:
    """A running `moestream serve`: its process, URL (http://127.0.0.1:PORT; the API is under /v1),
    command line, log file (its stderr) and the seconds it took to listen."""

    def __init__(self, proc: subprocess.Popen, url: str, command: list[str], log: Path, ready_s: float):
        self.proc, self.url, self.command, self.log, self.ready_s = proc, url, command, log, ready_s


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(bundle: str, serve_args: list[str], log: Path, timeout: float) -> Server:
    """`moestream serve` on 127.0.0.1, any free port (the server picks it: no race), as a subprocess in
    its own session (a Ctrl-C here does not reach it; stop_process stops it). Waits up to `timeout`
    seconds for the line that says where it listens; RuntimeError with its log's tail if it exits or
    does not say so in time."""
    command = [sys.executable, "-m", "moestream.cli", "serve", bundle, *serve_args, "--host", "127.0.0.1", "--port", "0"]
    out = log.with_suffix(".stdout")
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    t0 = time.perf_counter()
    try:
        while True:
            text = out.read_text(errors="replace") if out.exists() else ""
            if match := READY_LINE.search(text):
                return Server(proc, match.group(1), command, log, time.perf_counter() - t0)
            if proc.poll() is not None:
                raise RuntimeError(f"moestream serve exited with code {proc.returncode} before it listened; "
                                   f"its output ends with:\n{text[-2000:]}{log_tail(log)}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"moestream serve did not listen within {timeout:.0f} s (--ready-timeout); "
                                   f"its log ends with:\n{log_tail(log)}")
            time.sleep(0.1)
    except BaseException:
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> int | None:
    """SIGINT (`moestream serve` then shuts down in order), SIGTERM after `grace` s, SIGKILL after 5 more."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            proc.send_signal(sig)
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    return proc.poll()


def server_stats(url: str) -> dict | None:
    """`GET /moestream/stats`: the model's I/O and cache counters and the generation thread's first and
    last token times of the latest finished requests; None if the server does not answer it."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/moestream/stats", timeout=30) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def server_side(before: dict | None, after: dict | None, tokens: int, wall: float) -> dict:
    """What the server says about one phase: its requests' token spans (the ones finished since
    `before`) and the disk reads and cache lookups made meanwhile."""
    if not before or not after:
        return {}
    new = after["requests_finished"] - before["requests_finished"]
    spans = after["requests"][-new:] if new > 0 else []
    gen = overlap([(r["first_token"], r["last_token"]) for r in spans])
    t0 = min((r["first_token"] for r in spans), default=0.0)
    out = {"server_requests": new, "server_overlap": gen["share"], "server_max_generating": gen["max_generating"],
           "server_spans": [[r["first_token"] - t0, r["last_token"] - t0, r["tokens"]] for r in spans]}
    m0, m1 = before.get("model") or {}, after.get("model") or {}
    if "bytes_read" in m0 and "bytes_read" in m1:
        read = m1["bytes_read"] - m0["bytes_read"]
        hits, misses = (m1[k] - m0[k] for k in ("cache_hits", "cache_misses"))
        out.update({"bytes_read": read, "disk_gb_s": read / wall / 1e9 if wall > 0 else None,
                    "mb_per_token": read / tokens / 1e6 if tokens else None,
                    "hit_rate": hits / (hits + misses) if hits + misses else None,
                    "io_wait_s": m1["io_wait_s"] - m0["io_wait_s"]})
    return out


# ---------------------------------------------------------------- requests


def eos_token_ids(bundle: str) -> list[int]:
    """The token ids that end a reply, as mlx-lm collects them (config.json's and generation_config.json's
    eos_token_id, the tokenizer's eos_token), read from the bundle's files without loading a tokenizer."""
    root, ids = Path(bundle), set()

    def read(name):
        try:
            return json.loads((root / name).read_text())
        except (OSError, ValueError):
            return {}

    for name in ("config.json", "generation_config.json"):
        cfg = read(name)
        for c in (cfg, cfg.get("text_config") or {}):
            value = c.get("eos_token_id")
            ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    eos = read("tokenizer_config.json").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str):
        tok = read("tokenizer.json")
        ids.update(t["id"] for t in tok.get("added_tokens", []) if t.get("content") == eos)
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and isinstance(vocab.get(eos), int):
            ids.add(vocab[eos])
    return sorted(ids)


def prompt_text(tag: str, words: int) -> str:
    """A prompt that starts with `tag` (distinct per request, so mlx-lm's prompt cache cannot serve
    one request's prefill from another's) followed by `words` words."""
    body = " ".join(FILLER[i % len(FILLER)] for i in range(max(words, 1)))
    return f"[{tag}] Continue this text for as long as you can: {body}"


def one_request(client, model: str, prompt: str, max_tokens: int, logit_bias: dict | None) -> dict:
    """One streaming chat completion: its timings (perf_counter seconds), chunks and usage."""
    rec = {"t_sent": time.perf_counter(), "t_first": None, "t_last": None, "t_done": None, "chunk_times": [],
           "usage_tokens": None, "cached_tokens": None, "prompt_tokens": None, "finish_reason": None, "error": None}
    try:
        extra = {"logit_bias": logit_bias} if logit_bias else {}
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, **extra)
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                rec["usage_tokens"] = chunk.usage.completion_tokens
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                rec["cached_tokens"] = getattr(details, "cached_tokens", None)
            for choice in chunk.choices or ():
                delta = choice.delta
                extra_fields = getattr(delta, "model_extra", None) or {}
                if delta is not None and (delta.content or delta.tool_calls or extra_fields.get("reasoning")):
                    rec["chunk_times"].append(now)
                    rec["t_first"] = rec["t_first"] or now
                    rec["t_last"] = now
                if choice.finish_reason:
                    rec["finish_reason"] = choice.finish_reason
        rec["t_done"] = time.perf_counter()
        if rec["finish_reason"] is None:
            rec["error"] = "the stream ended without a finish_reason"
    except Exception as e:  # counted as failed; the stream goes on with its next request
        rec["t_done"] = time.perf_counter()
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
    return rec


def run_phase(url: str, model: str, streams: int, requests: int, max_tokens: int, prompt_words: int,
              logit_bias: dict | None, timeout: float, tag: str, stop: threading.Event) -> dict:
    """`streams` threads, each an OpenAI client doing `requests` requests one after another, released
    together. {"wall_s", "records": [...]}, each record with its stream and request index."""
    import openai

    before = server_stats(url)
    records: list[dict] = []
    lock = threading.Lock()
    gate = threading.Barrier(streams + 1)

    def stream_main(s: int):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="dummy", max_retries=0, timeout=timeout)
        try:
            gate.wait()
            for r in range(requests):
                if stop.is_set():
                    break
                rec = one_request(client, model, prompt_text(f"{tag}-{s}-{r}", prompt_words), max_tokens, logit_bias)
                with lock:
                    records.append({"stream": s, "request": r, **rec})
        finally:
            client.close()

    threads = [threading.Thread(target=stream_main, args=(s,), daemon=True, name=f"stream-{s}") for s in range(streams)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        while t.is_alive():  # joined in slices, so that Ctrl-C reaches this thread
            t.join(0.2)
    wall = time.perf_counter() - t0
    for rec in records:  # times relative to the phase's start
        for key in ("t_sent", "t_first", "t_last", "t_done"):
            rec[key] = None if rec[key] is None else rec[key] - t0
        rec["chunk_times"] = [t - t0 for t in rec["chunk_times"]]
    return {"wall_s": wall, "records": sorted(records, key=lambda r: (r["stream"], r["request"])),
            "server_before": before, "server_after": server_stats(url)}


# ---------------------------------------------------------------- figures


def percentile(values, q: float):
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def overlap(intervals: list[tuple[float, float]]) -> dict:
    """Of the time with at least one interval open, the share with more than one open; and the most open at once."""
    events = sorted([(a, 1) for a, b in intervals if b > a] + [(b, -1) for a, b in intervals if b > a],
                    key=lambda e: (e[0], e[1]))
    busy = multi = 0.0
    open_, most, last = 0, 0, None
    for t, step in events:
        if last is not None:
            busy += (t - last) if open_ >= 1 else 0.0
            multi += (t - last) if open_ >= 2 else 0.0
        open_ += step
        most, last = max(most, open_), t
    return {"share": multi / busy if busy > 0 else 0.0, "busy_s": busy, "max_generating": most}


def summarize(phase: dict, streams: int) -> dict:
    """The figures of one phase (see the module docstring)."""
    records, wall = phase["records"], phase["wall_s"]
    ok = [r for r in records if r["error"] is None]
    from_usage = bool(ok) and all(r["usage_tokens"] is not None for r in ok)
    for r in records:
        r["tokens"] = r["usage_tokens"] if r["usage_tokens"] is not None else len(r["chunk_times"])
        # what the user gets: tokens over the time from sending the request to its last token
        r["tok_s"] = r["tokens"] / (r["t_done"] - r["t_sent"]) if r["tokens"] and r["t_done"] > r["t_sent"] else None
        span = (r["t_last"] - r["t_first"]) if r["t_first"] is not None else 0.0
        r["decode_tok_s"] = (r["tokens"] - 1) / span if r["tokens"] > 1 and span > 0 else None
        r["ttft_s"] = r["t_first"] - r["t_sent"] if r["t_first"] is not None else None
    tokens = sum(r["tokens"] for r in ok)
    rates = [r["tok_s"] for r in ok if r["tok_s"] is not None]
    decode = [r["decode_tok_s"] for r in ok if r["decode_tok_s"] is not None]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    gaps = [b - a for r in ok for a, b in zip(r["chunk_times"], r["chunk_times"][1:], strict=False)]
    generating = overlap([(r["t_first"], r["t_last"]) for r in ok if r["t_first"] is not None])
    in_flight = overlap([(r["t_sent"], r["t_done"]) for r in records])
    return {
        "streams": streams, "wall_s": wall, "requests_completed": len(ok), "requests_failed": len(records) - len(ok),
        "tokens": tokens, "tokens_counted_from": "usage" if from_usage else "chunks",
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "per_stream_tok_s_p50": percentile(rates, 50), "per_stream_tok_s_p99": percentile(rates, 1),
        "decode_tok_s_p50": percentile(decode, 50), "decode_tok_s_p99": percentile(decode, 1),
        "ttft_s_p50": percentile(ttfts, 50), "ttft_s_p99": percentile(ttfts, 99),
        "itl_ms_p50": None if not gaps else 1000 * percentile(gaps, 50),
        "itl_ms_p99": None if not gaps else 1000 * percentile(gaps, 99),
        "prompt_tokens_mean": (sum(r["prompt_tokens"] or 0 for r in ok) / len(ok)) if ok else None,
        "cached_prompt_tokens": sum(r["cached_tokens"] or 0 for r in ok),
        "overlap": generating["share"], "max_generating": generating["max_generating"],
        "generating_coverage": generating["busy_s"] / wall if wall > 0 else None,
        "overlap_in_flight": in_flight["share"], "max_in_flight": in_flight["max_generating"],
        **server_side(phase["server_before"], phase["server_after"], tokens, wall),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "records": records,
    }


COLUMNS: list[common.Column] = [
    ("phase", "phase", ""), ("ok", "requests_completed", "d"), ("failed", "requests_failed", "d"),
    ("tokens", "tokens", "d"), ("wall s", "wall_s", ".2f"), ("agg tok/s", "aggregate_tok_s", ".2f"),
    ("stream tok/s p50", "per_stream_tok_s_p50", ".2f"), ("p99", "per_stream_tok_s_p99", ".2f"),
    ("TTFT s p50", "ttft_s_p50", ".3f"), ("p99", "ttft_s_p99", ".3f"), ("ITL ms p50", "itl_ms_p50", ".1f"),
    ("p99", "itl_ms_p99", ".1f"), ("in flight >1", "overlap_in_flight", ".0%"),
    ("generating >1", lambda r: r.get("server_overlap", r["overlap"]), ".0%"),
    ("MB/tok", "mb_per_token", ".2f"), ("disk GB/s", "disk_gb_s", ".3f"), ("hit", "hit_rate", ".1%"),
]


def verdict(load: dict) -> str:
    """Whether the load phase's requests were generated together: of the time any request was
    generating (first to last token), the share during which more than one was, from the server's
    token times (GET /moestream/stats) or else from when the clients got them; against the same share
    for requests in flight (sent to done). Served one at a time, requests are in flight together but
    their generating spans follow one another."""
    if load["streams"] < 2 or load["requests_completed"] < 2:
        return "not measured (fewer than 2 requests completed in the load phase)"
    flight = load["overlap_in_flight"]
    if "server_overlap" in load:
        gen, most, where = load["server_overlap"], load["server_max_generating"], "the server's token times"
    else:
        gen, most, where = load["overlap"], load["max_generating"], "the clients' token times"
        coverage = load["generating_coverage"] or 0.0
        if coverage < 0.5:
            return (f"not conclusive: some request was generating (first to last token) only {coverage:.0%} of the "
                    f"phase's time: tokens reached the clients in bursts; ask for more --max-tokens")
    if flight < 0.5:
        return (f"not conclusive: requests were in flight together only {flight:.0%} of the time (each finished "
                f"before the next arrived): ask for more --max-tokens")
    if gen >= 0.5:
        return (f"batched: while any request was generating, more than one was {gen:.0%} of the time (up to "
                f"{most} at once; {where}); in flight together {flight:.0%}")
    if gen < 0.1:
        return (f"one at a time: requests were in flight together {flight:.0%} of the time but generated together "
                f"only {gen:.0%} ({where}): mlx_lm.server served them one after another")
    return (f"partly concurrent: in flight together {flight:.0%} of the time, generating together {gen:.0%} "
            f"(up to {most} at once; {where})")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="options after -- go to `moestream serve` (e.g. -- --memory-budget 8GB "
                                        "--decode-concurrency 8)")
    ap.add_argument("bundle", help="bundle folder (or anything `moestream serve` takes)")
    ap.add_argument("--memory-budget", default=None, help="passed to `moestream serve` (default: its own)")
    ap.add_argument("--streams", type=int, default=4, help="concurrent clients in the load phase")
    ap.add_argument("--requests", type=int, default=2, help="requests each stream makes, one after another")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--prompt-words", type=int, default=32, help="words of filler text in each prompt")
    ap.add_argument("--allow-eos", action="store_true",
                    help="let replies end early (by default the end-of-turn tokens get logit_bias -100, so each "
                         "request generates max_tokens tokens, as benchmarks' ignore_eos does)")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent (one at a time) before measuring, not counted")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-stream phase")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    ap.add_argument("--ready-timeout", type=float, default=900.0, help="seconds the server may take to load and listen")
    ap.add_argument("--server-log", default=None, help="keep the server's log in this file (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for name in ("streams", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory_budget:
        serve_args = ["--memory-budget", args.memory_budget, *serve_args]

    import openai

    logit_bias = None if args.allow_eos else {str(t): -100 for t in eos_token_ids(args.bundle)} or None
    stop = threading.Event()
    print(common.setup_line(), flush=True)

    def phase(streams: int, requests: int, tag: str) -> dict:
        return run_phase(server.url, model, streams, requests, args.max_tokens, args.prompt_words, logit_bias,
                         args.timeout, tag, stop)

    def interrupted(*_):
        raise KeyboardInterrupt

    on_term = signal.signal(signal.SIGTERM, interrupted)  # a kill stops the server too
    server, report, phases = None, {}, []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        try:
            log = Path(args.server_log) if args.server_log else Path(tmp) / "server.log"
            try:
                server = start_server(args.bundle, serve_args, log, args.ready_timeout)
            except RuntimeError as e:
                print(f"serve_load: {e}", file=sys.stderr)
                return 2
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="dummy", max_retries=0, timeout=args.timeout)
            model = client.models.list().data[0].id
            client.close()
            print(f"server: {' '.join(server.command[1:])}\n  {server.url}/v1, model {model!r}, ready in "
                  f"{server.ready_s:.1f} s; eos suppressed: {logit_bias is not None}", flush=True)
            report = {"setup": common.setup_line(), "script_args": vars(args), "serve_args": serve_args,
                      "server": {"url": server.url, "model": model, "ready_s": server.ready_s},
                      "eos_logit_bias": sorted(int(t) for t in logit_bias or {})}
            if args.warmup:
                warm = summarize(phase(1, args.warmup, "warmup"), 1)
                report["warmup"] = warm
                print(f"warm-up: {args.warmup} request(s), {warm['wall_s']:.1f} s"
                      + (f", failed: {warm['errors']}" if warm["requests_failed"] else ""), flush=True)
            if not args.no_baseline:
                phases.append({"phase": "one stream", **summarize(phase(1, args.requests, "one"), 1)})
            phases.append({"phase": f"{args.streams} streams",
                           **summarize(phase(args.streams, args.requests, "load"), args.streams)})
        except KeyboardInterrupt:
            stop.set()
            print("interrupted: the server is stopped", file=sys.stderr, flush=True)
            return 130
        finally:
            signal.signal(signal.SIGTERM, on_term)
            if server is not None:
                code = stop_process(server.proc)
                report.get("server", {})["exit_code"] = code
                if code not in (0, None, -signal.SIGINT):
                    print(f"moestream serve exited with code {code} when stopped; its log ends with:\n"
                          f"{log_tail(server.log, 10)}", file=sys.stderr)
    one, load = (phases[0] if len(phases) == 2 else None), phases[-1]
    print(common.table(phases, COLUMNS))
    ratio = load["aggregate_tok_s"] / one["aggregate_tok_s"] if one and one["aggregate_tok_s"] else None
    counted = sorted({p["tokens_counted_from"] for p in phases})
    print(f"tokens counted from: {' and '.join(counted)} (usage: the server's stream_options.include_usage; "
          f"chunks: one per content chunk)")
    if ratio is not None:
        print(f"aggregate / one stream: {ratio:.2f}x ({load['aggregate_tok_s']:.2f} / {one['aggregate_tok_s']:.2f} tok/s)")
    print(f"concurrency: {verdict(load)}")
    for p in phases:
        if p["errors"]:
            print(f"{p['phase']}: failed requests, e.g. {p['errors'][0]}")
    report.update({
        "aggregate_tok_s": load["aggregate_tok_s"], "one_stream_tok_s": one["aggregate_tok_s"] if one else None,
        "ratio": ratio, "per_stream_tok_s_p50": load["per_stream_tok_s_p50"],
        "per_stream_tok_s_p99": load["per_stream_tok_s_p99"], "ttft_s_p50": load["ttft_s_p50"],
        "ttft_s_p99": load["ttft_s_p99"], "requests_completed": load["requests_completed"],
        "requests_failed": load["requests_failed"], "tokens_counted_from": load["tokens_counted_from"],
        "overlap": load.get("server_overlap", load["overlap"]),
        "max_generating": load.get("server_max_generating", load["max_generating"]),
        "overlap_from": "server" if "server_overlap" in load else "clients", "concurrency": verdict(load),
        "phases": phases,
    })
    common.write_json(args.json, report)
    return 0 if load["requests_failed"] == 0 and (one is None or one["requests_failed"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
