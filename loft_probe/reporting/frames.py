"""The report's inputs as tidy frames, read from runs and from `compare`; nothing here computes a metric.

Every frame labels a run by its name in ``method`` and by its meta method in ``kind``, as `compare` does,
so that one run keeps one label (and one colour) in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from loft_probe.comparison import (
    COMPARE_METRICS,
    IncompatibleRunsError,
    RunSelectionError,
    compare,
    phi_grid,
)
from loft_probe.probe.rundir import METRICS, RUN_LAYER, Run, RunDirError

PHI_SIZE = 16  # singular vectors per side of a φ grid: the top ones, where the subspaces matter
SHADOW_TAIL = 3  # recorded steps the summary's shadow_update_cosine takes its median over (the last ones)

# The summary table's columns and what each holds; the page prints these as the table's legend.
SUMMARY_COLUMNS = {
    "run": "the run's name",
    "method": "its meta method (full, lora, loft, other)",
    "rank": "adapter rank from its meta, else from its LoRA layers (4–16 when they differ; none for full "
            "fine-tuning)",
    "steps": "last recorded step",
    "loss": f"last recorded {METRICS['loss']}",
    "eval_loss": f"last recorded {METRICS['eval_loss']}",
    "eval_accuracy": f"last recorded {METRICS['eval_accuracy']}",
    "angle_left_max_deg": "median over layers, at the last snapshot shared with the reference, of the "
                          f"{COMPARE_METRICS['angle_left_max'].replace(' (rad)', '')}, in degrees",
    "delta_cosine": f"median over layers, at that snapshot, of {COMPARE_METRICS['delta_cosine']}",
    "shadow_update_cosine": f"median over layers and the last {SHADOW_TAIL} recorded steps of "
                            f"{METRICS['shadow_update_cosine']}",
    "intruders": f"median over layers, at the run's last snapshot, of the {METRICS['intruders']}",
}


def run_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """Every run's recorded metrics in one frame: (step, layer, method, kind, metric, value)."""
    pieces = [run.metrics.assign(method=run.name, kind=run.method) for run in runs]
    frame = pd.concat(pieces, ignore_index=True)[["step", "layer", "method", "kind", "metric", "value"]]
    # Plain object columns: seaborn groups and orders them like any label, whatever pandas' string dtype.
    return frame.astype({"layer": object, "method": object, "kind": object, "metric": object})


def comparison(runs: Sequence[Run], reference: str | None = None) -> tuple[pd.DataFrame | None, str]:
    """`compare`'s frame of the runs, or None and the reason when they cannot be compared.

    Runs without a single full fine-tuning run, incompatible runs and unreadable snapshots leave the
    report without its comparison figures rather than without a report.
    """
    try:
        frame = compare(runs, reference=reference)
    except (RunSelectionError, IncompatibleRunsError, RunDirError) as exc:
        return None, f"no comparison with a reference run: {exc}"
    frame = frame.astype({"layer": object, "method": object, "kind": object, "reference": object,
                          "metric": object})
    return frame, ""


def last_common_step(frame: pd.DataFrame, metric: str = "angle_left_max") -> int | None:
    """The last step at which every compared run has `metric`; else the last step any has; None if none."""
    rows = frame[frame["metric"] == metric]
    if rows.empty:
        return None
    common = set.intersection(*(set(group["step"]) for _, group in rows.groupby("method", sort=False)))
    return int(max(common or rows["step"]))


def worst_layer(frame: pd.DataFrame, step: int, metric: str = "angle_left_max") -> str:
    """The layer with the largest `metric` over the compared runs at `step` (ties: the first in frame order)."""
    rows = frame[(frame["metric"] == metric) & (frame["step"] == step)]
    return str(rows.at[rows["value"].idxmax(), "layer"])


def phi_frame(runs: Sequence[Run], ref: Run, step: int, layer: str) -> tuple[pd.DataFrame, list[str]]:
    """Long-form φ grids (method, i, j, value) of each run against `ref` at one layer and step.

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
        pieces.append(pd.DataFrame({"method": run.name, "i": [a + 1 for a in range(i) for _ in range(j)],
                                    "j": [b + 1 for _ in range(i) for b in range(j)],
                                    "value": grid.reshape(-1).tolist()}))
    columns = ["method", "i", "j", "value"]
    return (pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=columns)), skipped


def _final_median(rows: pd.DataFrame) -> float:
    """Median of the values at the rows' last step (over layers); NaN when there are none."""
    return float(rows.loc[rows["step"] == rows["step"].max(), "value"].median()) if len(rows) else math.nan


def _compared(frame: pd.DataFrame | None, run: Run, metric: str) -> pd.DataFrame:
    """The run's rows of a `compare` metric against the reference (none for the reference itself)."""
    if frame is None:
        return pd.DataFrame(columns=["step", "value"])
    return frame[(frame["method"] == run.name) & (frame["reference"] != run.name) & (frame["metric"] == metric)]


def adapter_rank(meta: dict) -> int | str | None:
    """A run's adapter rank: meta's ``rank`` (set by the built-in runner), else the ranks of its layer table's
    LoRA layers (a run probed through ``attach`` records only those): the rank when all agree, ``"lo–hi"``
    when they differ (a summary cell, not a number to compute with); None without LoRA layers."""
    if meta.get("rank") is not None:
        return meta["rank"]
    ranks = {layer["rank"] for layer in meta.get("layers", []) if layer.get("kind") == "lora"}
    if not ranks:
        return None
    low, high = min(ranks), max(ranks)
    return low if low == high else f"{low}–{high}"


def summary_table(runs: Sequence[Run], frame: pd.DataFrame | None) -> pd.DataFrame:
    """One row per run with the columns of `SUMMARY_COLUMNS`, read from its metrics and `compare`'s frame.

    Args:
        runs: the runs, in the order of the rows.
        frame: `compare`'s frame, or None: the comparison columns are then NaN (so are they for the
            reference run itself, which is not compared with itself).

    Values missing from a run (no held-out evaluation, no shadow) are NaN.
    """
    rows = []
    for run in runs:
        shadow = run.rows("shadow_update_cosine")
        tail = sorted(set(shadow["step"]))[-SHADOW_TAIL:]
        rows.append({
            "run": run.name,
            "method": run.method,
            "rank": adapter_rank(run.meta),
            "steps": run.last_step,
            **{name: _final_median(run.rows(name, [RUN_LAYER])) for name in ("loss", "eval_loss", "eval_accuracy")},
            "angle_left_max_deg": math.degrees(_final_median(_compared(frame, run, "angle_left_max"))),
            "delta_cosine": _final_median(_compared(frame, run, "delta_cosine")),
            "shadow_update_cosine": float(shadow.loc[shadow["step"].isin(tail), "value"].median())
            if len(shadow) else math.nan,
            "intruders": _final_median(run.rows("intruders")),
        })
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
