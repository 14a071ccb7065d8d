"""The one progress-bar factory: count, rate and ETA first, the description last and truncated, so a bar
stays readable at 80 columns."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second (rich only ships a bytes-per-second column)."""

    def __init__(self, unit: str) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"  -- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:5.1f} {self.unit}/s" if speed < 100 else f"{speed:5.0f} {self.unit}/s",
                    style="progress.data.speed")


def progress_bar(label: str, *, unit: str = "it", transient: bool = False, disable: bool = False,
                 console: Console | None = None) -> Progress:
    """`label ━━━━━━ 12/100 3.4 it/s 0:00:26 info…`. Add a task with `bar.add_task("", total=N, info="")`
    and pass `info=` to `bar.update` for the trailing text (cut with an ellipsis when the line is full)."""
    return Progress(
        TextColumn(f"[bold]{label}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        transient=transient, disable=disable, console=console, expand=True,
    )
