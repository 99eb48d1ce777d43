"""Plain-language findings about one run: where, and why, it steps differently from full fine-tuning.

    from loft_probe import load_run
    from loft_probe.diagnosis import diagnose, format_findings

    findings = diagnose(load_run("runs/lora"), reference=load_run("runs/full"))
    print(format_findings(findings))

Every check reads the run's own metrics (the vocabulary of `loft_probe.probe.rundir.METRICS`). Per-step
metrics are taken as each layer's median over the last third of its recorded steps: late enough that the
optimizer's moments have warmed up, and a median so that one noisy minibatch does not decide. Snapshot
metrics (intruders, delta_r90) are taken at the last snapshot. Given a reference run (normally the full
fine-tuning run of the same task and seed), the loss gap and the reference's intruder count come from
`loft_probe.comparison.compare`. A check whose metrics the run lacks is skipped, and one `not_recorded`
finding says which switch records them; a run with no rows at all gets only that finding.

Findings (code: when):
    diverged              warning  the loss or an update is NaN/Inf at the run's last recorded steps: the run
                                   diverged at step k (named, with its layers); every other finding predates it
    nonfinite_steps       warning  NaN/Inf gradients, losses or skipped steps at some steps, finite again later
    not_recorded          info     a check was skipped for lack of metrics (no shadow, no gradient capture, ...)
    update_misaligned     warning  layers whose update points away from the shadow full fine-tuning step
    rank_too_low          warning  the tangent residual is high in most adapter layers: the run's rank limits it
    gap_from_subspace     warning  the tangent residual is high in some adapter layers only
    gap_from_optimizer    warning  the residual is modest, yet the optimizer state (or, for LoRA, the step) is off
    factor_moments        info / warning  LoRA keeps no full-space moments; its factor moments vs the gradient
    rank_more_than_needed info     ΔW holds 90% of its energy in far fewer directions than the rank allows
    intruders             info / warning  intruder dimensions at the last snapshot (vs the reference's)
    loss_gap              info / warning  late training loss against the reference run's

Thresholds (module constants):

    name                    value  why
    UPDATE_COSINE_MIN       0.5    cos(ΔW, shadow step) < 0.5 (over 60° apart): less than half of the step's
                                   length goes the way full fine-tuning would go from the same point.
    RESIDUAL_TANGENT_HIGH   0.5    ‖residual‖/‖G‖ > 0.5: over a quarter (0.5²) of the gradient's energy lies
                                   where no step of the adapter can go, whatever its optimizer does.
    PROJ_COSINE_MIN         0.9    cos(M̂, proj M_shadow) < 0.9 (over 26° apart): within the directions the
                                   adapter can express, the first moment already disagrees with the shadow's.
    PROJ_REL_ERROR_MAX      0.5    ‖M̂ − proj M_shadow‖/‖proj M_shadow‖ > 0.5: the moment is off by more than
                                   half its own size there (a wrong length counts, not only a wrong angle).
    MOMENT_GRAD_COSINE_MIN  0.3    LoRA's cos(factor moments, factor gradients) < 0.3: full fine-tuning keeps
                                   its cos(M, G) near 0.7–0.9 on the built-in tasks; this low, the factor
                                   moments mostly remember gradients taken in bases that have since moved.
    RANK_LAYER_FRACTION     0.5    rank_too_low (rather than gap_from_subspace) once at least half of the
                                   adapter layers are subspace-limited: then the limit is the run's rank.
    RANK_SPARE_FRACTION     0.25   rank_more_than_needed when every layer's r90 is at most a quarter of its
                                   rank: half the rank would still hold 90% of ΔW with room to spare.
    LOSS_GAP_REL_MAX        0.1    late training loss more than 10% above the reference's is a real gap;
                                   below it, minibatch noise and learning-rate choice can explain it.
    WORST_SHOWN             3      layers named in a finding's evidence, worst first.
An intruder count above 0 is always reported (the count itself is taken at ε = 0.5 by the probe).
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from loft_probe.comparison import compare
from loft_probe.probe.rundir import RUN_LAYER, Run

UPDATE_COSINE_MIN = 0.5
RESIDUAL_TANGENT_HIGH = 0.5
PROJ_COSINE_MIN = 0.9
PROJ_REL_ERROR_MAX = 0.5
MOMENT_GRAD_COSINE_MIN = 0.3
RANK_LAYER_FRACTION = 0.5
RANK_SPARE_FRACTION = 0.25
LOSS_GAP_REL_MAX = 0.1
WORST_SHOWN = 3

Severity = Literal["info", "warning"]
_LOFT_SWITCHES = {  # meta hyperparameter: (its default, the run flag that turns it off)
    "alternating": (True, "--no-alternating"),
    "scale_gradients": (True, "--no-scale-gradients"),
    "transport": (True, "--no-transport"),
    "second_moment": ("full", "--second-moment simple"),
    "projected_update": (True, "--no-projected-update"),
}


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about a run, with the numbers behind it and what to try.

    evidence: the thresholds and counts the finding was decided on, then up to `WORST_SHOWN` layers by
    name (worst first) with their values.
    """

    code: str  # stable identifier, e.g. "update_misaligned"
    severity: Severity  # "warning": likely hurts the run; "info": worth knowing
    title: str  # one sentence with the key numbers
    evidence: dict[str, float | str]
    suggestion: str  # what to try, or what to turn on


