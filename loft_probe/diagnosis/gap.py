"""Checks of where a run's gap to full fine-tuning comes from (the subspace, the optimizer's state, the rank) and
of the run against its reference (the loss gap, intruder dimensions); and what the record lacks for them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd

from loft_probe.diagnosis import held_out
from loft_probe.diagnosis import thresholds as T
from loft_probe.diagnosis.finding import Finding, layer_listing, number, worst_layers
from loft_probe.diagnosis.reading import (
    LayerValues,
    drop_share,
    is_adapter,
    last_snapshot,
    ranks,
    run_series,
)
from loft_probe.diagnosis.training import dead_layers
from loft_probe.optim.loft import LoFT
from loft_probe.run import RUN_LAYER, Run
from loft_probe.run.series import late_value


def subspace(run: Run, values: LayerValues) -> list[Finding]:
    """High tangent residual *and* ΔW using every direction of its rank: the rank limits those layers."""
    adapters = values.adapter_layers()
    residual = values.late("residual_tangent")
    residual = residual[residual.index.isin(adapters)]
    if not len(residual):
        return []
    _, r90 = last_snapshot(run, "delta_r90")
    rank = ranks(run)
    at_rank = {layer for layer in r90.index if layer in rank and r90[layer] >= rank[layer] * T.RANK_FULL.value}
    limited = residual[(residual >= T.RESIDUAL_HIGH.value) & residual.index.isin(at_rank)]
    if not len(limited):
        return []
    worst = worst_layers(limited, lowest=False)
    evidence = {"residual_min": T.RESIDUAL_HIGH.value, "layers_limited": float(len(limited)),
                "layers": float(len(residual)), **worst}
    ranks_used = sorted({rank[layer] for layer in limited.index})
    higher = f" (e.g. rank {2 * ranks_used[0]})" if len(ranks_used) == 1 else ""
    said = (f"{len(limited)} of {len(residual)} adapter layers cannot reach most of their gradient (late tangent "
            f"residual ≥ {T.RESIDUAL_HIGH.value}) and use every direction their rank gives (r90 = rank): "
            f"{layer_listing(worst, len(limited))}.")
    if len(limited) >= T.RANK_LAYER_FRACTION.value * len(residual):
        return [Finding("rank_too_low", "warning", said, evidence,
                        f"The rank limits the run: raise it{higher}. No optimizer can step where the subspace "
                        "cannot go.")]
    return [Finding("gap_from_subspace", "warning", said, evidence,
                    f"These layers need more rank than the others: raise it for them{higher}.")]


def optimizer_state(run: Run, values: LayerValues, broken: bool) -> list[Finding]:
    """The optimizer's state against the shadow's projected onto the adapter's subspace (the projection already
    leaves out what the subspace cannot hold, so the residual does not enter). LoFT: its moment off by more
    than its own size, a fault of its switches. LoRA: its steps pointing away from full fine-tuning's, the
    mismatch LoFT removes (none when ``broken``: a training fault, e.g. a frozen factor, explains more)."""
    method = run.meta.get("method")
    if method == "loft":
        return _loft_state(run, values)
    return _lora_state(values) if method == "lora" and not broken else []


def _loft_state(run: Run, values: LayerValues) -> list[Finding]:
    """LoFT's late ``shadow_m_proj_rel_error`` above 1 in some layer (the threshold was measured on LoFT)."""
    errors = values.late("shadow_m_proj_rel_error")
    errors = errors[~errors.index.isin(dead_layers(values))]  # G = 0: the shadow's moment decays, LoFT's is 0
    off = errors[errors > T.PROJ_REL_ERROR.value]
    if not len(off):
        return []
    worst = worst_layers(off, lowest=False)
    changed = _changed_switches(run)
    advice = (f"This run changed LoFT's defaults ({', '.join(changed)}): the defaults keep the moments aligned "
              "with full fine-tuning's." if changed else
              "Every LoFT switch is at its default: check the learning rate against full fine-tuning's, and "
              "report the run if it persists.")
    return [Finding(
        "optimizer_state", "warning",
        f"In {len(off)} of {len(errors)} layers the optimizer's first moment is off from full fine-tuning's "
        f"within the adapter's subspace (late ‖M̂ − proj M_shadow‖/‖proj M_shadow‖ > {T.PROJ_REL_ERROR.value}): "
        f"{layer_listing(worst, len(off))}.",
        {"threshold": T.PROJ_REL_ERROR.value, "layers_off": float(len(off)), "layers": float(len(errors)),
         **({"changed": ", ".join(changed)} if changed else {}), **worst}, advice)]


