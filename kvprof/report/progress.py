"""A progress bar on stderr for the passes that take a while: shown once a pass has run
for about a second, and only when stderr is a terminal (CI logs and pipes stay clean).
rich is imported only when the bar appears."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

SHOW_AFTER_S = 1.0


class PassProgress:
    """Called with the number of events each chunk held; ``total``: the events expected
    (None: unknown, the bar then counts without an end)."""

    def __init__(self, what: str, total: int | None = None, stream=None):
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = time.monotonic()
        self.bar: Any = None  # a rich Progress (rich is imported when the bar shows)
        self.task = None
        try:
            self.enabled = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        except (AttributeError, ValueError):
            self.enabled = False

    def set_total(self, total: int | None) -> None:
        self.total = total or None

    def __call__(self, events: int) -> None:
        self.done += events
        if not self.enabled:
            return
        if self.bar is None:
            if time.monotonic() - self.t0 < SHOW_AFTER_S:
                return
            self._start()
        self.bar.update(self.task, completed=self.done if self.total is None else min(self.done, self.total))

    def _start(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from kvprof.report.format import console as make_console

        console = make_console(file=self.stream, stderr=True)
        cols = [
            TextColumn("kvprof: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
        ]
        if self.total:
            cols.append(TimeRemainingColumn())
        self.bar = Progress(*cols, console=console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.what, total=self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
