"""The run-level quantities the checks decide on, gathered for calibration (the benchmark writes them per run)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from loft_probe.diagnosis import held_out
from loft_probe.diagnosis import thresholds as T
from loft_probe.diagnosis.reading import LayerValues, last_snapshot, ranks
from loft_probe.diagnosis.training import dead_layers, frozen_factors, late_step_ratio, loss_curve
from loft_probe.run import Run


def signals(run: Run) -> dict[str, float]:
    """The run-level quantities the checks decide on (NaN where the record lacks them), for calibration."""
    values = LayerValues(run)
    adapters = values.adapter_layers()
    out = loss_curve(run)
    evals = held_out.evaluations(run)["loss"]
    if len(evals):
        out |= {"eval_noise": held_out.margin(held_out.last_se(run)), "eval_rise": float(evals.iloc[-1] - evals.min()),
                "eval_above_start": float(evals.iloc[-1] - evals.iloc[0]),
                "eval_still_falling": held_out.still_falling(run)}
    out["update_lr_ratio_max"] = _max(values.late("update_lr_ratio"))
    out["update_weight_ratio_max"] = _max(values.late("update_weight_ratio"))
    out["update_weight_ratio_median"] = late_step_ratio(values)
    residual = values.late("residual_tangent")
    out["residual_tangent_median"] = _median(residual[residual.index.isin(adapters)])
    out["shadow_update_cosine_median"] = _median(values.late("shadow_update_cosine"))
    out["proj_rel_error_max"] = _max(values.late("shadow_m_proj_rel_error"))
    # LoRA's lifted moments and preconditioned directions (LoFT's too); the LoRA optimizer_state check decides on
    # the whole run's (gap._lora_state)
    out["proj_cosine_median"] = _median(values.late("shadow_m_proj_cosine"))
    out["precond_proj_cosine_median"] = _median(values.late("shadow_precond_proj_cosine"))
    out["precond_proj_cosine_over_run"] = _median(values.over_run("shadow_precond_proj_cosine"))
    out["cos_moment_grad_median"] = _median(values.late("cos_moment_grad"))
    out["dead_layers"] = float(len(dead_layers(values)))
    out["frozen_factors"] = float(len(frozen_factors(values)))
    _, r90 = last_snapshot(run, "delta_r90")
    rank = ranks(run)
    full = [r90[layer] >= rank[layer] * T.RANK_FULL.value for layer in r90.index if layer in rank]
    out["r90_at_rank_fraction"] = float(np.mean(full)) if full else math.nan
    return out


def _max(values: pd.Series) -> float:
    return float(values.max()) if len(values) else math.nan


def _median(values: pd.Series) -> float:
    return float(values.median()) if len(values) else math.nan