def _changed_switches(run: Run) -> list[str]:
    """``name=value`` for each LoFT switch the run set away from its default."""
    hyper = run.meta.get("hyperparameters") or {}
    return [f"{name}={hyper[name]!r}" for name, default in LoFT.switches().items()
            if name in hyper and hyper[name] != default]


def loft_short_steps(run: Run, largest: float) -> list[Finding]:
    """LoFT's steps far below its learning rate's scale in a run whose loss has not fallen (``largest``, from
    :func:`loft_probe.diagnosis.training.loft_steps_short`; NaN: nothing to say)."""
    if not math.isfinite(largest):
        return []
    changed = _changed_switches(run)
    advice = (f"This run changed LoFT's defaults ({', '.join(changed)}): with them LoFT's step is no longer the "
              "projected Adam step; go back to the defaults before raising the learning rate." if changed else
              "Every LoFT switch is at its default: report the run, with its directory.")
    return [Finding(
        "optimizer_state", "warning",
        f"The loss has not fallen and LoFT's steps are a small fraction of its learning rate's scale: late "
        f"‖ΔW‖/(lr·sqrt(mn)) at most {largest:.2g} in every layer (below {T.UPDATE_LR_SHORT.value:g}; LoFT's projected "
        "Adam step at a normal learning rate is of order 0.1–1). The optimizer's update, not the learning rate, "
        "keeps the run still.",
        {"update_lr_ratio_max": largest, "threshold": T.UPDATE_LR_SHORT.value,
         **({"changed": ", ".join(changed)} if changed else {})}, advice)]


def _lora_state(values: LayerValues) -> list[Finding]:
    """LoRA's preconditioned steps, lifted into the weight's space, against the shadow's projected the same way
    (``shadow_precond_proj_cosine``, docs/metrics-spec.md "LoRA's moments in full space"), over the whole run.
    Info: :func:`loft_probe.diagnosis.diagnose` makes it a warning when the reference shows a loss gap that no
    other finding explains."""
    cosines = values.over_run("shadow_precond_proj_cosine")
    cosines = cosines[~cosines.index.isin(dead_layers(values))]
    median = float(cosines.median()) if len(cosines) else math.nan
    if not median < T.LORA_PRECOND_ALIGNED.value:  # NaN: not recorded
        return []
    below = cosines[cosines < T.LORA_PRECOND_ALIGNED.value]
    worst = worst_layers(below, lowest=True)
    moment = float(values.over_run("shadow_m_proj_cosine").median())
    return [Finding(
        "optimizer_state", "info",
        f"Within the adapter's subspace, LoRA's steps point away from full fine-tuning's: the preconditioned "
        f"direction of its factors, lifted into the weight's space, has a median cosine of "
        f"{number(median)} with the shadow's over the run (LoFT keeps ≥ "
        f"{T.LORA_PRECOND_ALIGNED.value}), its first moment {number(moment)}; below "
        f"{T.LORA_PRECOND_ALIGNED.value} in {len(below)} of {len(cosines)} layers: {layer_listing(worst, len(below))}.",
        {"threshold": T.LORA_PRECOND_ALIGNED.value, "median": median, "first_moment_median": moment,
         "layers_below": float(len(below)), "layers": float(len(cosines)), **worst},
        "This is the mismatch LoFT removes: each factor's second moment rescales coordinates that full "
        "fine-tuning's does not. Whether it costs anything shows against a full fine-tuning reference "
        "(`loft-probe diagnose --reference`); a LoFT run of the same rank tells.")]