def diagnose(run: Run, reference: Run | None = None) -> list[Finding]:
    """Findings for one run from its own metrics, and against `reference` (a full run) when given.

    Warnings come first, then infos, each in the order of the module docstring's table.

    Raises:
        loft_probe.comparison.IncompatibleRunsError, RunSelectionError: the reference does not compare with
            the run (different seed, data order, base weights; the same name).
    """
    if not len(run.metrics):
        return _not_recorded(run, None)
    late = _LateMedians(run)
    frame = None
    if reference is not None:
        frame = compare([run, reference], reference=reference)
    findings = _nonfinite(run)
    findings += _not_recorded(run, late)
    findings += _update_alignment(late)
    findings += _gap_source(run, late)
    findings += _factor_moments(run, late)
    findings += _rank_spare(run, late)
    findings += _intruders(run, reference, frame)
    findings += _loss_gap(run, reference, frame)
    return sorted(findings, key=lambda f: f.severity != "warning")  # stable: the check order stays


# ---------------------------------------------------------------------------------------------- reading
class _LateMedians:
    """Each layer's median of a metric over the last third of that layer's recorded steps, in meta order."""

    def __init__(self, run: Run) -> None:
        self.run = run
        rows = run.metrics[run.metrics["layer"] != RUN_LAYER]
        self._rows = rows[np.isfinite(rows["value"].to_numpy(dtype="float64"))]
        self._order = [str(layer["name"]) for layer in run.meta["layers"]]
        self._cache: dict[str, pd.Series] = {}

    def has(self, metric: str) -> bool:
        return bool((self._rows["metric"] == metric).any())

    def __call__(self, metric: str) -> pd.Series:
        if metric not in self._cache:
            rows = self._rows[self._rows["metric"] == metric]
            medians = {}
            for layer, group in rows.groupby("layer", sort=False):
                steps = sorted(group["step"].unique())
                first = steps[len(steps) - math.ceil(len(steps) / 3)]
                medians[str(layer)] = float(group.loc[group["step"] >= first, "value"].median())
            self._cache[metric] = _in_order(pd.Series(medians, dtype="float64"), self._order)
        return self._cache[metric]

    def adapter_layers(self) -> list[str]:
        return [str(layer["name"]) for layer in self.run.meta["layers"] if layer.get("kind") == "lora"]


def _in_order(values: pd.Series, order: list[str]) -> pd.Series:
    """The layers in the meta table's order first, any others after."""
    known = [name for name in order if name in values.index]
    return values[known + [name for name in values.index if name not in known]]


