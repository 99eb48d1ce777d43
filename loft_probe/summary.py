"""Summary tables of runs; each name says what one row is.

- :func:`run_table`: one row per run (:data:`RUN_TABLE_COLUMNS`): the report's summary, the study's results.
- :func:`run_headline`: a run's few numbers, for ``loft-probe run``'s and ``summary``'s one-line tables.
- :func:`comparison_table`: one row per (run, reference, metric) of a :func:`~loft_probe.compare` frame
  (:data:`COMPARISON_TABLE_COLUMNS`): ``loft-probe compare``'s tables.

Every number follows the one summary rule of :mod:`loft_probe.run.series`: a per-step metric's late value, an
end-state metric's value at the last step, the median over layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from loft_probe.comparison import COLUMNS, COMPARE_METRICS, END_STATE, WORSE_IS_HIGHER
from loft_probe.run import METRICS, Run
from loft_probe.run.series import layer_values, run_summary, summary_value

_LATE = "late value (median over the last third of the recorded steps)"
# The run table's columns and what each holds; the report prints these as the table's legend.
RUN_TABLE_COLUMNS = {
    "run": "the run's name",
    "method": "its meta method (full, lora, loft, other)",
    "rank": "adapter rank from its meta, else from its LoRA layers (4–16 when they differ; none for full "
            "fine-tuning)",
    "steps": "last recorded step",
    "loss": f"{_LATE} of the {METRICS['loss']}",
    "eval_loss": f"at the last evaluation: {METRICS['eval_loss']}",
    "eval_accuracy": f"at the last evaluation: {METRICS['eval_accuracy']}",
    "angle_left_max_deg": "median over layers, at the last snapshot shared with the reference, of the "
                          f"{COMPARE_METRICS['angle_left_max'].replace(' (rad)', '')}, in degrees",
    "delta_cosine": f"median over layers, at that snapshot, of {COMPARE_METRICS['delta_cosine']}",
    "shadow_update_cosine": f"median over layers of each layer's {_LATE} of {METRICS['shadow_update_cosine']}",
    "shadow_m_proj_cosine": f"the same of {METRICS['shadow_m_proj_cosine'].replace(', over the same sides', '')}"
                            ": the optimizer's first moment against full fine-tuning's, within the adapter "
                            "(LoRA and LoFT)",
    "intruders": f"median over layers, at the run's last snapshot, of the {METRICS['intruders']}",
}

COMPARISON_TABLE_COLUMNS = ("run", "method", "reference", "metric", "step", "layers", "median", "worst_layer",
                            "worst")


def run_table(runs: Sequence[Run], frame: pd.DataFrame | None) -> pd.DataFrame:
    """One row per run with the columns of `RUN_TABLE_COLUMNS`, read from its metrics and `compare`'s frame.

    Args:
        runs: the runs, in the order of the rows.
        frame: `compare`'s frame, or None: the comparison columns are then NaN (so are they for the
            reference run itself, which is not compared with itself).

    Values missing from a run (no held-out evaluation, no shadow) are NaN.
    """
    rows = []
    for run in runs:
        rows.append({
            "run": run.name,
            "method": run.method,
            "rank": adapter_rank(run.meta),
            "steps": run.last_step,
            **{name: run_summary(run, name) for name in ("loss", "eval_loss", "eval_accuracy")},
            "angle_left_max_deg": math.degrees(_compared(frame, run, "angle_left_max")),
            "delta_cosine": _compared(frame, run, "delta_cosine"),
            "shadow_update_cosine": run_summary(run, "shadow_update_cosine"),
            "shadow_m_proj_cosine": run_summary(run, "shadow_m_proj_cosine"),
            "intruders": run_summary(run, "intruders"),
        })
    return pd.DataFrame(rows, columns=list(RUN_TABLE_COLUMNS))


def run_headline(run: Run) -> dict[str, float | str]:
    """A run's name, method, last step and the run table's loss, eval_loss, eval_accuracy and shadow update
    cosine (as ``update_cosine``), by the same rule; a number the run lacks is left out."""
    out: dict[str, float | str] = {"name": run.name, "method": run.method, "last_step": float(run.last_step)}
    for key, metric in (("loss", "loss"), ("eval_loss", "eval_loss"), ("eval_accuracy", "eval_accuracy"),
                        ("update_cosine", "shadow_update_cosine")):
        value = run_summary(run, metric)
        if math.isfinite(value):
            out[key] = value
    return out


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


def _compared(frame: pd.DataFrame | None, run: Run, metric: str) -> float:
    """The summary of the run's rows of a `compare` metric against the reference (NaN for the reference)."""
    if frame is None:
        return math.nan
    rows = frame[(frame["run"] == run.name) & (frame["reference"] != run.name) & (frame["metric"] == metric)]
    return summary_value(rows, metric in END_STATE)


def comparison_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, reference, metric) of a `compare` frame: the median over layers and the worst layer.

    Returns:
        DataFrame with columns `COMPARISON_TABLE_COLUMNS` = (run, method, reference, metric, step, layers,
        median, worst_layer, worst). Each layer's value follows the summary rule: a snapshot metric's at the
        group's last step (for an adapter run the last snapshot it shares with the reference), the loss gap's
        late value. step is the group's last step, layers the number of layers summarized, worst_layer /
        worst the layer with the largest value where `WORSE_IS_HIGHER` says True, the smallest where False,
        none (an empty name and NaN) where None. Ties go to the first layer in frame order. Missing values
        (NaN: a diverged run's loss gap) are left out of the median and the worst layer; all missing gives NaN.
    """
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}; comparison_table takes a compare() frame "
                         f"{list(COLUMNS)}")
    unknown = sorted(set(frame["metric"]) - WORSE_IS_HIGHER.keys())
    if unknown:
        raise ValueError(f"no worse direction for metrics {unknown}; known: {sorted(WORSE_IS_HIGHER)}")
    rows = []
    for (name, method, reference, metric), group in frame.groupby(
            ["run", "method", "reference", "metric"], sort=False):
        values = layer_values(group, metric in END_STATE)
        higher = WORSE_IS_HIGHER[metric]
        finite = values[np.isfinite(values.to_numpy(dtype="float64"))]  # NaN: missing, never worst
        worst = None if higher is None or not len(finite) else finite.idxmax() if higher else finite.idxmin()
        rows.append((name, method, reference, metric, int(group["step"].max()), len(values),
                     float(finite.median()) if len(finite) else math.nan,
                     "" if worst is None else worst, math.nan if worst is None else float(finite[worst])))
    return pd.DataFrame(rows, columns=list(COMPARISON_TABLE_COLUMNS))

