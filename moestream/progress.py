"""What `moestream prepare` shows while it works, whichever engine runs the steps.

`PrepareProgress` is the preparation's progress callback, `progress(step, done, total)` (done is 0
when a step starts, then counts its finished items), and its display on stderr: on a terminal one
line redrawn in place (the phase, or layers done of all, bytes written, rate, ETA; elapsed time),
elsewhere a line per packed layer, so that logs stay readable. Bytes are measured in the staging
folder itself, so they count what every engine (threads, Dask workers) really wrote, and the layers
an interrupted run kept are counted the way a rerun finds them.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

from .common.files import tree_bytes
from .common.units import fmt_bytes

# step -> what the display says while it runs (any other step is shown by its name)
PHASES = {
    "start": "starting",
    "plan": "reading the source checkpoint",
    "start-server": "starting Prefect's server",
    "fetch-shards": "downloading the source's shards",
    "plan-bits": "measuring each expert's bits",
    "profile": "profiling expert co-activation",
    "profile-shard": "profiling expert co-activation",
    "profile-merge": "merging the profiles",
    "profile-copy": "copying the profile",
    "order-experts": "ordering experts",
    "resident-source": "downloading the resident weights",
    "write": "writing the resident weights",
    "verify": "verifying every checksum",
}
LAYERS = "pack-layer"


def fmt_duration(seconds: float) -> str:
    """"7s", "2m05s", "1h02m"."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def staging_of(out: str | Path) -> Path:
    """Where the bundle at `out` is assembled (as the user wrote `out`: relative stays relative)."""
    from .stages.write import staging_dir

    return staging_dir(Path(out))


def kept_layers(staging: Path) -> int:
    """Finished layers in a staging folder: a layer file with its resume record beside it."""
    from .stages.pack import is_sidecar

    if not staging.is_dir():
        return 0
    records = (p.relative_to(staging).as_posix() for p in staging.rglob("*.json"))
    return sum(1 for rel in records if is_sidecar(rel) and (staging / rel.removesuffix(".json")).is_file())


class PrepareProgress:
    """progress(step, done, total) for a preparation into `out`, shown on `stream`. Use it as a
    context manager: on a terminal a thread redraws the line every `tick` seconds (elapsed time
    and ETA move while a long layer runs); leaving clears the line."""

    def __init__(self, out: str | Path, stream=None, tty: bool | None = None, tick: float = 1.0, clock=time.monotonic):
        self.out, self.staging = Path(out), staging_of(out)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.tick, self.clock = tick, clock
        self.started = clock()
        self.step, self.done, self.total = "start", 0, 0
        self.layers = 0  # MoE layers of the model, once packing starts
        self.pack_start = None  # (time, layers kept by an earlier run, bytes in staging) when packing started
        self._lock = threading.RLock()  # the ticker thread and the caller draw; a signal handler may re-enter
        self._stop = threading.Event()

    def __enter__(self):
        if self.tty:
            threading.Thread(target=self._tick, name="moestream-progress", daemon=True).start()
        self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self.tty and not self._stop.is_set():
                self._write("\r\x1b[K")
            self._stop.set()

    def __call__(self, step: str, done: int, total: int) -> None:
        with self._lock:
            self.step, self.done, self.total = step, done, total
            if step == LAYERS:
                self._layer(done, total)
            self._draw()

    def _layer(self, done: int, total: int) -> None:
        self.layers = total
        if self.pack_start is None:  # done == 0, or an executor that reports finished items only
            kept = kept_layers(self.staging)
            self.pack_start = (self.clock(), kept, tree_bytes(self.staging))
            if kept:
                self.say(f"resuming: {kept} of {total} layers were kept in {self.staging} by an earlier run")
        if done and not self.tty:
            self._write(f"layer {done} of {total} packed: {self._layer_figures()}\n")

    def say(self, line: str) -> None:
        """A line that stays, above the redrawn one."""
        with self._lock:
            self._write(("\r\x1b[K" if self.tty else "") + line + "\n")
            self._draw()

    def line(self) -> str:
        """The one line shown on a terminal now."""
        if self.step == LAYERS:
            text = f"packed {self.done}/{self.total} layers, {self._layer_figures()}"
        elif self.finished:
            text = "finishing"
        else:
            text = PHASES.get(self.step, self.step)
        return f"{text}, {fmt_duration(self.clock() - self.started)}"

    def _layer_figures(self) -> str:
        """Bytes written, the rate since packing started, and the time left at that pace."""
        now = self.clock()
        start, kept, start_bytes = self.pack_start
        written = tree_bytes(self.staging)
        parts = [f"{fmt_bytes(written)} written"]
        elapsed = now - start
        if elapsed >= 0.5 and written > start_bytes:
            parts.append(f"{fmt_bytes((written - start_bytes) / elapsed)}/s")
        fresh = self.done - kept  # layers kept by an earlier run finish at once: they say nothing about pace
        if fresh > 0 and self.done < self.total:
            parts.append(f"ETA {fmt_duration((self.total - self.done) * elapsed / fresh)}")
        return ", ".join(parts)

    @property
    def finished(self) -> bool:
        """The bundle is verified and in place (what is left: the engine's own shutdown)."""
        return self.step == "verify" and self.done == self.total

    def interrupted(self) -> str:
        """The one line that says what an interruption kept and how to go on."""
        self.close()
        if self.finished:
            return f"interrupted while finishing: the bundle in {self.out} is complete"
        kept = kept_layers(self.staging)
        if self.layers:
            return (f"interrupted: {kept} of {self.layers} layers kept in {self.staging}; "
                    "run the same command again to resume")
        if kept:
            return f"interrupted: {kept} layers kept in {self.staging}; run the same command again to resume"
        return "interrupted before any layer was packed; nothing to resume"

    def _tick(self) -> None:
        while not self._stop.wait(self.tick):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            if self.tty and not self._stop.is_set():
                width = shutil.get_terminal_size((80, 24)).columns - 1  # a wrapped line cannot be redrawn in place
                self._write(f"\r{self.line()[:width]}\x1b[K")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the preparation
            pass