def _last_snapshot(run: Run, metric: str) -> tuple[int, pd.Series]:
    """(step, value per layer) of a snapshot metric at its last recorded step; (0, empty) when never recorded."""
    rows = run.rows(metric)
    rows = rows[rows["layer"] != RUN_LAYER]
    if not len(rows):
        return 0, pd.Series(dtype="float64")
    step = int(rows["step"].max())
    last = rows[rows["step"] == step]
    values = pd.Series(last["value"].to_numpy(dtype="float64"), index=last["layer"].astype(str).to_numpy())
    return step, _in_order(values, [str(layer["name"]) for layer in run.meta["layers"]])


def _worst(values: pd.Series, lowest: bool) -> dict[str, float]:
    """Up to WORST_SHOWN layers, worst first, as {layer: value}."""
    ordered = values.sort_values(ascending=lowest, kind="stable")
    return {str(layer): float(value) for layer, value in ordered.head(WORST_SHOWN).items()}


def _listing(worst: dict[str, float], total: int) -> str:
    """ "fc1 (0.41), fc2 (0.47) and 3 more" for a title."""
    text = ", ".join(f"{layer} ({_number(value)})" for layer, value in worst.items())
    return text + (f" and {total - len(worst)} more" if total > len(worst) else "")


def _is_adapter(run: Run) -> bool:
    return any(layer.get("kind") == "lora" for layer in run.meta["layers"])


def _ranks(run: Run) -> dict[str, int]:
    return {str(layer["name"]): int(layer["rank"]) for layer in run.meta["layers"]
            if isinstance(layer.get("rank"), int) and layer["rank"] > 0}


# ---------------------------------------------------------------------------------------------- checks
def _nonfinite(run: Run) -> list[Finding]:
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
                                        "metrics": what, "layers": ", ".join(layers[:WORST_SHOWN])}
    last = int(metrics["step"].max())
    last_rows = metrics[metrics["step"] == last]
    last_values = last_rows["value"].to_numpy(dtype="float64")
    if not np.isfinite(last_values).all() or _last_loss_nonfinite(run):
        evidence["last_step"] = float(last)
        return [Finding(
            "diverged", "warning",
            f"The run diverged at step {first}{where} ({what} not finite); it is still not finite at its last "
            f"recorded step {last}: findings from late medians describe the steps before it.",
            evidence, "Lower the learning rate, clip gradients (LoFT: max_grad_norm), or check the data of step "
                      f"{first}; resume from a checkpoint taken before step {first}.")]
    return [Finding(
        "nonfinite_steps", "warning",
        f"NaN/Inf at {int(evidence['steps'])} recorded step(s), the first at step {first}{where} ({what}); the "
        "later steps are finite again.",
        evidence, "Skipped steps and gradients kept out of the shadow change the comparison little; if they "
                  "repeat, lower the learning rate or check the data of those steps.")]


def _last_loss_nonfinite(run: Run) -> bool:
    loss = run.rows("loss", [RUN_LAYER])
    if not len(loss):
        return False
    return not math.isfinite(float(loss.loc[loss["step"].idxmax(), "value"]))


def _names(layers: list[str]) -> str:
    shown = ", ".join(layers[:WORST_SHOWN])
    return shown + (f" and {len(layers) - WORST_SHOWN} more" if len(layers) > WORST_SHOWN else "")


def _not_recorded(run: Run, late: _LateMedians | None) -> list[Finding]:
    """One info finding naming the checks skipped for lack of metrics, and the switch that records them."""
    if late is None or not len(run.metrics):
        return [Finding("not_recorded", "info", "The run has recorded no metrics yet: nothing to diagnose.",
                        {"path": str(run.path)},
                        "Let it reach its first recorded step (the probe's `every`), or check that the probe "
                        "is attached to the optimizer that steps.")]
    missing: dict[str, str] = {}
    if _is_adapter(run):
        if not late.has("shadow_update_cosine"):
            missing["update alignment and optimizer-state checks"] = "shadow=True (loft-probe run --shadow)"
        if not late.has("residual_tangent"):
            missing["subspace (tangent residual) check"] = "capture_grad=True (implied by shadow=True)"
    if not late.has("delta_r90"):
        missing["rank check"] = "a snapshot (every 4th recorded step, and the last one when the probe closes)"
    if not late.has("intruders"):
        missing["intruder check"] = "intruders=\"last\" or \"all\" and a closed run"
    if not missing:
        return []
    return [Finding("not_recorded", "info", "Skipped for lack of metrics: " + "; ".join(missing) + ".",
                    dict(missing), "Record them with " + "; ".join(sorted(set(missing.values()))) + ".")]