def rank_spare(run: Run, values: LayerValues) -> list[Finding]:
    """ΔW's r90 far below the rank in every adapter layer: the rank is more than the run uses."""
    rank = ranks(run)
    step, r90 = last_snapshot(run, "delta_r90")
    r90 = r90[r90.index.isin(list(rank))]
    if not len(r90):
        return []
    used = pd.Series({layer: r90[layer] / rank[layer] for layer in r90.index})
    if used.max() > T.RANK_SPARE.value:
        return []
    largest, biggest = int(r90.max()), max(rank[layer] for layer in r90.index)
    return [Finding(
        "rank_more_than_needed", "info",
        f"At step {step}, ΔW holds 90% of its energy in at most {largest} directions (r90) in every layer, "
        f"against rank {biggest}.",
        {"step": float(step), "rank": float(biggest), "max_r90": float(largest),
         "rank_spare_fraction": T.RANK_SPARE.value, **worst_layers(r90, lowest=False)},
        f"A rank near {max(1, 2 * largest)} would likely do as well for less memory; check the held-out loss "
        "before settling on it.")]


# ---------------------------------------------------------------------------------------------- against the reference
def final_loss(run: Run) -> tuple[str, int, float]:
    """(metric, step, value) a run is judged by: its last held-out loss, else its late training loss."""
    evals = run_series(run, "eval_loss")
    if len(evals):
        return "eval_loss", int(evals.index[-1]), float(evals.iloc[-1])
    loss = run_series(run, "loss")
    if len(loss):
        last = float(loss.iloc[-1])  # a run that ends non-finite has no final loss
        return "loss", int(loss.index[-1]), late_value(run.rows("loss", [RUN_LAYER])) if math.isfinite(last) else last
    return "", 0, math.nan


def last_interval_drop(curve: pd.Series) -> float:
    """The share of a loss curve's whole drop (first → last value) that came in its last interval: ~0 for a
    converged curve; NaN with fewer than three points or no drop."""
    if len(curve) < 3:
        return math.nan
    return drop_share(float(curve.iloc[0]), float(curve.iloc[-2]), float(curve.iloc[-1]))


def still_falling(reference: Run, metric: str) -> float:
    """The share of the reference's whole drop in ``metric`` (``eval_loss`` or ``loss``) that came in its last
    interval, where that last drop is beyond the noise of its last held-out evaluation; 0 within the noise; NaN with
    fewer than three values or no drop. Over REFERENCE_STILL_FALLING: the reference has not converged."""
    curve = run_series(reference, metric)
    share = last_interval_drop(curve)
    evals = held_out.evaluations(reference)
    noise = held_out.margin(float(evals["se"].iloc[-1])) if metric == "eval_loss" and len(evals) else 0.0
    return 0.0 if math.isfinite(share) and float(curve.iloc[-2] - curve.iloc[-1]) <= noise else share


def converged(loss_gap: Finding) -> bool:
    """Whether the reference of a ``loss_gap`` finding had converged (its last interval gained at most
    REFERENCE_STILL_FALLING of its drop, beyond the noise); False where that is unknown."""
    return float(loss_gap.evidence.get("reference_still_falling", math.nan)) <= T.REFERENCE_STILL_FALLING.value


