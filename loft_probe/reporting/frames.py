"""The report's inputs as tidy frames, read from runs and from `compare`; nothing here computes a metric.

Every frame labels a run by its name in ``run`` and by its meta method in ``method``, as `compare` does,
so that one run keeps one label (and one colour) in every figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from loft_probe.comparison import (
    IncompatibleRunsError,
    RunSelectionError,
    compare,
    phi_grid,
)
from loft_probe.run import Run, RunDirError

PHI_SIZE = 16  # singular vectors per side of a φ grid: the top ones, where the subspaces matter


def run_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """Every run's recorded metrics in one frame: (step, layer, run, method, metric, value)."""
    pieces = [run.metrics.assign(run=run.name, method=run.method) for run in runs]
    frame = pd.concat(pieces, ignore_index=True)[["step", "layer", "run", "method", "metric", "value"]]
    # Plain object columns: seaborn groups and orders them like any label, whatever pandas' string dtype.
    return frame.astype({"layer": object, "run": object, "method": object, "metric": object})


def comparison(runs: Sequence[Run], reference: str | None = None) -> tuple[pd.DataFrame | None, str]:
    """`compare`'s frame of the runs, or None and the reason when they cannot be compared.

    Runs without a single full fine-tuning run, incompatible runs and unreadable snapshots leave the
    report without its comparison figures rather than without a report.
    """
    try:
        frame = compare(runs, reference=reference)
    except (RunSelectionError, IncompatibleRunsError, RunDirError) as exc:
        return None, f"no comparison with a reference run: {exc}"
    frame = frame.astype({"layer": object, "run": object, "method": object, "reference": object,
                          "metric": object})
    return frame, ""


def last_common_step(frame: pd.DataFrame, metric: str = "angle_left_max") -> int | None:
    """The last step at which every compared run has `metric`; else the last step any has; None if none."""
    rows = frame[frame["metric"] == metric]
    if rows.empty:
        return None
    common = set.intersection(*(set(group["step"]) for _, group in rows.groupby("run", sort=False)))
    return int(max(common or rows["step"]))


def worst_layer(frame: pd.DataFrame, step: int, metric: str = "angle_left_max") -> str:
    """The layer with the largest `metric` over the compared runs at `step` (ties: the first in frame order)."""
    rows = frame[(frame["metric"] == metric) & (frame["step"] == step)]
    return str(rows.at[rows["value"].idxmax(), "layer"])


def phi_frame(runs: Sequence[Run], ref: Run, step: int, layer: str) -> tuple[pd.DataFrame, list[str]]:
    """Long-form φ grids (run, i, j, value) of each run against `ref` at one layer and step.

    i and j count the run's and the reference's top singular vectors from 1, up to PHI_SIZE. A run without
    that snapshot or layer, or with a zero ΔW there, is left out; the second item says which and why.
    """
    pieces, skipped = [], []
    for run in runs:
        if run is ref:
            continue
        try:
            grid = phi_grid(run, ref, step, layer, side="left", size=PHI_SIZE)  # (i, j)
        except ValueError as exc:  # RunDirError included: no such snapshot or layer
            skipped.append(f"{run.name}: {exc}")
            continue
        i, j = grid.shape
        pieces.append(pd.DataFrame({"run": run.name, "i": [a + 1 for a in range(i) for _ in range(j)],
                                    "j": [b + 1 for _ in range(i) for b in range(j)],
                                    "value": grid.reshape(-1).tolist()}))
    columns = ["run", "i", "j", "value"]
    return (pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=columns)), skipped