def _update_alignment(late: _LateMedians) -> list[Finding]:
    cosines = late("shadow_update_cosine")
    low = cosines[cosines < UPDATE_COSINE_MIN]
    if not len(low):
        return []
    worst = _worst(low, lowest=True)
    return [Finding(
        "update_misaligned", "warning",
        f"{len(low)} of {len(cosines)} layers step away from full fine-tuning (median cos(ΔW, shadow step) "
        f"< {UPDATE_COSINE_MIN} over the last third): {_listing(worst, len(low))}.",
        {"threshold": UPDATE_COSINE_MIN, "layers_below": float(len(low)), "layers": float(len(cosines)), **worst},
        "The findings on the subspace and the optimizer say where the gap comes from.")]


def _gap_source(run: Run, late: _LateMedians) -> list[Finding]:
    """High tangent residual: the subspace cannot express G. Modest residual but an off optimizer state: the
    optimizer (LoFT's projected-moment metrics; for LoRA, which has no full-space moments, the update cosine)."""
    adapters = late.adapter_layers()
    residual = late("residual_tangent")
    residual = residual[residual.index.isin(adapters)]
    findings = []
    high = residual[residual > RESIDUAL_TANGENT_HIGH]
    if len(high):
        worst = _worst(high, lowest=False)
        evidence = {"threshold": RESIDUAL_TANGENT_HIGH, "layers_above": float(len(high)),
                    "layers": float(len(residual)), **worst}
        ranks = sorted(set(_ranks(run).values()))
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else "the rank"
        if len(high) >= RANK_LAYER_FRACTION * len(residual):
            higher = f" (e.g. --rank {2 * ranks[0]})" if len(ranks) == 1 else ""
            findings.append(Finding(
                "rank_too_low", "warning",
                f"In {len(high)} of {len(residual)} adapter layers much of the gradient is out of the adapter's "
                f"reach (median tangent residual > {RESIDUAL_TANGENT_HIGH}): {_listing(worst, len(high))}.",
                evidence, f"{rank_text.capitalize()} limits the run: raise it{higher}. No optimizer can step "
                          "where the subspace cannot go."))
        else:
            findings.append(Finding(
                "gap_from_subspace", "warning",
                f"{len(high)} of {len(residual)} adapter layers cannot express much of their gradient (median "
                f"tangent residual > {RESIDUAL_TANGENT_HIGH}): {_listing(worst, len(high))}.",
                evidence, f"These layers need more than {rank_text}: raise the rank for them (or for the run)."))

    modest = [layer for layer in residual.index if residual[layer] <= RESIDUAL_TANGENT_HIGH]
    if run.method == "lora" or not late.has("shadow_m_proj_cosine"):
        # Factor-space Adam has no full-space moment to compare: judge the optimizer by where it steps.
        cosines = late("shadow_update_cosine")
        off = cosines[cosines.index.isin(modest) & (cosines < UPDATE_COSINE_MIN)]
        basis = f"median cos(ΔW, shadow step) < {UPDATE_COSINE_MIN}"
        evidence = {"update_cosine_min": UPDATE_COSINE_MIN}
    else:
        cosines, errors = late("shadow_m_proj_cosine"), late("shadow_m_proj_rel_error")
        bad = cosines[cosines < PROJ_COSINE_MIN].index.union(errors[errors > PROJ_REL_ERROR_MAX].index)
        off = cosines[cosines.index.isin(modest) & cosines.index.isin(bad)]
        basis = (f"median cos(M̂, proj M_shadow) < {PROJ_COSINE_MIN} or relative error > {PROJ_REL_ERROR_MAX}, "
                 "the moment against the shadow's projected onto the adapter")
        evidence = {"proj_cosine_min": PROJ_COSINE_MIN, "proj_rel_error_max": PROJ_REL_ERROR_MAX}
    if len(off):
        worst = _worst(off, lowest=True)
        findings.append(Finding(
            "gap_from_optimizer", "warning",
            f"{len(off)} adapter layers can express their gradient (tangent residual ≤ {RESIDUAL_TANGENT_HIGH}) "
            f"yet the optimizer is off within the subspace ({basis}): {_listing(worst, len(off))}.",
            {"residual_max": RESIDUAL_TANGENT_HIGH, **evidence, "layers_off": float(len(off)), **worst},
            _optimizer_advice(run)))
    return findings


