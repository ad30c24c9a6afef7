"""bench/serve_load.py end to end: `moestream serve` in its own process on a tiny bundle, two
concurrent OpenAI clients (the `openai` package) with one streaming request each, the one-stream
baseline first, the server stopped at the end."""

from __future__ import annotations

import json

import pytest
from test_bench_scripts import BENCH, bench_path, load_script  # noqa: F401 (bench_path: a fixture)

KEYS = {"aggregate_tok_s", "one_stream_tok_s", "ratio", "per_stream_tok_s_p50", "per_stream_tok_s_p99",
        "ttft_s_p50", "ttft_s_p99", "requests_completed", "requests_failed", "tokens_counted_from", "overlap",
        "overlap_from", "concurrency", "phases", "server", "setup"}


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
@pytest.mark.usefixtures("bench_path")
def test_serve_load_two_streams(bundle_dir, tmp_path, capsys):
    module = load_script(BENCH / "serve_load.py")
    out, log = tmp_path / "load.json", tmp_path / "server.log"
    code = module.main([str(bundle_dir("qwen3_moe")), "--streams", "2", "--requests", "1", "--max-tokens", "6",
                        "--ready-timeout", "120", "--timeout", "60", "--server-log", str(log), "--json", str(out),
                        "--", "--log-level", "WARNING"])
    printed = capsys.readouterr().out
    assert code == 0, printed + log.read_text()
    report = json.loads(out.read_text())
    assert KEYS <= set(report)
    one, load = report["phases"]
    assert (one["streams"], load["streams"]) == (1, 2)
    assert report["requests_completed"] == 2 and report["requests_failed"] == 0
    assert sorted(r["stream"] for r in load["records"]) == [0, 1]
    # the eos tokens are suppressed, so each request makes max_tokens tokens, as the server's usage says
    assert report["tokens_counted_from"] == "usage" and [r["tokens"] for r in load["records"]] == [6, 6]
    assert report["eos_logit_bias"]
    assert report["aggregate_tok_s"] > 0 and report["one_stream_tok_s"] > 0 and report["ratio"] > 0
    assert load["server_requests"] == 2 and load["bytes_read"] >= 0  # the server's side, from GET /moestream/stats
    assert "aggregate / one stream" in printed and "concurrency:" in printed
    assert report["server"]["url"].startswith("http://127.0.0.1:")
