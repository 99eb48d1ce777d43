"""The held-out loss: how large a change its evaluation can resolve, whether it still falls at the end, whether
it rose while the training loss fell (overfitting; above its start, or with large steps: steps too large), and
whether it jumped above its start before the model learned (steps too large); against a full fine-tuning reference,
whether a rise from its best is one the reference did not show (steps too large, not too many).

A change between two evaluations is noise when it is within ``HELD_OUT_NOISE`` times the standard error of the
lower one, from the ``eval_loss_se`` the built-in classifier tasks record (std of the per-example loss over
sqrt(n)). That is the error of one evaluation against the population, so it is conservative for two evaluations
of the same held-out set (their errors correlate). A record without it (the HF Trainer's eval_loss, matfact's
deterministic loss) has a margin of 0: changes are then judged by the relative thresholds alone.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from loft_probe.diagnosis import thresholds as T
from loft_probe.diagnosis.finding import Finding, number
from loft_probe.diagnosis.reading import drop_share, run_series
from loft_probe.run import Run

# a trend (still falling, a rise from the best, flattened) needs the first, a middle, the last and one more
TREND_EVALS = 4


def evaluations(run: Run) -> pd.DataFrame:
    """The finite held-out losses by step (column ``loss``) with their standard errors (``se``, NaN where none
    was recorded)."""
    evals = run_series(run, "eval_loss")
    evals = evals[np.isfinite(evals.to_numpy())]
    se = run_series(run, "eval_loss_se")
    return pd.DataFrame({"loss": evals, "se": se.reindex(evals.index)})


def at_the_start(run: Run) -> bool:
    """Whether the first held-out evaluation came before any training step, so that it is the loss the run
    started from (the built-in runner evaluates at step 0; the HF Trainer first evaluates after some steps). The
    checks that compare with "the start" need it."""
    evals, loss = evaluations(run), run_series(run, "loss")
    return len(evals) > 0 and (not len(loss) or evals.index[0] <= loss.index[0])


def margin(se: float) -> float:
    """The smallest rise above an evaluation with standard error ``se`` that is not noise: HELD_OUT_NOISE × se;
    0 when it is unknown. Always the lower evaluation's error: a broken run's huge per-example losses make its
    own error huge, and must not hide how far it is above a healthy one."""
    return T.HELD_OUT_NOISE.value * se if math.isfinite(se) else 0.0


def last_se(run: Run) -> float:
    """The standard error of the run's last held-out evaluation (NaN when not recorded)."""
    evals = evaluations(run)
    return float(evals["se"].iloc[-1]) if len(evals) else math.nan


