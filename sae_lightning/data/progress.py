"""Progress of a long harvest: a live bar on a terminal, a line every N seconds otherwise.

Written to a file or a pipe, a rich progress bar shows nothing until it ends; a harvest of a
large model can run for many minutes, so there a background timer prints a plain line
(contexts, tokens, tokens/s) at a fixed interval instead.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


class HarvestProgress:
    """Counts contexts and tokens as they are harvested (or found already on disk).

    Args:
        console: where progress goes.
        total: contexts to cover.
        context_length: tokens per context.
        interval: seconds between two lines when ``console`` is not a terminal.
    """

    def __init__(self, console: Console, total: int, context_length: int, interval: float) -> None:
        self.console = console
        self.total = total
        self.context_length = context_length
        self.interval = interval
        self.done = 0
        self.harvested = 0
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._bar: Progress | None = None
        self._task = 0

    def __enter__(self) -> HarvestProgress:
        self._start = time.perf_counter()
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("harvesting"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} contexts"),
                TextColumn("{task.fields[tokens]:,} tokens"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("harvesting", total=self.total, tokens=0)
        else:
            self._timer = threading.Thread(target=self._tick, name="cache-progress", daemon=True)
            self._timer.start()
        return self

    def advance(self, contexts: int, *, harvested: bool) -> None:
        """``contexts`` more are done (run through the LM when ``harvested``, else on disk)."""
        self.done += contexts
        if harvested:
            self.harvested += contexts
        if self._bar is not None:
            tokens = self.done * self.context_length
            self._bar.update(self._task, advance=contexts, tokens=tokens)

    def harvest_seconds(self) -> float:
        """Seconds since the harvest started."""
        return time.perf_counter() - self._start

    def line(self) -> str:
        """The plain progress line."""
        seconds = self.harvest_seconds()
        rate = self.harvested * self.context_length / max(seconds, 1e-9)
        return (
            f"harvesting: {self.done:,}/{self.total:,} contexts, "
            f"{self.done * self.context_length:,} tokens, {rate:,.0f} tokens/s, {seconds:.0f} s"
        )

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.console.print(self.line(), soft_wrap=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
            self.console.print(self.line(), soft_wrap=True)
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)
