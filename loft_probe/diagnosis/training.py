"""Checks that training itself went wrong: divergence, steps out of scale, a run stopped early, dead gradients,
frozen factors. Each compares one quantity of the record with one threshold of
:mod:`loft_probe.diagnosis.thresholds`; per-layer metrics are late values (:mod:`loft_probe.diagnosis.reading`).
"""

from __future__ import annotations

import math

import numpy as np

from loft_probe.diagnosis import held_out as held_out_curve
from loft_probe.diagnosis import thresholds as T
from loft_probe.diagnosis.finding import Finding, layer_listing, name_list, number, worst_layers
from loft_probe.diagnosis.reading import LayerValues, drop_share, run_series
from loft_probe.optim.functional import adam_ratio_bound
from loft_probe.run import RUN_LAYER, Run
from loft_probe.run.series import late_slice


def loss_curve(run: Run) -> dict[str, float]:
    """The training loss's start, late value (median of the last third), the median of the middle third,
    the best (lowest median of ten windows), and ``falling``: (middle − late)/(first − late), the share of the
    whole drop still happening at the end."""
    loss = run_series(run, "loss")
    loss = loss[np.isfinite(loss.to_numpy())]
    if len(loss) < 3:
        return {}
    n = len(loss)
    first = float(loss.iloc[0])  # not a median: an optimizer that blows up does so in the first steps
    mid, late = float(loss.iloc[n // 3: n - n // 3].median()), float(loss[late_slice(loss.index.to_numpy())].median())
    window = max(1, n // 10)
    best = min(float(loss.iloc[i:i + window].median()) for i in range(0, n - window + 1, window))
    out = {"loss_first": first, "loss_mid": mid, "loss_late": late, "loss_best": best,
           "loss_rise": late / first if first else math.nan,
           "loss_above_best": late / best if best > 0 else math.nan}
    out["loss_falling"] = drop_share(first, mid, late)
    return out


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
    where = f", in layer{'s' * (len(layers) > 1)} {name_list(layers)}" if layers else ""
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


def loss_rose(run: Run, values: LayerValues, collapse: bool = True) -> list[Finding]:
    """A finite run that diverged without a NaN: its late training loss is above its first (or its last held-out
    loss above its first, by the same LOSS_RISE), or its gradients died mid-run (G > 0 at an earlier record, 0
    from then on: units a large step pushed into saturation), or (with ``collapse``) its loss never fell although
    its steps were large. Names the step it began and the layer stepping hardest (update_weight_ratio) there.
    ``collapse=False`` where a dead or frozen factor explains a loss that never fell."""
    curve = loss_curve(run)
    died = died_layers(run)
    if curve and curve["loss_rise"] > T.LOSS_RISE.value:
        loss = run_series(run, "loss")
        began = int(loss.index[np.argmax(loss.to_numpy() > curve["loss_first"])])
        what = (f"its late training loss {number(curve['loss_late'])} is above its first "
                f"{number(curve['loss_first'])} (×{curve['loss_rise']:.3g}); the loss first rose above its start at "
                f"step {began}")
        evidence: dict[str, float | str] = {"loss_first": curve["loss_first"], "loss_late": curve["loss_late"],
                                            "loss_rise_max": T.LOSS_RISE.value}
    elif worse := held_out_curve.diverged(run):
        began = int(worse.pop("began_step"))
        training = f" (its training loss ×{curve['loss_rise']:.3g} its first)" if math.isfinite(
            curve.get("loss_rise", math.nan)) else ""
        what = (f"its final held-out loss {number(worse['eval_last'])} is above its first "
                f"{number(worse['eval_first'])} (×{worse['eval_rise']:.3g}){training}: it left the model worse than "
                f"it found it; the held-out loss first rose above its start at step {began}")
        evidence = worse | {"eval_rise_max": T.LOSS_RISE.value}
    elif collapse and curve and curve["loss_late"] >= T.LOSS_NOT_FALLEN.value * curve["loss_first"] and (
            peak := _peak_step(run)) > T.UPDATE_WEIGHT_RATIO_PEAK.value:
        began = int(run_series(run, "loss").index[0])
        what = (f"its steps reached {peak:.1%} of the weights and the loss never fell below its start "
                f"({number(curve['loss_first'])} → {number(curve['loss_late'])}): it collapsed")
        evidence = {"update_weight_ratio_peak": peak, "peak_max": T.UPDATE_WEIGHT_RATIO_PEAK.value}
    elif died:
        began = min(died.values())
        what = (f"the gradients of {name_list(list(died))} died at step {began} and stayed 0 (G > 0 before): a large "
                "step saturated their units")
        evidence = {"layers_died": float(len(died))}
    else:
        return []
    layer, peak = _largest_step(run, began)
    where = f"; {layer} took the largest step up to there (‖ΔW‖/‖W‖ = {number(peak)})" if layer else ""
    evidence |= {"began_step": float(began), **({"layer": layer, "update_weight_ratio": peak} if layer else {})}
    return [Finding("diverged", "warning", f"The run diverged: {what}{where}.", evidence,
                    "Lower the learning rate (a tenth is a start); for LoRA, α/r scales every step as well.")]


def _peak_step(run: Run) -> float:
    """The largest ‖ΔW‖/‖W‖ any layer recorded at any step (NaN when none)."""
    ratio = run.rows("update_weight_ratio")["value"].to_numpy(dtype="float64")
    ratio = ratio[np.isfinite(ratio)]
    return float(ratio.max()) if len(ratio) else math.nan


def died_layers(run: Run) -> dict[str, int]:
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
    a loss that rose above its start mid-run, both losses worse at the end (or the held-out one above its
    start, or rising from its best with large steps or a training loss that cannot settle), a held-out loss that
    jumped above its start before the model learned, or late steps large against the weights while the loss no
    longer falls."""
    findings = []
    ratios = values.late("update_lr_ratio")
    bound = _step_bound(run)
    over = ratios[ratios > bound]
    if len(over):
        worst = worst_layers(over, lowest=False)
        why = {"loft": "LoFT's full-space step obeys this bound by construction: this is a fault to report, "
                       "with the run directory.",
               "lora": "LoRA's step in the weights scales with α/r and the other factor's size: lower α (or "
                       "the learning rate).",
               }.get(run.method, "No Adam-like optimizer steps this far: check the optimizer and its settings.")
        findings.append(Finding(
            "step_too_large", "warning",
            f"{len(over)} of {len(ratios)} layers step more than {bound:.3g}× their learning rate's scale "
            f"(late ‖ΔW‖/(lr·sqrt(mn))): {layer_listing(worst, len(over))}.",
            {"bound": bound, "layers_over": float(len(over)), "layers": float(len(ratios)), **worst}, why))
        return findings
    curve = loss_curve(run)
    if curve.get("loss_mid", -math.inf) > T.LOSS_RISE.value * curve.get("loss_first", math.inf):
        return [Finding(
            "lr_too_high", "warning",
            f"The training loss rose above its start in the middle of the run (median {number(curve['loss_mid'])} "
            f"against {number(curve['loss_first'])} at the first step) before coming back to "
            f"{number(curve['loss_late'])}: the steps are too large for this run.",
            {"loss_first": curve["loss_first"], "loss_mid": curve["loss_mid"], "loss_late": curve["loss_late"]},
            "Lower the learning rate (a third to a tenth); for LoRA, α/r scales every step as well.")]
    ratio = values.late("update_weight_ratio")
    if worse := held_out_curve.worse_at_the_end(run, late_step_ratio(values), curve.get("loss_above_best", math.nan)):
        return worse
    if jumped := held_out_curve.spiked(run):
        return jumped
    high = ratio[ratio > T.UPDATE_WEIGHT_RATIO.value]
    above_best = curve.get("loss_above_best", math.nan)
    if len(high) and above_best > T.LOSS_ABOVE_BEST.value:
        worst = worst_layers(high, lowest=False)
        findings.append(Finding(
            "lr_too_high", "warning",
            f"{len(high)} of {len(ratio)} layers still change by more than {T.UPDATE_WEIGHT_RATIO.value:.0%} of "
            f"their weight per step late in the run (median ‖ΔW‖/‖W‖), and the late loss is {above_best:.3g}× the "
            f"best it reached: {layer_listing(worst, len(high))}.",
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


def loft_steps_short(run: Run, values: LayerValues) -> float:
    """The largest late ‖ΔW‖/(lr·sqrt(mn)) of a LoFT run whose loss has not fallen, when every layer (with a
    live gradient) stays under UPDATE_LR_SHORT: LoFT's step is Adam's, projected, so at a normal lr it takes
    steps of the lr's scale; far below it, the optimizer, not the lr, keeps the run still. NaN otherwise."""
    if run.meta.get("method") != "loft":
        return math.nan
    curve = loss_curve(run)
    ratios = values.late("update_lr_ratio")
    ratios = ratios[~ratios.index.isin(dead_layers(values))]
    if not curve or curve["loss_late"] < T.LOSS_NOT_FALLEN.value * curve["loss_first"] or not len(ratios):
        return math.nan
    largest = float(ratios.max())
    return largest if largest < T.UPDATE_LR_SHORT.value else math.nan


def undertrained(run: Run, values: LayerValues) -> list[Finding]:
    """The loss still falls steeply at the end: the run stopped early, or its steps are too small."""
    curve = loss_curve(run)
    falling = curve.get("loss_falling", math.nan)
    steps = int(run.last_step)
    lr = run_series(run, "lr")
    evidence_lr = {"lr_last": float(lr.iloc[-1])} if len(lr) else {}
    moved = values.late("update_weight_ratio")
    not_fallen = bool(curve) and curve["loss_late"] >= T.LOSS_NOT_FALLEN.value * curve["loss_first"]
    if not_fallen and not (len(moved) and moved.max() < T.UPDATE_TINY.value):
        flat = held_out_curve.flattened(run)
        why = "the run stopped before it started to learn." if not flat else (
            "either the run stopped early or its data give little more to learn: its held-out loss fell beyond its "
            f"noise ({number(flat['eval_first'])} → {number(flat['eval_last'])}) and has stopped falling, and these "
            "records cannot tell the two apart.")
        return [Finding(  # an info where the records cannot tell: a reference can (gap.stopped_early)
            "undertrained", "info" if flat else "warning",
            f"The training loss has not fallen after {steps} steps ({number(curve['loss_first'])} → "
            f"{number(curve['loss_late'])}) while the steps are of a normal size: {why}",
            {"loss_first": curve["loss_first"], "loss_late": curve["loss_late"], "steps": float(steps),
             **evidence_lr, **flat},
            "Train once for twice the steps and compare the held-out loss: if it does not improve, the run is done."
            if flat else "Train longer (or raise the learning rate); compare with a run of the reference's length.")]
    if not_fallen:
        return [Finding(
            "undertrained", "warning",
            f"The run barely moves: every layer changes by less than {T.UPDATE_TINY.value:.0e} of its weight per "
            f"step late in the run (largest {moved.max():.2g}), and the loss stayed near its start "
            f"({number(curve['loss_first'])} → {number(curve['loss_late'])}).",
            {"update_weight_ratio_max": float(moved.max()), "threshold": T.UPDATE_TINY.value, **evidence_lr},
            "The learning rate (or, for LoRA, α/r) is far too small for this model: raise it tenfold and compare.")]
    if not T.LOSS_STILL_FALLING.value < falling <= 1.0:  # above 1: the loss spiked mid-run (lr_too_high)
        return []
    held_out = held_out_curve.still_falling(run)
    if held_out <= T.HELD_OUT_STILL_FALLING.value:  # a model memorising its data: held-out is what counts
        return []
    said = f"; the held-out loss gained {held_out:.0%} of its whole drop in the second half" if held_out >= 0 else ""
    return [Finding(
        "undertrained", "warning",
        f"The training loss is still falling at the end: between the middle and the last third of the run it fell "
        f"by another {falling:.0%} of its whole drop (median {number(curve['loss_mid'])} → "
        f"{number(curve['loss_late'])}), after {steps} steps{said}.",
        {"loss_falling": falling, "threshold": T.LOSS_STILL_FALLING.value, "steps": float(steps), **evidence_lr,
         **({"held_out_second_half": held_out} if held_out >= 0 else {})},
        "Train longer, or raise the learning rate (for LoRA, α/r scales the steps too); the other findings "
        "describe a run that has not settled.")]


def dead_layers(values: LayerValues) -> list[str]:
    """Layers whose late gradient norm is exactly 0 (the captured G, else the factor gradients)."""
    norms = values.late("grad_norm")
    if not len(norms):
        norms = values.late("factor_grad_norm")
    return [str(layer) for layer, value in norms.items() if value <= T.DEAD_GRAD_NORM.value]


def dead_gradients(run: Run, values: LayerValues) -> list[Finding]:
    """Layers whose gradient is exactly zero late in the run and never was otherwise: nothing reaches them
    (the ones that died mid-run are the divergence finding's)."""
    died = died_layers(run)
    dead = [layer for layer in dead_layers(values) if layer not in died]
    if not dead:
        return []
    return [Finding(
        "dead_gradients", "warning",
        f"{len(dead)} layer{'s' * (len(dead) > 1)} get a zero gradient (G = 0) at every recorded step: "
        f"{name_list(dead)}; their alignment metrics are undefined and missing from the record.",
        {"layers_dead": float(len(dead)), "layers": ", ".join(dead[:T.WORST_SHOWN])},
        "Check that these layers are used in the forward pass (a zeroed or detached input, a masked output); "
        "a learning rate far too high can also saturate units before the first record.")]


def frozen_factors(values: LayerValues) -> list[str]:
    """"layer (A)" / "layer (B)" for factors that have not moved since attach, in layers whose gradient is alive
    (a dead gradient explains a still factor)."""
    dead = set(dead_layers(values))
    out = []
    for factor in ("a", "b"):
        moved = values.last(f"factor_{factor}_change_norm")
        out += [f"{layer} ({factor.upper()})" for layer, value in moved.items() if value == 0.0 and layer not in dead]
    return out


def frozen_factor(run: Run, values: LayerValues) -> list[Finding]:
    """A LoRA factor that has not moved since attach, ‖A_t − A_0‖ = 0 (or B)."""
    frozen = frozen_factors(values)
    if not frozen:
        return []
    b_frozen = any(name.endswith("(B)") for name in frozen)
    text = (" With B frozen at its initial value the update s·B·A stays what B allows (PEFT's B = 0: none)."
            if b_frozen else " Freezing A (LoRA-FA) is a choice; if it was not yours, check requires_grad and "
                             "the optimizer's param groups.")
    return [Finding(
        "frozen_factor", "warning",
        f"{len(frozen)} LoRA factor{'s' * (len(frozen) > 1)} never moved since attach: {name_list(frozen)}.{text}",
        {"factors_frozen": float(len(frozen)), "factors": ", ".join(frozen[:T.WORST_SHOWN])},
        "Make both factors trainable and give them to the optimizer (model.named_parameters() with "
        "requires_grad=True).")]


def late_step_ratio(values: LayerValues) -> float:
    """The late steps' size against the weights: the median over layers of the late ‖ΔW‖/‖W‖ (NaN without any)."""
    ratio = values.late("update_weight_ratio")
    return float(ratio.median()) if len(ratio) else math.nan