def _optimizer_advice(run: Run) -> str:
    if run.method == "loft":
        hyper = run.meta.get("hyperparameters") or {}
        off = [flag for key, (default, flag) in _LOFT_SWITCHES.items() if key in hyper and hyper[key] != default]
        if off:
            return (f"This LoFT run has switched off {', '.join(off)}: run it with the defaults, which keep the "
                    "moments aligned with full fine-tuning (transport re-expresses them when the factors move).")
        return ("Every LoFT switch is on: compare an ablation (e.g. --no-alternating, --no-transport) to see "
                "which part of the state drifts, and check that the learning rate is not far above full "
                "fine-tuning's.")
    if run.method == "lora":
        return ("Plain LoRA keeps Adam's moments per factor, in bases that move every step: try LoFT "
                "(--method loft), which keeps them consistent with full fine-tuning's.")
    return "An optimizer that keeps full-space moments for the adapter (LoFT) removes this part of the gap."


def _factor_moments(run: Run, late: _LateMedians) -> list[Finding]:
    """LoRA has no full-space moments (the shadow_m_* metrics do not exist for it): say so, and use the
    factor-space cos(moment, gradient) and the update cosine instead."""
    if run.method != "lora" or not len(run.metrics):
        return []
    moment, update = late("cos_moment_grad"), late("shadow_update_cosine")
    evidence: dict[str, float | str] = {"moment_grad_cosine_min": MOMENT_GRAD_COSINE_MIN}
    if len(moment):
        evidence["median_cos_moment_grad"] = float(moment.median())
    if len(update):
        evidence["median_update_cosine"] = float(update.median())
    title = ("LoRA keeps no full-space moments: Adam's moments live on the factors A and B, so they cannot be "
             "compared with full fine-tuning's (no shadow_m_* metrics).")
    if len(moment) and moment.median() < MOMENT_GRAD_COSINE_MIN:
        worst = _worst(moment[moment < MOMENT_GRAD_COSINE_MIN], lowest=True)
        return [Finding(
            "factor_moments", "warning",
            title + f" They point away from the current gradient: median cos(moment, gradient) "
                    f"{moment.median():.2f} < {MOMENT_GRAD_COSINE_MIN} in factor space.",
            {**evidence, **worst},
            "The factor moments remember gradients taken in bases that have since moved; LoFT (--method loft) "
            "transports them when the factors move.")]
    return [Finding("factor_moments", "info", title, evidence,
                    "Judge LoRA's optimizer by cos_moment_grad (factor space) and the update cosine against the "
                    "shadow; LoFT reconstructs full-space moments that can be compared directly.")]


def _rank_spare(run: Run, late: _LateMedians) -> list[Finding]:
    """ΔW's r90 far below the rank in every layer: the rank is more than the run uses. Left out when the
    residual says the rank is too low (then a small r90 is the optimizer's doing, not a sign of spare rank)."""
    ranks = _ranks(run)
    step, r90 = _last_snapshot(run, "delta_r90")
    r90 = r90[r90.index.isin(list(ranks))]
    residual = late("residual_tangent")
    if not len(r90) or (len(residual) and (residual > RESIDUAL_TANGENT_HIGH).mean() >= RANK_LAYER_FRACTION):
        return []
    used = pd.Series({layer: r90[layer] / ranks[layer] for layer in r90.index})
    if used.max() > RANK_SPARE_FRACTION:
        return []
    largest = int(r90.max())
    rank = max(ranks[layer] for layer in r90.index)
    return [Finding(
        "rank_more_than_needed", "info",
        f"At step {step}, ΔW holds 90% of its energy in at most {largest} directions (r90) in every layer, "
        f"against rank {rank}.",
        {"step": float(step), "rank": float(rank), "max_r90": float(largest),
         "rank_spare_fraction": RANK_SPARE_FRACTION, **_worst(r90, lowest=False)},
        f"A rank near {max(1, 2 * largest)} would likely do as well for less memory; check the loss before "
        "settling on it.")]