def loss_gap(run: Run, reference: Run) -> list[Finding]:
    """The run's final loss against the reference's, as a share of what the reference gained from the start
    (an absolute floor: two converged runs at 1e-8 and 1e-9 do not differ). Says when the reference has not
    converged, and never calls a shorter run better. A warning is :func:`unexplained` where nothing else names a
    cause."""
    metric, step, value = final_loss(run)
    ref_metric, ref_step, ref_value = final_loss(reference)
    if not metric or metric != ref_metric:
        return [Finding("loss_gap", "info", f"{run.name} and {reference.name} share no loss to compare.",
                        {"reference": reference.name}, "Log the loss (probe.log) and a held-out loss in both.")]
    start = run_series(reference, metric)
    start_value = float(start.iloc[0])
    gain = start_value - ref_value
    evidence: dict[str, float | str] = {"reference": reference.name, "metric": metric, "step": float(step),
                                        "reference_step": float(ref_step), "loss": value, "reference_loss": ref_value,
                                        "start_loss": start_value}
    if not math.isfinite(value):
        return [Finding("loss_gap", "warning", f"{run.name}'s final {metric} is not finite: no comparison with "
                        f"{reference.name} is possible.", evidence, "See the divergence finding.")]
    notes = []
    noise = held_out.margin(held_out.last_se(reference)) if metric == "eval_loss" else 0.0
    last_drop = still_falling(reference, metric)
    if math.isfinite(last_drop):
        evidence["reference_still_falling"] = last_drop
        if last_drop > T.REFERENCE_STILL_FALLING.value:
            notes.append(f"{reference.name} itself has not converged (its {metric} still fell by {last_drop:.0%} "
                         "of its gain in its last evaluation interval): train it longer for a fair reference")
    if step < ref_step:
        notes.append(f"{run.name} ran {step} steps against {reference.name}'s {ref_step}: a shorter run is "
                     "compared at its own end")
    shortfall = (value - ref_value) / gain if gain > 0 else math.nan
    evidence["shortfall"], evidence["shortfall_max"] = shortfall, T.GAP_SHORTFALL.value
    said = (f"Final {metric} {number(value)} against {reference.name}'s {number(ref_value)} "
            f"(from {number(start_value)} at the start)")
    tail = ("; ".join(notes) + ".") if notes else ""
    if shortfall > T.GAP_SHORTFALL.value and value - ref_value <= noise:
        evidence["noise"] = noise
        return [Finding("loss_gap", "info",
                        f"{said}: {shortfall:.0%} of the reference's gain is missing, but the difference "
                        f"({number(value - ref_value)}) is within the held-out set's noise ({number(noise)}, "
                        f"{T.HELD_OUT_NOISE.value:g} standard errors). {tail}".strip(), evidence,
                        "Evaluate on more held-out data (or several seeds) before acting on this gap.")]
    if shortfall > T.GAP_SHORTFALL.value:
        return [Finding("loss_gap", "warning",
                        f"{said}: {shortfall:.0%} of the reference's gain is missing. {tail}".strip(),
                        evidence, "The other findings say where the gap comes from; a learning rate tuned for "
                                  "this method matters too.")]
    verdict = ("no worse than the reference" if shortfall <= 0 and step >= ref_step
               else f"within {T.GAP_SHORTFALL.value:.0%} of the reference's gain")
    return [Finding("loss_gap", "info", f"{said}: {verdict}. {tail}".strip(), evidence,
                    "No loss gap to close; compare task metrics before calling the methods equal.")]


def share_missing(loss_gap: Finding) -> float:
    """The share of the reference's gain a ``loss_gap`` warning says is missing (beyond the held-out noise); NaN
    for an info (no gap beyond the noise) or a run that ended non-finite."""
    return float(loss_gap.evidence.get("shortfall", math.nan)) if loss_gap.severity == "warning" else math.nan


def stopped_early(finding: Finding, loss_gap: Finding, reference: Run) -> list[Finding]:
    """An ``undertrained`` finding read against the reference, which tells a run stopped early from one at what
    its data give in this many steps. Where the run ends short of the reference beyond the noise (a ``loss_gap``
    warning), a warning (an info that could not tell becomes one). Where it does not, and the reference converged
    (:func:`converged`) over as many steps, none: full fine-tuning, as long, got no further, and the loss gap's
    info says so. Otherwise the finding as it was (a reference trained longer, or still falling, cannot tell)."""
    shortfall, ends = share_missing(loss_gap), loss_gap.evidence
    if shortfall > T.GAP_SHORTFALL.value:
        if finding.severity == "warning":
            return [finding]
        return [replace(finding, severity="warning",
                        title=finding.title + f" Against {reference.name} they can: the run ends {shortfall:.0%} of "
                                              f"the reference's gain short of it (final {ends['metric']} "
                                              f"{number(ends['loss'])} against {number(ends['reference_loss'])}), "
                                              "so it stopped early.",
                        evidence=finding.evidence | {"shortfall": shortfall, "reference": reference.name},
                        suggestion="Train longer (or raise the learning rate); compare with a run of the reference's "
                                   "length.")]
    as_long = ends.get("step") == ends.get("reference_step")
    return [] if loss_gap.severity == "info" and converged(loss_gap) and as_long else [finding]


