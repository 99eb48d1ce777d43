"""The held-out loss: how large a change its evaluation can resolve, whether it still falls at the end, and
whether it rose while the training loss fell (overfitting; above its start: steps too large).

The noise scale is ``HELD_OUT_NOISE`` standard errors of the held-out mean, from the ``eval_loss_se`` the built-in
classifier tasks record (std of the per-example loss over sqrt(n)). It is the error of one evaluation against
the population, so it is conservative for two evaluations of the same held-out set (their errors correlate). A
record without it (the HF Trainer's eval_loss, matfact's deterministic loss) has a noise of 0: changes are then
judged by the relative thresholds alone.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from loft_probe.diagnosis import thresholds as T
from loft_probe.diagnosis.finding import Finding, number
from loft_probe.diagnosis.reading import drop_share, run_series
from loft_probe.probe.rundir import Run


def curve(run: Run) -> pd.Series:
    """The finite held-out losses by step."""
    evals = run_series(run, "eval_loss")
    return evals[np.isfinite(evals.to_numpy())]


def noise(run: Run) -> float:
    """The smallest held-out change the record resolves: HELD_OUT_NOISE × the median recorded standard error;
    0 when none is recorded."""
    se = run_series(run, "eval_loss_se")
    se = se[np.isfinite(se.to_numpy())]
    return T.HELD_OUT_NOISE.value * float(se.median()) if len(se) else 0.0


def still_falling(run: Run) -> float:
    """The share of the held-out loss's whole drop that came in the second half of its evaluations; +inf with
    fewer than four evaluations (the training loss then decides alone), 0 when that second-half drop is within
    the noise, -inf when the held-out loss never fell."""
    evals = curve(run)
    if len(evals) < 4:
        return math.inf
    first, middle, last = float(evals.iloc[0]), float(evals.iloc[len(evals) // 2]), float(evals.iloc[-1])
    if first > last and middle - last <= noise(run):
        return 0.0
    share = drop_share(first, middle, last)
    return -math.inf if math.isnan(share) else share


def rise(run: Run) -> dict[str, float]:
    """The held-out loss's rise from its lowest evaluation to its last, when it exceeds the noise and the
    training loss fell over the same interval (median of the training losses up to the best evaluation against
    those after the second-to-last one); {} otherwise, or with fewer than four evaluations."""
    evals = curve(run)
    if len(evals) < 4:
        return {}
    best_at = int(np.argmin(evals.to_numpy()))
    first, best, last = float(evals.iloc[0]), float(evals.iloc[best_at]), float(evals.iloc[-1])
    margin = noise(run)
    if best_at == len(evals) - 1 or last - best <= max(margin, T.HELD_OUT_RISE.value * (first - best)):
        return {}
    steps = evals.index.to_numpy()
    loss = run_series(run, "loss")
    loss = loss[np.isfinite(loss.to_numpy())]
    since = steps[best_at - 1] if best_at else -1
    at_best = loss[(loss.index > since) & (loss.index <= steps[best_at])]
    late = loss[loss.index > steps[-2]]
    if not len(at_best) or not len(late) or float(late.median()) >= float(at_best.median()):
        return {}
    return {"eval_first": first, "eval_best": best, "eval_last": last, "best_step": float(steps[best_at]),
            "last_step": float(steps[-1]), "noise": margin, "loss_at_best": float(at_best.median()),
            "loss_late": float(late.median())}


def above_start(run: Run) -> list[Finding]:
    """lr_too_high: the held-out loss ended above where it started (beyond the noise) while the training loss
    fell: the steps fit the training data at the expense of everything else."""
    risen = rise(run)
    if not risen or risen["eval_last"] - risen["eval_first"] <= risen["noise"]:
        return []
    return [Finding(
        "lr_too_high", "warning",
        f"The held-out loss ended above where it started ({number(risen['eval_first'])} → best "
        f"{number(risen['eval_best'])} at step {int(risen['best_step'])} → {number(risen['eval_last'])}) while the "
        f"training loss kept falling ({number(risen['loss_at_best'])} → {number(risen['loss_late'])}): the steps "
        "are too large for what the data supports.",
        risen, "Lower the learning rate (a third to a tenth; for LoRA, α/r scales the steps too), or stop near "
               f"step {int(risen['best_step'])}.")]


def overfitting(run: Run) -> list[Finding]:
    """The held-out loss rose from its best by more than the noise while the training loss fell, and did not
    end above its start (that is :func:`above_start`)."""
    risen = rise(run)
    if not risen or risen["eval_last"] - risen["eval_first"] > risen["noise"]:
        return []
    return [Finding(
        "overfitting", "warning",
        f"The held-out loss rose from its best {number(risen['eval_best'])} at step {int(risen['best_step'])} to "
        f"{number(risen['eval_last'])} at step {int(risen['last_step'])} while the training loss kept falling "
        f"({number(risen['loss_at_best'])} → {number(risen['loss_late'])}): the run trained past its best.",
        risen, f"Keep the model of step {int(risen['best_step'])} (evaluate and checkpoint more often near it), "
               "train fewer steps, or lower the learning rate; compare methods at their best held-out loss.")]