def _intruders(run: Run, reference: Run | None, frame: pd.DataFrame | None) -> list[Finding]:
    """Layers with intruder dimensions at the last snapshot; the reference's count at the same step."""
    step, counts = _last_snapshot(run, "intruders")
    ref_counts = None
    if frame is not None:
        rows = frame[frame["metric"] == "intruders"]
        if len(rows):
            step = int(rows["step"].max())  # the last snapshot both runs share
            at = rows[rows["step"] == step]
            mine, theirs = at[at["method"] == run.name], at[at["method"] == reference.name]
            counts = pd.Series(mine["value"].to_numpy(), index=mine["layer"].astype(str).to_numpy())
            ref_counts = pd.Series(theirs["value"].to_numpy(), index=theirs["layer"].astype(str).to_numpy())
    present = counts[counts > 0]
    if not len(present):
        return []
    total = int(present.sum())
    worst = _worst(present, lowest=False)
    evidence: dict[str, float | str] = {"step": float(step), "total": float(total),
                                        "layers_with": float(len(present)), "layers": float(len(counts))}
    if ref_counts is not None:
        ref_total = int(ref_counts.sum())
        evidence["reference_total"] = float(ref_total)
        versus = f" ({reference.name}: {ref_total})"
        severity: Severity = "warning" if total > ref_total else "info"
    else:
        versus = ""
        severity = "warning" if _is_adapter(run) else "info"
    title = (f"{total} intruder dimension{'s' * (total != 1)} in {len(present)} of {len(counts)} layers at step "
             f"{step}{versus}: {_listing(worst, len(present))}.")
    suggestion = ("Intruder dimensions are new top singular directions nearly orthogonal to the pretrained ones "
                  "(Shuttleworth et al.), linked to forgetting. A higher rank, or LoFT, usually leaves fewer; "
                  "evaluate on the pretraining data to see whether they matter.")
    if severity == "info" and ref_counts is not None:
        suggestion = "No more than the reference run has: nothing specific to the adapter here."
    elif not _is_adapter(run):
        suggestion = ("Full fine-tuning creates a few as well: diagnose the adapter runs of this task with this "
                      "run as their reference to see whether they create more.")
    return [Finding("intruders", severity, title, {**evidence, **worst}, suggestion)]


