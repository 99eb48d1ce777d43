"""Plain-language findings about one run: did training go wrong, and where does it step differently from full
fine-tuning.

    from loft_probe import load_run
    from loft_probe.diagnosis import diagnose, format_findings

    findings = diagnose(load_run("runs/lora"), reference=load_run("runs/full"))
    print(format_findings(findings))

Findings, in the order shown (warnings first):

    code                  what it says                                                  decided on
    diverged              NaN/Inf at the end, a late (or last held-out) loss 20% above   loss, non-finite rows,
                          the start, gradients that died mid-run, or a collapse (large   grad_norm, eval_loss,
                          steps, loss never fell); the step and the layer where it began update_weight_ratio
    nonfinite_steps       NaN/Inf at some steps, finite again later                      non-finite rows
    step_too_large        steps beyond Adam's bound in units of the lr                   update_lr_ratio
    lr_too_high           a mid-run loss spike, or late steps large against the weights  loss, update_weight_ratio
                          with the loss above twice its best,
                          or the held-out loss ended above its start (or rose from its   eval_loss(_se)
                          best with large steps, or with a training loss that cannot
                          settle) while the training loss fell, or it
                          jumped above its start before it learned; against a reference:
                          a rise from its best that full fine-tuning, converged and as
                          long, did not show, with a loss gap
    undertrained          the loss (and the held-out loss, beyond its noise) still       loss, eval_loss(_se),
                          falling at the end, or not fallen yet, or the weights          update_weight_ratio
                          barely moving (an info where the held-out loss fell and
                          flattened: the records cannot tell); against a reference: a    eval_loss (reference)
                          warning with a loss gap, none where full fine-tuning,
                          converged and as long, got no further
    overfitting           the held-out loss rose from its best beyond its noise while    eval_loss(_se), loss
                          the training loss fell
    dead_gradients        layers whose gradient is exactly 0                             grad_norm
    frozen_factor         a LoRA factor that never moved                                 factor_{a,b}_change_norm
    rank_too_low          high tangent residual and r90 = rank in most adapter layers    residual_tangent, delta_r90
    gap_from_subspace     the same in some layers only
    optimizer_state       LoFT's moment off from the shadow's, within the subspace,     shadow_m_proj_rel_error,
                          or its steps far below its lr's scale with the loss still;   update_lr_ratio,
                          LoRA's lifted steps away from full fine-tuning's (info;       shadow_precond_proj_cosine
                          a warning when it is all that explains a loss gap)
    loss_gap              final (held-out) loss against the reference's gain             eval_loss (reference)
    intruders             more intruder dimensions than the reference (pretrained W_0)   intruders (reference)
    rank_more_than_needed info: ΔW uses a quarter of the rank or less                    delta_r90
    not_recorded          info: checks skipped for lack of metrics, and how to record them

Each threshold, with the benchmark figure it came from, is in :mod:`loft_probe.diagnosis.thresholds`; the
benchmark that measures the whole diagnosis on runs with known causes is :mod:`loft_probe.diagnosis.benchmark`.
"""

from __future__ import annotations

from dataclasses import replace

from loft_probe.comparison import compare
from loft_probe.diagnosis import gap, held_out, training
from loft_probe.diagnosis.describe import describe_run, findings_to_json, format_findings
from loft_probe.diagnosis.finding import Finding
from loft_probe.diagnosis.reading import LayerValues
from loft_probe.diagnosis.signals import signals
from loft_probe.run import Run

__all__ = ["Finding", "describe_run", "diagnose", "findings_to_json", "format_findings", "signals"]

# The codes that say training itself went wrong: when one fires, the alignment findings describe a broken run.
TRAINING_FAULTS = ("diverged", "step_too_large", "lr_too_high", "undertrained", "dead_gradients", "frozen_factor")