def still_falling(run: Run) -> float:
    """The share of the held-out loss's whole drop that came in the second half of its evaluations; +inf with
    fewer than four evaluations (the training loss then decides alone), 0 when that second-half drop is within
    the noise, -inf when the held-out loss never fell."""
    evals = evaluations(run)
    if len(evals) < TREND_EVALS:
        return math.inf
    middle, last = evals.iloc[len(evals) // 2], evals.iloc[-1]
    first = float(evals["loss"].iloc[0])
    if first > last["loss"] and middle["loss"] - last["loss"] <= margin(last["se"]):
        return 0.0
    share = drop_share(first, float(middle["loss"]), float(last["loss"]))
    return -math.inf if math.isnan(share) else share


def flattened(run: Run) -> dict[str, float]:
    """The held-out loss fell below its first evaluation beyond the noise and no longer falls (its second half
    gained at most HELD_OUT_STILL_FALLING of its drop): {eval_first, eval_last}; {} otherwise, with fewer than
    four evaluations, or without a standard error. A run whose training loss barely fell may then be at what its
    data allows rather than stopped early: the records alone cannot tell (the diagnosis benchmark's convention
    task, at its held-out optimum, against MiniLM runs cut to a tenth of their steps)."""
    evals = evaluations(run)
    if len(evals) < TREND_EVALS or not math.isfinite(evals["se"].iloc[-1]):
        return {}
    first, last = float(evals["loss"].iloc[0]), float(evals["loss"].iloc[-1])
    if first - last <= margin(float(evals["se"].iloc[-1])) or still_falling(run) > T.HELD_OUT_STILL_FALLING.value:
        return {}
    return {"eval_first": first, "eval_last": last}


def rise(run: Run) -> dict[str, float]:
    """The held-out loss's rise from its lowest evaluation to its last, when it exceeds the noise, with the
    training loss over the same interval (the median of its values between the evaluation before the best and
    the best, against those after the second-to-last evaluation); {} without such a rise or with fewer than
    four evaluations."""
    evals = evaluations(run)
    if len(evals) < TREND_EVALS:
        return {}
    best_at = int(np.argmin(evals["loss"].to_numpy()))
    best, last = evals.iloc[best_at], evals.iloc[-1]
    first = float(evals["loss"].iloc[0])
    # Without a standard error, a share of the drop to the best stands in for the noise.
    noise = margin(best["se"]) if math.isfinite(best["se"]) else T.HELD_OUT_RISE.value * (first - best["loss"])
    if best_at == len(evals) - 1 or last["loss"] - best["loss"] <= noise:
        return {}
    steps = evals.index.to_numpy()
    loss = run_series(run, "loss")
    loss = loss[np.isfinite(loss.to_numpy())]
    since = steps[best_at - 1] if best_at else -1
    at_best = loss[(loss.index > since) & (loss.index <= steps[best_at])]
    late = loss[loss.index > steps[-2]]
    if not len(at_best) or not len(late):
        return {}
    return {"eval_first": first, "eval_best": float(best["loss"]), "eval_last": float(last["loss"]),
            "best_step": float(steps[best_at]), "last_step": float(steps[-1]), "noise": noise,
            "loss_at_best": float(at_best.median()), "loss_late": float(late.median())}


def ended_above(run: Run, risen: dict[str, float]) -> bool:
    """A held-out rise (:func:`rise`) that ended above the run's start beyond the noise."""
    return risen["eval_last"] - risen["eval_first"] > risen["noise"] and at_the_start(run)


def diverged(run: Run) -> dict[str, float]:
    """The last held-out evaluation over LOSS_RISE × the first and beyond the noise (the run left the model worse
    than it found it), with the first evaluation step above the start beyond the noise; {} otherwise."""
    evals = evaluations(run)
    if len(evals) < 2 or not at_the_start(run):
        return {}
    losses = evals["loss"].to_numpy()
    first, last = float(losses[0]), float(losses[-1])
    noise = margin(float(evals["se"].iloc[0]))
    if not (first > 0 and last > T.LOSS_RISE.value * first and last - first > noise):
        return {}
    above = evals.index[1:][losses[1:] - first > noise]
    return {"eval_first": first, "eval_last": last, "eval_rise": last / first, "began_step": float(above[0])}


def spike(run: Run) -> dict[str, float]:
    """The held-out loss's highest evaluation after the first and before the model learned (the first evaluation
    below the first by more than the noise), when it lies above the first by more than HELD_OUT_SPIKE of the first
    and beyond the noise; {} otherwise, and where no standard error was recorded (a deterministic loss, e.g.
    matfact's, is the training loss's to judge: LOSS_RISE). A jump after the model learned is the swing of a
    noisy curve, or, where it stays to the end, :func:`rise`'s to judge."""
    evals = evaluations(run)
    if len(evals) < 2 or not math.isfinite(evals["se"].iloc[0]) or not at_the_start(run):
        return {}
    losses = evals["loss"].to_numpy()
    first, noise = float(losses[0]), margin(float(evals["se"].iloc[0]))
    learned = np.flatnonzero(losses[1:] < first - noise)
    before = losses[1:1 + learned[0]] if len(learned) else losses[1:]
    if not len(before):
        return {}
    peak_at = 1 + int(np.argmax(before))
    peak = float(losses[peak_at])
    allowed = max(noise, T.HELD_OUT_SPIKE.value * abs(first))
    if peak - first <= allowed:
        return {}
    return {"eval_first": first, "eval_peak": peak, "peak_step": float(evals.index[peak_at]),
            "eval_last": float(evals["loss"].iloc[-1]), "allowed": allowed}


def spiked(run: Run) -> list[Finding]:
    """lr_too_high: the held-out loss went above its start before the model learned (HELD_OUT_SPIKE, beyond its
    noise)."""
    jump = spike(run)
    if not jump:
        return []
    return [Finding(
        "lr_too_high", "warning",
        f"The held-out loss rose above its start before the model learned ({number(jump['eval_first'])} → "
        f"{number(jump['eval_peak'])} at step {int(jump['peak_step'])}, more than "
        f"{T.HELD_OUT_SPIKE.value:.0%} and beyond its noise) and ended at {number(jump['eval_last'])}: the steps "
        "threw the model off what it started from before it learned.", jump,
        "Lower the learning rate (a third to a tenth; for LoRA, α/r scales the steps too).")]


def worse_at_the_end(run: Run, step_ratio: float = math.nan, above_best: float = math.nan) -> list[Finding]:
    """lr_too_high: both losses got worse late in the run (the training loss over LOSS_ABOVE_BEST × its value at
    the held-out best), or the held-out loss rose from its best while the training loss fell and either ended
    above its start, or cannot settle (its late value over LOSS_ABOVE_BEST × the best it reached: ``above_best``,
    from :func:`loft_probe.diagnosis.training.loss_curve`), or the late steps (``step_ratio``, the median over
    layers of ‖ΔW‖/‖W‖) are over UPDATE_WEIGHT_RATIO_OVERFIT: the steps are too large for what the data supports."""
    risen = rise(run)
    if not risen:
        return []
    span = (f"{number(risen['eval_first'])} → best {number(risen['eval_best'])} at step {int(risen['best_step'])} "
            f"→ {number(risen['eval_last'])}")
    training = f"{number(risen['loss_at_best'])} → {number(risen['loss_late'])}"
    if risen["loss_late"] > T.LOSS_ABOVE_BEST.value * risen["loss_at_best"]:
        what = (f"Both losses got worse at the end of the run: held-out {span}, training {training} (over "
                f"{T.LOSS_ABOVE_BEST.value:g}× its value at the held-out best): the steps destabilise the run.")
    elif risen["loss_late"] < risen["loss_at_best"] and ended_above(run, risen) and not diverged(run):
        what = (f"The held-out loss ended above where it started ({span}) while the training loss kept falling "
                f"({training}): the steps are too large for what the data supports.")
    elif risen["loss_late"] < risen["loss_at_best"] and above_best > T.LOSS_ABOVE_BEST.value:
        risen = risen | {"loss_above_best": above_best, "loss_above_best_max": T.LOSS_ABOVE_BEST.value}
        what = (f"The held-out loss rose from its best while the training loss, lower than then ({training}), is "
                f"{above_best:.3g}× the best it reached (held-out {span}): the steps are too large for the run to "
                "settle, and the model overfits on their account.")
    elif risen["loss_late"] < risen["loss_at_best"] and step_ratio > T.UPDATE_WEIGHT_RATIO_OVERFIT.value:
        risen = risen | {"update_weight_ratio_median": step_ratio}
        what = (f"The held-out loss rose from its best while the training loss kept falling (held-out {span}, "
                f"training {training}), with late steps of {step_ratio:.2%} of the weights (median over layers; "
                f"healthy runs stay under {T.UPDATE_WEIGHT_RATIO_OVERFIT.value:.1%}): the steps are too large, "
                "and the model overfits on their account.")
    else:
        return []
    return [Finding("lr_too_high", "warning", what, risen,
                    "Lower the learning rate (a third to a tenth; for LoRA, α/r scales the steps too), or stop "
                    f"near step {int(risen['best_step'])}.")]


def outpaced(finding: Finding, reference: Run, shortfall: float, converged: bool) -> Finding:
    """An ``overfitting`` finding read against the reference: where full fine-tuning, trained at least as long
    and ``converged`` (from the loss gap), did not rise from its held-out best and this run ends over GAP_SHORTFALL
    of the reference's gain short of it (``shortfall``, from the loss gap), the run did not train too long, its
    steps were too large for its length: lr_too_high. Otherwise the finding as it was: a reference still falling
    has not shown where its own rise would begin."""
    risen, evals = finding.evidence, evaluations(reference)
    # rise() needs TREND_EVALS evaluations and a training loss to see a rise: without, "did not rise" is unknown
    if finding.code != "overfitting" or not converged or not shortfall > T.GAP_SHORTFALL.value or \
            len(evals) < TREND_EVALS or not len(run_series(reference, "loss")) or \
            evals.index[-1] < risen["last_step"] or rise(reference):
        return finding
    return Finding(
        "lr_too_high", "warning",
        f"The held-out loss rose from its best {number(risen['eval_best'])} at step {int(risen['best_step'])} to "
        f"{number(risen['eval_last'])} while the training loss kept falling, and the run ends {shortfall:.0%} of "
        f"the reference's gain short of {reference.name}, whose held-out loss did not rise over its "
        f"{int(evals.index[-1])} steps: this run did not train too long, its steps were too large for its length.",
        risen | {"shortfall": shortfall, "reference": reference.name},
        "Lower the learning rate (a third to a tenth; for LoRA, α/r scales the steps too); until then, the model "
        f"of step {int(risen['best_step'])} is the better one.")


def overfitting(run: Run, step_ratio: float = math.nan) -> list[Finding]:
    """The held-out loss rose from its best by more than the noise while the training loss fell, and did not
    end above its start (that, large steps, or a training loss that cannot settle, is :func:`worse_at_the_end`).
    ``step_ratio``, the late steps' median ‖ΔW‖/‖W‖, is said where it is known: under UPDATE_WEIGHT_RATIO_OVERFIT,
    with a settled training loss, the records cannot tell too many steps from too high a learning rate (a full
    fine-tuning reference can: :func:`outpaced`), and the finding says so instead of naming one."""
    risen = rise(run)
    if not risen or risen["loss_late"] >= risen["loss_at_best"] or ended_above(run, risen):
        return []
    why = ""
    if math.isfinite(step_ratio):
        risen = risen | {"update_weight_ratio_median": step_ratio}
    if step_ratio <= T.UPDATE_WEIGHT_RATIO_OVERFIT.value:  # larger steps are step_too_large's to name (NaN: unknown)
        why = (f" Its late steps are {step_ratio:.2%} of the weights (median over layers), under the "
               f"{T.UPDATE_WEIGHT_RATIO_OVERFIT.value:.1%} that marks steps too large for the data: from these "
               "records, too many steps and too high a learning rate look alike.")
    return [Finding(
        "overfitting", "warning",
        f"The held-out loss rose from its best {number(risen['eval_best'])} at step {int(risen['best_step'])} to "
        f"{number(risen['eval_last'])} at step {int(risen['last_step'])} while the training loss kept falling "
        f"({number(risen['loss_at_best'])} → {number(risen['loss_late'])}): the run trained past its best.{why}",
        risen, f"Keep the model of step {int(risen['best_step'])} (evaluate and checkpoint more often near it), "
               "train fewer steps, or lower the learning rate; compare methods at their best held-out loss.")]
