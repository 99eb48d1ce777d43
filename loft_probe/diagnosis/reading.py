"""What the diagnosis reads from a run: each layer's late value of a metric, the loss curve, the last snapshot.

The late value of a metric follows the one rule of :mod:`loft_probe.run.series` (the median over the last
third of the recorded steps), shared with the run table and the report and comparison summaries.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from loft_probe.run import RUN_LAYER, Run
from loft_probe.run.series import late_value


def drop_share(first: float, since: float, last: float) -> float:
    """The share of a curve's whole drop, ``first → last``, that came after the point where it stood at ``since``:
    (since − last)/(first − last); NaN when the curve did not drop."""
    return (since - last) / (first - last) if first > last else math.nan


class LayerValues:
    """Per-layer late values of the run's metrics, in meta.json's layer order (layers without the metric are
    absent from the Series)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        rows = run.metrics[run.metrics["layer"] != RUN_LAYER]
        self._rows = rows[np.isfinite(rows["value"].to_numpy(dtype="float64"))]
        self.order = [str(layer["name"]) for layer in run.meta["layers"]]
        self._cache: dict[str, pd.Series] = {}

    def has(self, metric: str) -> bool:
        return bool((self._rows["metric"] == metric).any())

    def late(self, metric: str) -> pd.Series:
        if metric not in self._cache:
            rows = self._rows[self._rows["metric"] == metric]
            values = {str(layer): late_value(group) for layer, group in rows.groupby("layer", sort=False)}
            self._cache[metric] = in_order(pd.Series(values, dtype="float64"), self.order)
        return self._cache[metric]

    def over_run(self, metric: str) -> pd.Series:
        """Each layer's median over every recorded step: for a quantity whose effect builds up along the way
        (the direction of the steps taken), not only where the run ended."""
        rows = self._rows[self._rows["metric"] == metric]
        medians = rows.groupby("layer", sort=False)["value"].median()
        return in_order(pd.Series(medians.to_numpy(dtype="float64"), index=medians.index.astype(str)), self.order)

    def last(self, metric: str) -> pd.Series:
        """Each layer's value at the last step it recorded the metric (cumulative metrics: the run's end)."""
        rows = self._rows[self._rows["metric"] == metric].sort_values("step")
        last = rows.groupby("layer", sort=False)["value"].last()
        return in_order(pd.Series(last.to_numpy(dtype="float64"), index=last.index.astype(str)), self.order)

    def adapter_layers(self) -> list[str]:
        return [str(layer["name"]) for layer in self.run.meta["layers"] if layer.get("kind") == "lora"]


def in_order(values: pd.Series, order: list[str]) -> pd.Series:
    """The layers in the meta table's order first, any others after."""
    known = [name for name in order if name in values.index]
    return values[known + [name for name in values.index if name not in known]]


def last_snapshot(run: Run, metric: str) -> tuple[int, pd.Series]:
    """(step, value per layer) of a snapshot metric at its last recorded step; (0, empty) when never recorded."""
    rows = run.rows(metric)
    rows = rows[rows["layer"] != RUN_LAYER]
    if not len(rows):
        return 0, pd.Series(dtype="float64")
    step = int(rows["step"].max())
    last = rows[rows["step"] == step]
    values = pd.Series(last["value"].to_numpy(dtype="float64"), index=last["layer"].astype(str).to_numpy())
    return step, in_order(values, [str(layer["name"]) for layer in run.meta["layers"]])


def run_series(run: Run, metric: str) -> pd.Series:
    """A run-level metric (loss, eval_loss, lr) as a Series indexed by step, sorted."""
    rows = run.rows(metric, [RUN_LAYER]).sort_values("step")
    return pd.Series(rows["value"].to_numpy(dtype="float64"), index=rows["step"].to_numpy())


def ranks(run: Run) -> dict[str, int]:
    return {str(layer["name"]): int(layer["rank"]) for layer in run.meta["layers"]
            if isinstance(layer.get("rank"), int) and layer["rank"] > 0}


def is_adapter(run: Run) -> bool:
    return any(layer.get("kind") == "lora" for layer in run.meta["layers"])