def diagnose(run: Run, reference: Run | None = None) -> list[Finding]:
    """Findings for one run from its own record, and against ``reference`` (a full fine-tuning run of the same
    task and seed) when given. Warnings come first, then infos, each in the order of the table above.

    Raises:
        loft_probe.comparison.IncompatibleRunsError, RunSelectionError: the reference does not compare with
            the run (different seed, data order, base weights; the same name).
    """
    if not len(run.metrics):
        return [Finding("not_recorded", "info", "The run has recorded no metrics yet: nothing to diagnose.",
                        {"path": str(run.path)},
                        "Let it reach its first recorded step (the probe's `every`), or check that the probe "
                        "is attached to the optimizer that steps.")]
    frame = compare([run, reference], reference=reference) if reference is not None else None
    against = gap.loss_gap(run, reference) if reference is not None else []
    values = LayerValues(run)
    findings = training.nonfinite(run)
    stuck = training.dead_gradients(run, values) + training.frozen_factor(run, values)
    if not _fired(findings, "diverged"):
        findings += training.loss_rose(run, values, collapse=not stuck)
    findings += training.step_size(run, values)
    # a held-out rise after a divergence or too large steps is their consequence; one that full fine-tuning, as
    # long, did not show is too large steps itself (decided here: undertrained must not be said beside it)
    risen = [] if _fired(findings, "diverged", "lr_too_high") else \
        held_out.overfitting(run, training.late_step_ratio(values))
    if risen and against:
        risen = [held_out.outpaced(risen[0], reference, gap.share_missing(against[0]), gap.converged(against[0]))]
    findings += [f for f in risen if f.code == "lr_too_high"]
    # LoFT's steps far below its lr's scale: its update keeps the run still, not the lr (undertrained would say
    # raise it)
    short = [] if _fired(findings + stuck, "diverged", "dead_gradients", "frozen_factor") else \
        gap.loft_short_steps(run, training.loft_steps_short(run, values))
    if not _fired(findings + stuck + short, "diverged", "dead_gradients", "frozen_factor", "optimizer_state",
                  "lr_too_high", "step_too_large"):  # each explains a still loss; undertrained would say raise the lr
        slow = training.undertrained(run, values)
        findings += [kept for f in slow for kept in gap.stopped_early(f, against[0], reference)] if against else slow
    findings += [f for f in risen if f.code == "overfitting"]
    findings += stuck
    findings += gap.subspace(run, values)
    broken = _fired([f for f in findings if f.severity == "warning"], *TRAINING_FAULTS)
    state = gap.optimizer_state(run, values, broken)
    findings += state or short
    if not broken:  # a broken run's ΔW says nothing about the rank it needs
        findings += gap.rank_spare(run, values)
    if reference is not None:
        warned = any(f.severity == "warning" for f in findings)
        if against and against[0].severity == "info":  # no gap to the reference: a limit that cost nothing
            findings = [_no_cost(f, reference) if f.code in SUBSPACE or _lora_mismatch(f) else f for f in findings]
        elif against and not warned and "shortfall" in against[0].evidence:  # a warning: a finite gap, which
            # only LoRA's misaligned steps (when they fired) can explain
            findings = [_costs(f, against[0]) if _lora_mismatch(f) else f for f in findings]
        if against and against[0].severity == "warning" and not (warned or _fired(findings, "optimizer_state")):
            against = [gap.unexplained(against[0])]
        findings += against + gap.intruders(run, reference, frame)
    findings += gap.not_recorded(run, values)
    return sorted(findings, key=lambda f: f.severity != "warning")  # stable: the check order stays


SUBSPACE = ("rank_too_low", "gap_from_subspace")


def _fired(findings: list[Finding], *codes: str) -> bool:
    return any(f.code in codes for f in findings)


def _lora_mismatch(finding: Finding) -> bool:
    """LoRA's optimizer_state, an info until the reference says what it costs (LoFT's is a warning)."""
    return finding.code == "optimizer_state" and finding.severity == "info"


def _costs(finding: Finding, loss_gap: Finding) -> Finding:
    """LoRA's misaligned steps, the only candidate for a loss gap to the reference: a warning."""
    return replace(finding, severity="warning",
                   title=finding.title + f" The run ends {loss_gap.evidence['shortfall']:.0%} of the reference's "
                                         "gain short of it, and nothing else in the record names a cause.",
                   suggestion="Try LoFT at the same rank: it steps where full fine-tuning would within the same "
                              "subspace. (On the benchmark's matrix-factorisation task, LoFT at LoRA's rank reaches "
                              "full fine-tuning's loss where LoRA stops short.)")


def _no_cost(finding: Finding, reference: Run) -> Finding:
    """A subspace limit, or LoRA's misaligned steps, that the final loss does not show: information."""
    said = replace(finding, severity="info",
                   title=finding.title + f" The final loss still matches {reference.name}'s: this costs nothing "
                                         "measurable here.")
    if _lora_mismatch(finding):
        return replace(said, suggestion="Nothing to change for the loss: at this rank LoRA reaches the reference's "
                                        "despite it.")
    return said
