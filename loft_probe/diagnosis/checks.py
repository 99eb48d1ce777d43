"""The checks: each reads a run's record (and the reference's) and returns findings, in the order they are shown.

Every decision compares one quantity with one threshold of :mod:`loft_probe.diagnosis.thresholds`; per-layer
metrics are read through :mod:`loft_probe.diagnosis.reading` (late = median over the last third).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from loft_probe.diagnosis import thresholds as T
from loft_probe.diagnosis.reading import LayerValues, is_adapter, last_snapshot, late_value, ranks, run_series
from loft_probe.optim.functional import adam_ratio_bound
from loft_probe.optim.loft import LoFT
from loft_probe.probe.rundir import RUN_LAYER, Run

Severity = Literal["info", "warning"]


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about a run, with the numbers behind it and what to try.

    evidence: the thresholds and counts the finding was decided on, then up to `WORST_SHOWN` layers by
    name (worst first) with their values.
    """

    code: str  # stable identifier, e.g. "rank_too_low"
    severity: Severity  # "warning": likely hurts the run; "info": worth knowing
    title: str  # one sentence with the key numbers
    evidence: dict[str, float | str]
    suggestion: str  # what to try, or what to turn on


# ---------------------------------------------------------------------------------------------- signals
def loss_curve(run: Run) -> dict[str, float]:
    """The training loss's first value, late value (median of the last third), the median of the middle third,
    the best (lowest median of ten windows), and ``falling``: (middle − late)/(first − late), the share of the
    whole drop still happening at the end."""
    loss = run_series(run, "loss")
    loss = loss[np.isfinite(loss.to_numpy())]
    if len(loss) < 3:
        return {}
    n = len(loss)
    first, mid, late = float(loss.iloc[0]), float(loss.iloc[n // 3: n - n // 3].median()), float(
        loss.iloc[n - math.ceil(n / 3):].median())
    window = max(1, n // 10)
    best = min(float(loss.iloc[i:i + window].median()) for i in range(0, n - window + 1, window))
    out = {"loss_first": first, "loss_mid": mid, "loss_late": late, "loss_best": best,
           "loss_rise": late / first if first else math.nan,
           "loss_above_best": late / best if best > 0 else math.nan}
    out["loss_falling"] = (mid - late) / (first - late) if first > late else math.nan
    return out


def signals(run: Run) -> dict[str, float]:
    """The run-level quantities the checks decide on (NaN where the record lacks them), for calibration."""
    values = LayerValues(run)
    adapters = values.adapter_layers()
    out = loss_curve(run)
    out["update_lr_ratio_max"] = _max(values.late("update_lr_ratio"))
    out["update_weight_ratio_max"] = _max(values.late("update_weight_ratio"))
    out["update_weight_ratio_median"] = _median(values.late("update_weight_ratio"))
    residual = values.late("residual_tangent")
    out["residual_tangent_median"] = _median(residual[residual.index.isin(adapters)])
    out["shadow_update_cosine_median"] = _median(values.late("shadow_update_cosine"))
    out["proj_rel_error_max"] = _max(values.late("shadow_m_proj_rel_error"))
    out["cos_moment_grad_median"] = _median(values.late("cos_moment_grad"))
    out["dead_layers"] = float(len(_dead_layers(values)))
    out["frozen_factors"] = float(len(_frozen_factors(values)))
    _, r90 = last_snapshot(run, "delta_r90")
    rank = ranks(run)
    full = [r90[layer] >= rank[layer] * T.RANK_FULL.value for layer in r90.index if layer in rank]
    out["r90_at_rank_fraction"] = float(np.mean(full)) if full else math.nan
    return out


def _max(values: pd.Series) -> float:
    return float(values.max()) if len(values) else math.nan


def _median(values: pd.Series) -> float:
    return float(values.median()) if len(values) else math.nan


def _worst(values: pd.Series, lowest: bool) -> dict[str, float]:
    """Up to WORST_SHOWN layers, worst first, as {layer: value}."""
    ordered = values.sort_values(ascending=lowest, kind="stable")
    return {str(layer): float(value) for layer, value in ordered.head(T.WORST_SHOWN).items()}


def _listing(worst: dict[str, float], total: int) -> str:
    """ "fc1 (0.41), fc2 (0.47) and 3 more" for a title."""
    text = ", ".join(f"{layer} ({number(value)})" for layer, value in worst.items())
    return text + (f" and {total - len(worst)} more" if total > len(worst) else "")


def _names(layers: list[str]) -> str:
    shown = ", ".join(layers[:T.WORST_SHOWN])
    return shown + (f" and {len(layers) - T.WORST_SHOWN} more" if len(layers) > T.WORST_SHOWN else "")


def number(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


# ---------------------------------------------------------------------------------------------- training went wrong
def nonfinite(run: Run) -> list[Finding]:
    """Where the record holds NaN/Inf (a value, a ``nonfinite_grad`` or ``skipped_step`` flag): the first step,
    its layers, and whether the run is still non-finite at its last recorded step (diverged) or recovered."""
    metrics = run.metrics
    values = metrics["value"].to_numpy(dtype="float64")
    flagged = ~np.isfinite(values) | (metrics["metric"].isin(["nonfinite_grad", "skipped_step"]).to_numpy()
                                      & (values != 0))
    if not flagged.any():
        return []
    bad = metrics[flagged]
    first = int(bad["step"].min())
    at_first = bad[bad["step"] == first]
    layers = sorted({str(layer) for layer in at_first["layer"] if layer != RUN_LAYER})
    where = f", in layer{'s' * (len(layers) > 1)} {_names(layers)}" if layers else ""
    what = ", ".join(sorted(set(at_first["metric"].astype(str))))
    evidence: dict[str, float | str] = {"first_step": float(first), "steps": float(bad["step"].nunique()),
                                        "metrics": what, "layers": ", ".join(layers[:T.WORST_SHOWN])}
    last = int(metrics["step"].max())
    last_values = metrics.loc[metrics["step"] == last, "value"].to_numpy(dtype="float64")
    loss = run_series(run, "loss")
    if not np.isfinite(last_values).all() or (len(loss) and not math.isfinite(float(loss.iloc[-1]))):
        evidence["last_step"] = float(last)
        return [Finding(
            "diverged", "warning",
            f"The run diverged at step {first}{where} ({what} not finite); it is still not finite at its last "
            f"recorded step {last}: other findings describe the steps before it.",
            evidence, "Lower the learning rate, clip gradients (LoFT: max_grad_norm), or check the data of step "
                      f"{first}; resume from a checkpoint taken before step {first}.")]
    return [Finding(
        "nonfinite_steps", "warning",
        f"NaN/Inf at {int(evidence['steps'])} recorded step(s), the first at step {first}{where} ({what}); the "
        "later steps are finite again.",
        evidence, "Skipped steps and gradients kept out of the shadow change the comparison little; if they "
                  "repeat, lower the learning rate or check the data of those steps.")]


def loss_rose(run: Run, values: LayerValues) -> list[Finding]:
    """A finite run that diverged without a NaN: its late training loss is above its first, or its gradients died
    mid-run (G > 0 at an earlier record, 0 from then on: units a large step pushed into saturation). Names the
    step it began and the layer stepping hardest (update_weight_ratio) there."""
    curve = loss_curve(run)
    died = _died_layers(run)
    if curve and curve["loss_rise"] > T.LOSS_RISE.value:
        loss = run_series(run, "loss")
        began = int(loss.index[np.argmax(loss.to_numpy() > curve["loss_first"])])
        what = (f"its late training loss {number(curve['loss_late'])} is above its first "
                f"{number(curve['loss_first'])} (×{curve['loss_rise']:.3g}); the loss first rose above its start at "
                f"step {began}")
        evidence: dict[str, float | str] = {"loss_first": curve["loss_first"], "loss_late": curve["loss_late"],
                                            "loss_rise_max": T.LOSS_RISE.value}
    elif died:
        began = min(died.values())
        what = (f"the gradients of {_names(list(died))} died at step {began} and stayed 0 (G > 0 before): a large "
                "step saturated their units")
        evidence = {"layers_died": float(len(died))}
    else:
        return []
    layer, peak = _largest_step(run, began)
    where = f"; {layer} took the largest step up to there (‖ΔW‖/‖W‖ = {number(peak)})" if layer else ""
    evidence |= {"began_step": float(began), **({"layer": layer, "update_weight_ratio": peak} if layer else {})}
    return [Finding("diverged", "warning", f"The run diverged: {what}{where}.", evidence,
                    "Lower the learning rate (a tenth is a start); for LoRA, α/r scales every step as well.")]


def _died_layers(run: Run) -> dict[str, int]:
    """{layer: step} for layers whose gradient norm was > 0 at an earlier record and is 0 from ``step`` on."""
    rows = run.rows("grad_norm")
    rows = rows[rows["layer"] != RUN_LAYER].sort_values("step")
    died = {}
    for layer, group in rows.groupby("layer", sort=False):
        alive = group["value"].to_numpy(dtype="float64") > T.DEAD_GRAD_NORM.value
        if alive.any() and not alive[-1]:
            last_alive = np.flatnonzero(alive)[-1]
            died[str(layer)] = int(group["step"].iloc[last_alive + 1])
    return died


def _largest_step(run: Run, until: int) -> tuple[str, float]:
    """The layer with the largest ‖ΔW‖/‖W‖ recorded at or before step ``until`` (the first record if none)."""
    ratio = run.rows("update_weight_ratio")
    ratio = ratio[np.isfinite(ratio["value"].to_numpy(dtype="float64"))]
    if not len(ratio):
        return "", math.nan
    before = ratio[ratio["step"] <= until]
    rows = before if len(before) else ratio[ratio["step"] == ratio["step"].min()]
    best = rows.loc[rows["value"].idxmax()]
    return str(best["layer"]), float(best["value"])


def step_size(run: Run, values: LayerValues) -> list[Finding]:
    """Steps beyond what the learning rate accounts for (update_lr_ratio), then steps too large for the run:
    a loss that rose above its start mid-run, or late steps large against the weights while the loss no
    longer falls."""
    findings = []
    ratios = values.late("update_lr_ratio")
    bound = _step_bound(run)
    over = ratios[ratios > bound]
    if len(over):
        worst = _worst(over, lowest=False)
        why = {"loft": "LoFT's full-space step obeys this bound by construction: this is a fault to report, "
                       "with the run directory.",
               "lora": "LoRA's step in the weights scales with α/r and the other factor's size: lower α (or "
                       "the learning rate).",
               }.get(run.method, "No Adam-like optimizer steps this far: check the optimizer and its settings.")
        findings.append(Finding(
            "step_too_large", "warning",
            f"{len(over)} of {len(ratios)} layers step more than {bound:.3g}× their learning rate's scale "
            f"(late ‖ΔW‖/(lr·sqrt(mn))): {_listing(worst, len(over))}.",
            {"bound": bound, "layers_over": float(len(over)), "layers": float(len(ratios)), **worst}, why))
        return findings
    curve = loss_curve(run)
    if curve.get("loss_mid", -math.inf) > curve.get("loss_first", math.inf):
        return [Finding(
            "lr_too_high", "warning",
            f"The training loss rose above its start in the middle of the run (median {number(curve['loss_mid'])} "
            f"against {number(curve['loss_first'])} at the first step) before coming back to "
            f"{number(curve['loss_late'])}: the steps are too large for this run.",
            {"loss_first": curve["loss_first"], "loss_mid": curve["loss_mid"], "loss_late": curve["loss_late"]},
            "Lower the learning rate (a third to a tenth); for LoRA, α/r scales every step as well.")]
    ratio = values.late("update_weight_ratio")
    high = ratio[ratio > T.UPDATE_WEIGHT_RATIO.value]
    above_best = curve.get("loss_above_best", math.nan)
    if len(high) and above_best > T.LOSS_ABOVE_BEST.value:
        worst = _worst(high, lowest=False)
        findings.append(Finding(
            "lr_too_high", "warning",
            f"{len(high)} of {len(ratio)} layers still change by more than {T.UPDATE_WEIGHT_RATIO.value:.0%} of "
            f"their weight per step late in the run (median ‖ΔW‖/‖W‖), and the late loss is {above_best:.3g}× the "
            f"best it reached: {_listing(worst, len(high))}.",
            {"threshold": T.UPDATE_WEIGHT_RATIO.value, "loss_above_best": above_best,
             "loss_above_best_max": T.LOSS_ABOVE_BEST.value, "layers_over": float(len(high)),
             "layers": float(len(ratio)), **worst},
            "The learning rate is likely too high: try a third to a tenth of it and compare the held-out loss."))
    return findings


def _step_bound(run: Run) -> float:
    """The largest late update_lr_ratio a healthy run of this method shows: Adam's K(∞) for full fine-tuning
    and LoFT (a bound every such step obeys), an empirical limit for LoRA (no bound exists)."""
    if run.method == "lora":
        return T.LORA_STEP_LR_RATIO.value
    betas = tuple((run.meta.get("hyperparameters") or {}).get("betas") or (0.9, 0.999))
    return max(T.STEP_LR_RATIO.value, adam_ratio_bound(10**6, betas) if len(betas) == 2 else 0.0)


def undertrained(run: Run, values: LayerValues) -> list[Finding]:
    """The loss still falls steeply at the end: the run stopped early, or its steps are too small."""
    curve = loss_curve(run)
    falling = curve.get("loss_falling", math.nan)
    if not T.LOSS_STILL_FALLING.value < falling <= 1.0:  # above 1: the loss spiked mid-run (lr_too_high)
        return []
    steps = int(run.last_step)
    lr = run_series(run, "lr")
    return [Finding(
        "undertrained", "warning",
        f"The training loss is still falling at the end: {falling:.0%} of its whole drop came in the last two "
        f"thirds' difference (median {number(curve['loss_mid'])} → {number(curve['loss_late'])}) after {steps} "
        "steps.",
        {"loss_falling": falling, "threshold": T.LOSS_STILL_FALLING.value, "steps": float(steps),
         **({"lr_last": float(lr.iloc[-1])} if len(lr) else {})},
        "Train longer, or raise the learning rate (for LoRA, α/r scales the steps too); the other findings "
        "describe a run that has not settled.")]


def _dead_layers(values: LayerValues) -> list[str]:
    """Layers whose late gradient norm is exactly 0 (the captured G, else the factor gradients)."""
    norms = values.late("grad_norm")
    if not len(norms):
        norms = values.late("factor_grad_norm")
    return [str(layer) for layer, value in norms.items() if value <= T.DEAD_GRAD_NORM.value]


def dead_gradients(run: Run, values: LayerValues) -> list[Finding]:
    """Layers whose gradient is exactly zero late in the run and never was otherwise: nothing reaches them
    (the ones that died mid-run are the divergence finding's)."""
    died = _died_layers(run)
    dead = [layer for layer in _dead_layers(values) if layer not in died]
    if not dead:
        return []
    return [Finding(
        "dead_gradients", "warning",
        f"{len(dead)} layer{'s' * (len(dead) > 1)} get a zero gradient (G = 0) at every recorded step: {_names(dead)}; "
        "their alignment metrics are undefined and missing from the record.",
        {"layers_dead": float(len(dead)), "layers": ", ".join(dead[:T.WORST_SHOWN])},
        "Check that these layers are used in the forward pass (a zeroed or detached input, a masked output); "
        "a learning rate far too high can also saturate units before the first record.")]


def _frozen_factors(values: LayerValues) -> list[str]:
    """"layer (A)" / "layer (B)" for factors that have not moved since attach, in layers whose gradient is alive
    (a dead gradient explains a still factor)."""
    dead = set(_dead_layers(values))
    out = []
    for factor in ("a", "b"):
        moved = values.last(f"factor_{factor}_change_norm")
        out += [f"{layer} ({factor.upper()})" for layer, value in moved.items() if value == 0.0 and layer not in dead]
    return out


def frozen_factor(run: Run, values: LayerValues) -> list[Finding]:
    """A LoRA factor that has not moved since attach, ‖A_t − A_0‖ = 0 (or B)."""
    frozen = _frozen_factors(values)
    if not frozen:
        return []
    b_frozen = any(name.endswith("(B)") for name in frozen)
    text = (" With B frozen at its initial value the update s·B·A stays what B allows (PEFT's B = 0: none)."
            if b_frozen else " Freezing A (LoRA-FA) is a choice; if it was not yours, check requires_grad and "
                             "the optimizer's param groups.")
    return [Finding(
        "frozen_factor", "warning",
        f"{len(frozen)} LoRA factor{'s' * (len(frozen) > 1)} never moved since attach: {_names(frozen)}.{text}",
        {"factors_frozen": float(len(frozen)), "factors": ", ".join(frozen[:T.WORST_SHOWN])},
        "Make both factors trainable and give them to the optimizer (model.named_parameters() with "
        "requires_grad=True).")]


# ---------------------------------------------------------------------------------------------- where the gap comes from
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
    worst = _worst(limited, lowest=False)
    evidence = {"residual_min": T.RESIDUAL_HIGH.value, "layers_limited": float(len(limited)),
                "layers": float(len(residual)), **worst}
    ranks_used = sorted({rank[layer] for layer in limited.index})
    higher = f" (e.g. rank {2 * ranks_used[0]})" if len(ranks_used) == 1 else ""
    said = (f"{len(limited)} of {len(residual)} adapter layers cannot reach most of their gradient (late tangent "
            f"residual ≥ {T.RESIDUAL_HIGH.value}) and use every direction their rank gives (r90 = rank): "
            f"{_listing(worst, len(limited))}.")
    if len(limited) >= T.RANK_LAYER_FRACTION.value * len(residual):
        return [Finding("rank_too_low", "warning", said, evidence,
                        f"The rank limits the run: raise it{higher}. No optimizer can step where the subspace "
                        "cannot go.")]
    return [Finding("gap_from_subspace", "warning", said, evidence,
                    f"These layers need more rank than the others: raise it for them{higher}.")]


def optimizer_state(run: Run, values: LayerValues) -> list[Finding]:
    """LoFT's moment against the shadow's projected onto the adapter: off by more than its own size, whatever
    the residual (the projection already leaves out what the subspace cannot hold)."""
    errors = values.late("shadow_m_proj_rel_error")
    errors = errors[~errors.index.isin(_dead_layers(values))]  # G = 0: the shadow's moment decays, LoFT's is 0
    off = errors[errors > T.PROJ_REL_ERROR.value]
    if not len(off):
        return []
    worst = _worst(off, lowest=False)
    hyper = run.meta.get("hyperparameters") or {}
    changed = [f"{name}={hyper[name]!r}" for name, default in LoFT.switches().items()
               if name in hyper and hyper[name] != default]
    advice = (f"This run changed LoFT's defaults ({', '.join(changed)}): the defaults keep the moments aligned "
              "with full fine-tuning's." if changed else
              "Every LoFT switch is at its default: check the learning rate against full fine-tuning's, and "
              "report the run if it persists.")
    return [Finding(
        "optimizer_state", "warning",
        f"In {len(off)} of {len(errors)} layers the optimizer's first moment is off from full fine-tuning's "
        f"within the adapter's subspace (late ‖M̂ − proj M_shadow‖/‖proj M_shadow‖ > {T.PROJ_REL_ERROR.value}): "
        f"{_listing(worst, len(off))}.",
        {"threshold": T.PROJ_REL_ERROR.value, "layers_off": float(len(off)), "layers": float(len(errors)),
         **({"changed": ", ".join(changed)} if changed else {}), **worst}, advice)]


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
         "rank_spare_fraction": T.RANK_SPARE.value, **_worst(r90, lowest=False)},
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


def loss_gap(run: Run, reference: Run, explained: bool) -> list[Finding]:
    """The run's final loss against the reference's, as a share of what the reference gained from the start
    (an absolute floor: two converged runs at 1e-8 and 1e-9 do not differ). Says when the reference has not
    converged, and never calls a shorter run better. ``explained``: another warning already names a cause."""
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
    if len(start) >= 3 and gain > 0:
        last_drop = (float(start.iloc[-2]) - ref_value) / gain
        evidence["reference_still_falling"] = last_drop
        if last_drop > T.REFERENCE_STILL_FALLING.value:
            notes.append(f"{reference.name} itself has not converged (its {metric} still fell by {last_drop:.0%} "
                         "of its gain in its last evaluation interval): train it longer for a fair reference")
    if step < ref_step:
        notes.append(f"{run.name} ran {step} steps against {reference.name}'s {ref_step}: a shorter run is "
                     "compared at its own end")
    shortfall = (value - ref_value) / gain if gain > 0 else math.nan
    evidence["shortfall"], evidence["shortfall_max"] = shortfall, T.GAP_SHORTFALL.value
    said = (f"Final {metric} {number(value)} against {reference.name}'s {number(ref_value)} (from {number(start_value)} "
            f"at the start)")
    tail = ("; ".join(notes) + ".") if notes else ""
    if shortfall > T.GAP_SHORTFALL.value:
        cause = ("" if explained else " Nothing else in the record names a cause"
                 + (": LoRA's factor moments cannot be compared with full fine-tuning's, so an optimizer-state gap "
                    "would not show; a LoFT run of the same rank tells" if run.method == "lora" else "") + ".")
        return [Finding("loss_gap", "warning",
                        f"{said}: {shortfall:.0%} of the reference's gain is missing.{cause} {tail}".strip(),
                        evidence, "The other findings say where the gap comes from; a learning rate tuned for "
                                  "this method matters too.")]
    verdict = ("no worse than the reference" if shortfall <= 0 and step >= ref_step
               else f"within {T.GAP_SHORTFALL.value:.0%} of the reference's gain")
    return [Finding("loss_gap", "info", f"{said}: {verdict}. {tail}".strip(), evidence,
                    "No loss gap to close; compare task metrics before calling the methods equal.")]


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
    mine = at[at["method"] == run.name]
    theirs = at[at["method"] == reference.name]
    total, ref_total = int(mine["value"].sum()), int(theirs["value"].sum())
    if total <= ref_total:
        return []
    counts = pd.Series(mine["value"].to_numpy(), index=mine["layer"].astype(str).to_numpy())
    present = counts[counts > 0]
    worst = _worst(present, lowest=False)
    return [Finding(
        "intruders", "info",
        f"{total} intruder dimension{'s' * (total != 1)} in {len(present)} layers at step {step} against "
        f"{reference.name}'s {ref_total}: {_listing(worst, len(present))}.",
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
            missing["subspace (tangent residual) check"] = "capture_grad=True (implied by shadow=True)"
    if not values.has("delta_r90") and not run.snapshot_steps:
        missing["rank checks"] = "a snapshot (every 4th recorded step, and the last one when the probe closes)"
    if not values.has("update_lr_ratio") and values.has("update_norm"):
        missing["step-size checks"] = "a probe of this version (update_lr_ratio)"
    if not missing:
        return []
    return [Finding("not_recorded", "info", "Skipped for lack of metrics: " + "; ".join(missing) + ".",
                    dict(missing), "Record them with " + "; ".join(sorted(set(missing.values()))) + ".")]