def unexplained(loss_gap: Finding) -> Finding:
    """A loss_gap warning in a run where no other warning names a cause, which says so."""
    return replace(loss_gap, title=loss_gap.title + " Nothing else in the record names a cause.")


def intruders(run: Run, reference: Run, frame: pd.DataFrame | None) -> list[Finding]:
    """More intruder dimensions than the reference at the last snapshot both share: only against a reference,
    and only where the base weights are pretrained (a zero W_0 has no singular directions to intrude on)."""
    if frame is None or not is_adapter(run) or not LayerValues(run).has("delta_rel_size"):
        return []  # delta_rel_size is undefined (missing) exactly when W_0 = 0
    if (run.meta.get("task") or {}).get("pretrained") is False:
        return []
    rows = frame[frame["metric"] == "intruders"]
    if not len(rows):
        return []
    step = int(rows["step"].max())
    at = rows[rows["step"] == step]
    mine = at[at["run"] == run.name]
    theirs = at[at["run"] == reference.name]
    total, ref_total = int(mine["value"].sum()), int(theirs["value"].sum())
    if total <= ref_total:
        return []
    counts = pd.Series(mine["value"].to_numpy(), index=mine["layer"].astype(str).to_numpy())
    present = counts[counts > 0]
    worst = worst_layers(present, lowest=False)
    return [Finding(
        "intruders", "info",
        f"{total} intruder dimension{'s' * (total != 1)} in {len(present)} layers at step {step} against "
        f"{reference.name}'s {ref_total}: {layer_listing(worst, len(present))}.",
        {"step": float(step), "total": float(total), "reference_total": float(ref_total), **worst},
        "Intruder dimensions are new top singular directions nearly orthogonal to the pretrained ones "
        "(Shuttleworth et al.), linked to forgetting; evaluate on the pretraining data to see whether they "
        "matter. A higher rank, or LoFT, usually leaves fewer.")]


def not_recorded(run: Run, values: LayerValues) -> list[Finding]:
    """One info finding naming the checks skipped because a switch was off, and the switch that records them.
    Decided on meta.json's switches, not on missing rows: a metric undefined at its input (G = 0, ΔW = 0) is
    missing too, and turning a switch on would not record it."""
    missing: dict[str, str] = {}
    meta = run.meta
    if is_adapter(run):
        if meta.get("shadow") is False or (meta.get("shadow") is None and not values.has("shadow_update_cosine")):
            missing["optimizer-state check"] = "shadow=True (loft-probe run --shadow)"
        if meta.get("capture_grad") is False or (meta.get("capture_grad") is None and not values.has("grad_norm")):
            missing["subspace (tangent residual) check"] = "gradients=Gradients(capture=True) (implied by shadow=True)"
    if not values.has("delta_r90") and not run.snapshot_steps:
        missing["rank checks"] = "a snapshot (every 4th recorded step, and the last one when the probe closes)"
    if not values.has("update_lr_ratio") and values.has("update_norm"):
        missing["step-size checks"] = "a probe of this version (update_lr_ratio)"
    if not missing:
        return []
    return [Finding("not_recorded", "info", "Skipped for lack of metrics: " + "; ".join(missing) + ".",
                    dict(missing), "Record them with " + "; ".join(sorted(set(missing.values()))) + ".")]
