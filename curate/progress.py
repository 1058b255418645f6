"""Progress of one phase: a live bar in a terminal, plain lines every few seconds when piped.

In a terminal: ``phase k/n [stages]``, a bar, shards done of total, samples and tokens per second,
elapsed time and an ETA (from shards done so far). When stderr is a file or a pipe (CI logs, ``nohup``,
``| tee``), a live bar would print nothing until the end, so a line is printed when the phase starts,
every ``interval`` seconds while it runs, and when it ends.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class PhaseProgress:
    """Counts shards, samples and tokens of one phase and shows them; ``rows`` is thread-safe."""

    def __init__(self, console: Console, title: str, total: int, enabled: bool = True, interval: float = 5.0):
        self.console, self.title, self.total = console, title, total
        self.enabled, self.interval = enabled, interval
        self.done = 0
        self.samples = 0
        self.tokens = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._bar: Progress | None = None
        self._task = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ------------------------------------------------------------------ callbacks
    def rows(self, rows: int, tokens: int = 0) -> None:
        with self._lock:
            self.samples += rows
            self.tokens += tokens
        self._refresh()

    def shard_done(self) -> None:
        with self._lock:
            self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        self._refresh()

    # ------------------------------------------------------------------ display
    def _rates(self) -> str:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        text = f"{self.samples:,} samples · {self.samples / dt:,.0f}/s"
        if self.tokens:
            text += f" · {self.tokens / dt:,.0f} tok/s"
        return text

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, rates=self._rates())

    def line(self, final: bool = False) -> str:
        elapsed = time.perf_counter() - self._t0
        eta = ""
        if not final and 0 < self.done < self.total:
            eta = f", ETA {_clock(elapsed / self.done * (self.total - self.done))}"
        state = "done" if final else "running"
        return (f"{self.title}: {self.done}/{self.total} shards, {self._rates()}, "
                f"{_clock(elapsed)} elapsed{eta} ({state})")

    def __enter__(self) -> PhaseProgress:
        if not self.enabled:
            return self
        if self.console.is_terminal:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                       TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn()]
            self._bar = Progress(*columns, console=self.console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(escape(self.title), total=self.total, rates="")
        else:
            self.console.print(escape(f"{self.title}: {self.total} shard(s) to run"), highlight=False)
            self._ticker = threading.Thread(target=self._tick, name="curate-progress", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.console.print(escape(self.line()), highlight=False)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self.console.print(escape(self.line(final=True)), highlight=False)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
