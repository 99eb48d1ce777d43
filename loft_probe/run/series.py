"""The one rule for summarizing a metric of a run, used by the run table (``loft-probe run``), the report's
and the study's tables, the comparison table and the diagnosis.

A per-step metric (the loss, cosines, errors) is summarized by its late value: the median over the last third
of the steps it was recorded at — late enough that the optimizer's moments have warmed up, a median so that one
noisy minibatch does not decide. An end-state metric (an evaluation, a cumulative change, a snapshot's
spectrum: :data:`~loft_probe.run.vocabulary.END_STATE`) is summarized by its value at the last step. Over
layers, the summary is the median of the layers' values. Only finite values count: NaN/Inf are findings of their
own (divergence), and undefined values are missing rows already.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loft_probe.run.vocabulary import END_STATE

if TYPE_CHECKING:
    from loft_probe.run.reader import Run


def late_slice(steps: np.ndarray) -> np.ndarray:
    """A boolean mask over ``steps`` (n,) selecting the last third of the distinct steps (at least one step)."""
    unique = np.unique(steps)
    if not len(unique):
        return np.zeros(len(steps), dtype=bool)
    first = unique[len(unique) - math.ceil(len(unique) / 3)]
    return steps >= first


def late_value(rows: pd.DataFrame) -> float:
    """The late value of one series of rows (columns step, value): the median of its finite values over the last
    third of its steps; NaN when it has none."""
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype="float64"))]
    if not len(rows):
        return math.nan
    steps = rows["step"].to_numpy()
    return float(rows.loc[late_slice(steps), "value"].median())


def layer_values(rows: pd.DataFrame, end_state: bool) -> pd.Series:
    """One summary value per layer (index: layer, in order of appearance) of one metric's rows (step, layer,
    value): each layer's late value for a per-step metric, its value at the rows' last step for an end-state
    one (:data:`~loft_probe.run.vocabulary.END_STATE`: evaluations, cumulative and snapshot metrics). Layers
    without a finite value are NaN."""
    if not len(rows):
        return pd.Series(dtype="float64")
    if end_state:
        last = rows[rows["step"] == rows["step"].max()]
        values = {str(layer): float(group["value"].median()) for layer, group in last.groupby("layer", sort=False)}
    else:
        values = {str(layer): late_value(group) for layer, group in rows.groupby("layer", sort=False)}
    return pd.Series(values, dtype="float64")


def summary_value(rows: pd.DataFrame, end_state: bool) -> float:
    """The one number that summarizes a metric's rows (step, layer, value): the median over layers of
    :func:`layer_values`; NaN when no layer has a finite value. A run-level metric (the loss) has one layer:
    its summary is its late value."""
    return float(layer_values(rows, end_state).median())


def run_summary(run: Run, metric: str) -> float:
    """The summary of a recorded metric of a :class:`~loft_probe.run.Run` (every layer), by the metric's kind."""
    return summary_value(run.rows(metric), metric in END_STATE)
