"""`moestream prepare` as a user meets it, run as a user runs it (subprocesses, a terminal made with
`pty` where the display depends on one): progress on stderr (one redrawn line on a terminal, a line
per layer elsewhere) and a summary with what to run next on stdout; Prefect's own log lines, its
telemetry notice and docs link kept off the terminal; a bad source refused in one line before
Prefect's server starts; Ctrl-C ending either engine at once with one line saying what was kept, and
a rerun resuming; output piped into a reader that goes away (`| head`) ending quietly."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moestream.progress import PrepareProgress, fmt_duration

CLI = [sys.executable, "-m", "moestream.cli"]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_", "MOESTREAM_DEBUG"))}
    env.pop("DO_NOT_TRACK", None)  # a first-run telemetry notice must be kept off the terminal by us
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # fresh: as on a new user's machine
    return env


def _in_terminal(argv, env, interrupt_on: str | None = None, timeout: float = 300):
    """Run argv in a new pseudo-terminal, as a shell runs a command (its own process group). With
    `interrupt_on`, Ctrl-C (SIGINT to the whole group, as a terminal sends it: Prefect's server gets
    it too) once the output matches. Returns (exit code, output, output after the Ctrl-C, seconds
    from the Ctrl-C to the exit); it returns once every process that held the terminal is gone."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(argv[0], argv, env)
    out, sent_at, mark, deadline = b"", None, 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the terminal closed: every process that held it is gone
                break
            if not data:
                break
            out += data
        if interrupt_on and sent_at is None and re.search(interrupt_on.encode(), out):
            os.killpg(pid, signal.SIGINT)
            sent_at, mark = time.monotonic(), len(out)
    else:
        os.killpg(pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s (or something it started is): {out[-2000:]!r}")
    _, status = os.waitpid(pid, 0)
    took = time.monotonic() - sent_at if sent_at else None
    os.close(fd)
    text = out.decode(errors="replace")
    return os.waitstatus_to_exitcode(status), text, text[len(out[:mark].decode(errors="replace")):], took


def _lines(text: str) -> list[str]:
    """What stays on the screen: each redrawn line counts once, as its last state."""
    return [re.sub(r"\x1b\[K", "", line.split("\r")[-1]) for line in text.replace("\r\n", "\n").split("\n")
            if re.sub(r"\x1b\[K", "", line.split("\r")[-1]).strip()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """6 MoE layers of 64 experts: long enough to interrupt in the middle."""
    from moestream.stages.synth import synth_checkpoint

    return synth_checkpoint("qwen3_moe", tmp_path_factory.mktemp("small") / "ck", preset="small").path


def _dense(folder: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
        "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32, "head_dim": 4}))
    save_file({"model.embed_tokens.weight": np.zeros((32, 8), np.float32),
               "model.layers.0.mlp.gate_proj.weight": np.zeros((16, 8), np.float32)}, str(folder / "model.safetensors"))
    return folder


# ----------------------------------------------------------------------------- fast


def test_the_display_counts_layers_bytes_rate_and_eta(tmp_path):
    """Without a terminal, one line per packed layer; on one, a redrawn line. Bytes are what is in the
    staging folder; a layer an earlier run kept says nothing about the pace."""
    import io

    out = tmp_path / "b"
    experts = tmp_path / ".b.partial" / "experts"
    experts.mkdir(parents=True)
    (experts / "layer_000.bin").write_bytes(b"x" * 1000)  # kept by an earlier run
    (experts / "layer_000.bin.json").write_text("{}")
    now = [0.0]
    log, screen = io.StringIO(), io.StringIO()
    with PrepareProgress(out, log, tty=False, clock=lambda: now[0]) as p, \
            PrepareProgress(out, screen, tty=True, tick=3600, clock=lambda: now[0]) as q:
        for show in (p, q):
            show("plan", 0, 1)
            show("pack-layer", 0, 3)
            show("pack-layer", 1, 3)
        now[0] = 10.0
        (experts / "layer_001.bin").write_bytes(b"x" * 2_000_000)
        for show in (p, q):
            show("pack-layer", 2, 3)
        assert q.line() == "packed 2/3 layers, 2.00 MB written, 200.00 KB/s, ETA 10s, 10s"
    assert log.getvalue().splitlines() == [
        "resuming: 1 of 3 layers were kept in " + str(tmp_path / ".b.partial") + " by an earlier run",
        "layer 1 of 3 packed: 1.00 KB written",
        "layer 2 of 3 packed: 2.00 MB written, 200.00 KB/s, ETA 10s"]
    assert "\n" not in screen.getvalue().split("by an earlier run\n")[1], "one line, redrawn"
    assert screen.getvalue().endswith("\r\x1b[K"), "cleared when done"
    assert p.interrupted() == f"interrupted: 1 of 3 layers kept in {tmp_path / '.b.partial'}; run the same command again to resume"
    assert [fmt_duration(s) for s in (7, 125, 3720)] == ["7s", "2m05s", "1h02m"]


def test_a_second_ctrl_c_exits_at_once():
    """The first Ctrl-C's work (telling a server, stopping one) may take a moment; a second ends it."""
    code = ("import time, sys\nfrom moestream.commands.prepare import interrupts\n"
            "with interrupts(lambda: time.sleep(60)):\n    print('ready', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.monotonic() - start < 2


@pytest.mark.slow  # over 3 s here: the fast suite leaves it to CI
def test_plain_prepare_in_a_terminal_then_piped(tmp_path, synth_dir):
    """In a terminal: the redrawn line, then the summary and what to run next. Into a pipe whose reader
    is gone: the bundle is still made, and the command ends quietly (141, as a shell reports SIGPIPE)."""
    env = _env(tmp_path)
    code, text, _, _ = _in_terminal([*CLI, "prepare", str(synth_dir("qwen3_moe")), "--out", str(tmp_path / "b"),
                                     "--engine", "plain"], env, timeout=120)
    assert code == 0, text
    assert "\rpacked 3/3 layers" in text and "layer 1 of 3 packed" not in text
    lines = _lines(text)
    assert lines[0].startswith(f"bundle ready: {tmp_path / 'b'} (") and "experts" in lines[0], lines
    assert "3 MoE layers x 16 experts, top-4" in lines[1] and "4-bit (group size 64)" in lines[2]
    assert re.fullmatch(rf"  moestream generate {tmp_path / 'b'} --prompt \"Hello\" --memory-budget [0-9.]+[KMG]B",
                        lines[-2]), lines
    assert lines[-1] == f"  moestream inspect {tmp_path / 'b'}"

    read, write = os.pipe()
    os.close(read)  # `| head` that has already gone
    proc = subprocess.run([*CLI, "prepare", str(synth_dir("qwen3_moe")), "--out", str(tmp_path / "c"), "--engine",
                           "plain"], stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"layer {n} of 3 packed" + ln[len(f"layer {n} of 3 packed"):]
                                        for n, ln in enumerate(proc.stderr.splitlines(), 1)]
    assert (tmp_path / "c" / "bundle.json").is_file()


# argparse drops the help it cannot write and exits 0; any other output that cannot be written: 141
@pytest.mark.parametrize("argv, codes", [(["--help"], (0, 141)), (["prepare", "--help"], (0, 141)),
                                         (["inspect", "BUNDLE"], (141,))])
def test_output_into_a_reader_that_went_away_is_quiet(argv, codes, bundle_dir):
    argv = [str(bundle_dir("qwen3_moe")) if a == "BUNDLE" else a for a in argv]
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([*CLI, *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode in codes and proc.stderr == ""


def test_json_summary(tmp_path, synth_dir):
    proc = subprocess.run([*CLI, "prepare", str(synth_dir("qwen3_moe")), "--out", str(tmp_path / "b"), "--engine",
                           "plain", "--json"], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["bundle"] == str(tmp_path / "b") and summary["expert_bytes"] > 0 and summary["peak_disk_bytes"] > 0


# ----------------------------------------------------------------------------- Prefect, Ctrl-C (slow)


@pytest.mark.slow
def test_prefect_default_run_shows_progress_and_summary_only(tmp_path, synth_dir):
    """A new user's first run in a terminal: no Prefect log line, telemetry notice or docs link."""
    code, text, _, _ = _in_terminal([*CLI, "prepare", str(synth_dir("qwen3_moe")), "--out", str(tmp_path / "b")],
                                    _env(tmp_path))
    assert code == 0, text
    lines = _lines(text)
    print(f"{len(lines)} lines on the terminal:", *lines, sep="\n")
    assert lines[0].startswith("bundle ready:") and len(lines) == 8, lines
    assert not re.search(r"INFO|prefect\.io|telemetry|Task run|Flow run", text), text
    assert "\rstarting Prefect's server" in text and "\rpacked 3/3 layers" in text


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["prefect", "plain"])
def test_a_source_that_cannot_work_is_one_line_at_once(tmp_path, engine):
    """A mistyped path and a dense model: the same line with either engine, before Prefect's server starts."""
    for source, says in ((tmp_path / "nope", "no such local folder"), (_dense(tmp_path / "dense"), "no routed experts")):
        start = time.monotonic()
        proc = subprocess.run([*CLI, "prepare", str(source), "--out", str(tmp_path / "b"), "--engine", engine],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=120)
        took = time.monotonic() - start
        print(f"{engine} {source.name}: {took:.1f} s")
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and says in proc.stderr, proc.stderr
        assert took < 15  # no retries, no server start (the machine is shared: a generous bound)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["prefect", "plain"])
def test_ctrl_c_ends_at_once_keeps_layers_and_a_rerun_resumes(tmp_path, small, engine):
    env = _env(tmp_path)
    out = tmp_path / "b"
    argv = [*CLI, "prepare", str(small), "--out", str(out), "--engine", engine]
    code, text, after, took = _in_terminal(argv, env, interrupt_on=r"packed 1/6")
    print(f"{engine}: exited {took:.2f} s after Ctrl-C")
    assert code == 130, text
    said = _lines(after)  # the progress line is cleared: what stays is what was said after Ctrl-C
    assert len(said) == 1 and re.fullmatch(
        rf"interrupted: [1-6] of 6 layers kept in {re.escape(str(tmp_path / '.b.partial'))}; "
        "run the same command again to resume", said[0]), after
    assert "Traceback" not in text and "Error" not in text
    assert took < 15  # about 0.5 s here; a generous bound on a shared machine
    assert not out.exists()

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.startswith("resuming: ") and again.stdout.startswith("bundle ready:"), again.stderr
    assert subprocess.run([*CLI, "verify", str(out)], capture_output=True, timeout=300).returncode == 0


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server the user runs (in its own session: Ctrl-C in the terminal does not reach it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys, time\nfrom prefect.server.api.server import SubprocessASGIServer\n"
            f"SubprocessASGIServer({port}).start()\nprint('up', flush=True)\ntime.sleep(900)\n")
    env = {**_env(tmp_path), "PREFECT_HOME": str(tmp_path / "server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "up\n"
        yield f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_with_a_prefect_server_runs_and_logs_reach_it_and_ctrl_c_cancels(tmp_path, small, prefect_server):
    import httpx

    def runs():
        flow_runs = httpx.post(f"{prefect_server}/flow_runs/filter", json={"sort": "START_TIME_ASC"}).json()
        logs = [httpx.post(f"{prefect_server}/logs/filter", json={"logs": {"flow_run_id": {"any_": [r["id"]]}}}).json()
                for r in flow_runs]
        return [(r["state"]["type"], len(n)) for r, n in zip(flow_runs, logs, strict=True)]

    env = {**_env(tmp_path), "PREFECT_API_URL": prefect_server}
    argv = [*CLI, "prepare", str(small), "--out", str(tmp_path / "b")]
    code, text, after, took = _in_terminal(argv, env, interrupt_on=r"packed 1/6")
    print(f"exited {took:.2f} s after Ctrl-C")
    assert code == 130 and len(_lines(after)) == 1 and took < 15, after
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "INFO" not in again.stderr, again.stderr
    (cancelled, logs_before), (completed, logs) = runs()
    assert (cancelled, completed) == ("CANCELLED", "COMPLETED") and logs_before > 0 and logs > 0