def _loss_gap(run: Run, reference: Run | None, frame: pd.DataFrame | None) -> list[Finding]:
    """Mean training-loss gap over the last third of the steps both runs recorded a loss at, relative to the
    reference's loss there; the held-out losses at the last common evaluation join the evidence."""
    if reference is None or frame is None:
        return []
    gaps = frame[(frame["metric"] == "loss_gap") & (frame["method"] == run.name)].sort_values("step")
    if not len(gaps):
        return [Finding("loss_gap", "info", f"{run.name} and {reference.name} share no step with a recorded loss.",
                        {"reference": reference.name}, "Log the loss at every step in both runs (probe.log).")]
    late = gaps.iloc[len(gaps) - math.ceil(len(gaps) / 3):]
    ref_loss = reference.rows("loss", [RUN_LAYER])
    ref_loss = ref_loss[ref_loss["step"].isin(late["step"])]
    span = f"steps {int(late['step'].iloc[0])}–{int(late['step'].iloc[-1])}"
    nonfinite = int((~np.isfinite(late["value"].to_numpy(dtype="float64"))).sum())
    if nonfinite:  # a NaN loss is a finding of its own, never a gap "within 10%"
        return [Finding("loss_gap", "warning",
                        f"The training loss gap to {reference.name} is not finite at {nonfinite} of {len(late)} "
                        f"steps over {span}: no loss comparison is possible.",
                        {"reference": reference.name, "from_step": float(late["step"].iloc[0]),
                         "to_step": float(late["step"].iloc[-1]), "nonfinite_steps": float(nonfinite)},
                        "See the divergence finding; compare the runs at steps before it.")]
    gap, ref_mean = float(late["value"].mean()), float(ref_loss["value"].mean())
    relative = gap / abs(ref_mean) if ref_mean else (math.inf if gap > 0 else 0.0)
    evidence: dict[str, float | str] = {
        "reference": reference.name, "from_step": float(late["step"].iloc[0]), "to_step": float(late["step"].iloc[-1]),
        "loss": ref_mean + gap, "reference_loss": ref_mean, "gap": gap, "relative_gap": relative,
        "relative_gap_max": LOSS_GAP_REL_MAX, **_last_common_eval(run, reference)}
    if relative > LOSS_GAP_REL_MAX:
        return [Finding("loss_gap", "warning",
                        f"Training loss {ref_mean + gap:.3g} against {reference.name}'s {ref_mean:.3g} over {span} "
                        f"({relative:+.0%}, more than {LOSS_GAP_REL_MAX:.0%} above).",
                        evidence, "The subspace and optimizer findings say where the gap comes from; a learning "
                                  "rate tuned for this method matters too.")]
    verdict = "lower than the reference's" if gap < 0 else f"within {LOSS_GAP_REL_MAX:.0%} of the reference's"
    return [Finding("loss_gap", "info",
                    f"Training loss {ref_mean + gap:.3g} against {reference.name}'s {ref_mean:.3g} over {span} "
                    f"({relative:+.0%}: {verdict}).",
                    evidence, "No loss gap to close; compare held-out metrics before calling the methods equal.")]


def _last_common_eval(run: Run, reference: Run) -> dict[str, float]:
    """eval_loss of both runs at the last step where both recorded one (empty when none)."""
    def evals(r: Run) -> pd.Series:
        rows = r.rows("eval_loss", [RUN_LAYER])
        return pd.Series(rows["value"].to_numpy(), index=rows["step"].to_numpy())

    mine, theirs = evals(run), evals(reference)
    common = sorted(set(mine.index) & set(theirs.index))
    if not common:
        return {}
    step = common[-1]
    return {"eval_step": float(step), "eval_loss": float(mine[step]), "reference_eval_loss": float(theirs[step])}


# ---------------------------------------------------------------------------------------------- describing
MAX_LAYERS_SHOWN = 24  # describe_run lists this many layers, then "... and N more": it should fit one screen


