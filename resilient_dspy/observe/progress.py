"""A live progress bar for a batch (``pipeline.map(..., progress=True)``, ``resilient-dspy batch``), drawn with rich.

It shows done/total, the rate, the time left, and how the calls ended: ok (the program answered), failed, retried,
fallback (an alternative answered) and cache hits, counted from each call's own record (its :class:`Outcome`).
It draws only on a terminal: on a pipe or a log file it prints nothing, unless ``always=True``, and then only the
final state, once, as plain text. It never animates where that would garble the output.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Column
from rich.text import Text

from resilient_dspy.core.outcome import BatchCounts

if TYPE_CHECKING:
    from resilient_dspy.core.outcome import Outcome

__all__ = ["ProgressBar"]


class _Rate(ProgressColumn):
    """Calls finished per second, over rich's recent window."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-/s" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


class _Counts(ProgressColumn):
    """How the calls ended so far, read from the bar's counts when the bar is drawn (not on every call)."""

    def __init__(self, bar: ProgressBar) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.bar = bar

    def render(self, task: Task) -> Text:
        counts = self.bar.counts
        text = Text()
        for label, value, style in (
            ("ok", counts.ok, "green"),
            ("failed", counts.failed, "red"),
            ("retried", counts.retried, "yellow"),
            ("fallback", counts.fallback, "magenta"),
            ("cache", counts.cache_hits, "cyan"),
        ):
            if value or label in ("ok", "failed"):  # the rest only once they happen: the line fits 80 columns
                text.append(f" {label} ", style="dim")
                text.append(str(value), style=style if value else "")
        return text


class _Remaining(ProgressColumn):
    """The time left at the current rate, as ``eta 0:01:30``."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        if left is None:
            return Text("eta -:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"eta {hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class ProgressBar:
    """A :class:`~resilient_dspy.core.batch.BatchObserver` that draws the batch on ``console`` (default: stderr).

    ``counts`` (a :class:`BatchCounts`) holds the tally, drawn or not. ``always=True`` draws on a console that is
    not a terminal too: the final state, once, at the end.
    """

    def __init__(self, description: str = "batch", *, console: Console | None = None, always: bool = False) -> None:
        self.description = description
        self.console = console if console is not None else Console(file=sys.stderr)
        self.always = always
        self.counts = BatchCounts()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @property
    def shown(self) -> bool:
        """Whether this bar draws: on a terminal, or anywhere with ``always``."""
        return self.always or self.console.is_terminal

    def start(self, total: int | None) -> None:
        self.counts = BatchCounts(total)
        if not self.shown:
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            _Rate(),
            _Remaining(),
            _Counts(self),
            console=self.console,
            refresh_per_second=4,
        )
        self._task = progress.add_task(self.description, total=total)
        self._progress = progress
        progress.start()

    def add(self, index: int, outcome: Outcome) -> None:
        self.counts.add(outcome)
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def stop(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and self._task is not None:
            if self.counts.total is None:  # a stream of unknown length: its end is its total
                progress.update(self._task, total=self.counts.done)
            progress.stop()
