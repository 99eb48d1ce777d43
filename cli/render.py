"""Terminal rendering for the commands: a progress bar per training run and rich tables of DataFrames.

Presentation only: the numbers come from the library (`loft_probe.summary`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


@contextmanager
def progress_bar(label: str, steps: int | None) -> Iterator[Callable[[int, float], None]]:
    """A bar on stderr for one run of `steps` optimizer steps (None: unknown, the task's default); yields the
    runner's ``on_step(step, loss)``. The bar appears at the first step, so that an error in the
    configuration or while building the task is not preceded by an empty bar."""
    columns = (TextColumn("{task.description:<6}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=Console(stderr=True))
    task = bar.add_task(label, total=steps, loss="-")

    def on_step(step: int, loss: float) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=step, loss=f"{loss:.4f}")

    try:
        yield on_step
    finally:
        bar.stop()


def table(frame: pd.DataFrame, title: str | None = None) -> Table:
    """A rich Table of a DataFrame's rows: floats to 4 significant digits, NaN as an empty cell."""
    out = Table(title=title, title_justify="left")
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        out.add_column(str(column), justify="right" if numeric else "left")
    for row in frame.itertuples(index=False):
        out.add_row(*(_cell(value) for value in row))
    return out


def _cell(value: object) -> Text:
    """A cell as plain Text: a layer or run name with brackets must not be read as rich markup."""
    if isinstance(value, float):
        return Text("" if math.isnan(value) else f"{value:.4g}")
    return Text(escape_controls(str(value)))


# C0 and C1 control characters but newline and tab, DEL, and the bidirectional overrides that reorder a line.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    r"""Text safe for a terminal: a control character from a run directory (a layer named "\x1b[2J" would clear
    the screen) is shown as its escape, ``\u001b``, which is also a valid JSON string escape."""
    return _CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