def describe_run(run: Run, width: int = 100) -> str:
    """One screen of plain text about a run: what was run, which layers, what was recorded, whether it closed.

    The text of ``loft-probe inspect``; every line is read from meta.json and the metrics, nothing measured.
    """
    meta, metrics = run.meta, run.metrics
    task = meta.get("task") if isinstance(meta.get("task"), dict) else {}
    hyper = dict(meta.get("hyperparameters") or {})
    for key in ("rank", "alpha"):
        if meta.get(key) is not None:
            hyper[key] = meta[key]
    lines = [f"{run.name}  ({run.path})"]
    lines += _wrap(f"method {run.method}, optimizer {meta.get('optimizer', '?')}"
                           + (f", task {task['name']} {task.get('options') or ''}".rstrip() if task.get("name") else "")
                           + f", seed {meta.get('seed')}, data order {meta.get('data_order')}",
                           width, initial_indent="  ", subsequent_indent="    ")
    lines += _wrap("hyperparameters: " + (", ".join(f"{k}={v}" for k, v in hyper.items()) or "none"),
                           width, initial_indent="  ", subsequent_indent="    ")
    lines.append(f"  probe: record {meta.get('schedule', '?')}, snapshots {meta.get('snapshots', '?')}, "
                 f"shadow {_on(meta.get('shadow'))}, gradient capture {_on(meta.get('capture_grad'))}")
    if meta.get("closed"):
        lines.append(f"  status: closed at step {meta.get('last_step', run.last_step)}")
    else:
        lines.append(f"  status: not closed (running, or stopped without closing); last complete step "
                     f"{run.last_step}")
    layer_rows = metrics[metrics["layer"] != RUN_LAYER]
    steps = sorted(set((layer_rows if len(layer_rows) else metrics)["step"]))
    lines.append(f"  recorded steps: {len(steps)}" + (f" ({steps[0]}–{steps[-1]})" if steps else ""))
    lines.append("  snapshots: " + (", ".join(map(str, run.snapshot_steps)) or "none"))
    layers = meta["layers"]
    lines.append(f"  layers ({len(layers)}):")
    name_width = max((len(str(layer.get("name"))) for layer in layers[:MAX_LAYERS_SHOWN]), default=0)
    for layer in layers[:MAX_LAYERS_SHOWN]:
        shape = "×".join(map(str, layer.get("shape") or []))
        rank = f"  rank {layer['rank']}  scale {_number(layer['scale'])}" if layer.get("rank") else ""
        lines.append(f"    {str(layer.get('name')):<{name_width}}  {shape:<11} {layer.get('kind', '?')}{rank}")
    if len(layers) > MAX_LAYERS_SHOWN:
        lines.append(f"    ... and {len(layers) - MAX_LAYERS_SHOWN} more")
    counts = metrics.groupby("metric", sort=True).size()
    listing = ", ".join(f"{metric} {count}" for metric, count in counts.items()) or "none"
    lines += _wrap(f"metrics (rows): {listing}", width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def headline(run: Run) -> dict[str, float | str]:
    """The few numbers a one-line summary of a run shows (missing ones left out).

    loss: mean training loss over the last third of its steps; eval_loss, eval_accuracy: at the last
    evaluation; update_cosine: the median over layers of each layer's late median cos(ΔW, shadow step).
    """
    out: dict[str, float | str] = {"name": run.name, "method": run.method, "last_step": float(run.last_step)}
    run_rows = run.metrics[run.metrics["layer"] == RUN_LAYER]
    loss = run_rows[run_rows["metric"] == "loss"].sort_values("step")
    if len(loss):
        out["loss"] = float(loss["value"].iloc[len(loss) - math.ceil(len(loss) / 3):].mean())
    for metric in ("eval_loss", "eval_accuracy"):
        rows = run_rows[run_rows["metric"] == metric]
        if len(rows):
            out[metric] = float(rows.loc[rows["step"].idxmax(), "value"])
    cosines = _LateMedians(run)("shadow_update_cosine")
    if len(cosines):
        out["update_cosine"] = float(cosines.median())
    return out


def _on(flag: object) -> str:
    return "on" if flag else "off"


# ---------------------------------------------------------------------------------------------- output
def format_findings(findings: list[Finding], width: int = 100) -> str:
    """Plain text: one block per finding (severity, code, title; evidence; suggestion), wrapped at `width`."""
    if not findings:
        return "No findings: nothing stands out in the recorded metrics."
    blocks = []
    for f in findings:
        evidence = ", ".join(f"{key}={_number(value)}" for key, value in f.evidence.items())
        lines = _wrap(f"[{f.severity}] {f.code}: {f.title}", width, subsequent_indent="    ")
        lines += _wrap(f"evidence: {evidence}", width, initial_indent="    ", subsequent_indent="      ")
        lines += _wrap(f"try: {f.suggestion}", width, initial_indent="    ", subsequent_indent="      ")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def findings_to_json(findings: list[Finding]) -> str:
    """A JSON list of findings (the dataclass fields); a non-finite number is written as a string ("inf")."""
    def clean(value: float | str) -> float | str:
        return value if isinstance(value, str) or math.isfinite(value) else str(value)

    items = [{**asdict(f), "evidence": {k: clean(v) for k, v in f.evidence.items()}} for f in findings]
    return json.dumps(items, indent=2, ensure_ascii=False, allow_nan=False)


def _wrap(text: str, width: int, **indents: str) -> list[str]:
    """textwrap.wrap that keeps names whole: "minilm-sentiment" and long layer names are not split."""
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False, **indents)


def _number(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
