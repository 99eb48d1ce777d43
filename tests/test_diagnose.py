"""Findings of `loft_probe.diagnosis` on synthetic run directories (each threshold crossed and not crossed)
and on real small digits runs (full, LoRA, LoFT from the same seed)."""

import json
import math
from pathlib import Path

import pytest
import torch

from loft_probe.comparison import IncompatibleRunsError
from loft_probe.diagnosis import Finding, describe_run, diagnose, findings_to_json, format_findings
from loft_probe.diagnosis import describe as D
from loft_probe.diagnosis import thresholds as T
from loft_probe.run import load_run, snapshot_key, write_meta, write_metrics_part, write_snapshot
from loft_probe.runner import RunConfig, run
from loft_probe.summary import run_headline

STEPS = (5, 10, 15, 20, 25, 30)  # recorded steps: the last third is 25 and 30
SHAPE = (16, 8)


# ---------------------------------------------------------------------------------------------- synthetic runs
def converged(step: int) -> float:
    """A training loss that fell fast and settled: 1.0 → ~0.1."""
    return 0.1 + 0.9 * math.exp(-step / 3)


def write_run(path: Path, method: str = "lora", layers=("l0", "l1"), late=None, early=None, snapshot=None,
              loss=converged, evals=None, rank: int = 8, hyper=None, seed: int = 0, snapshot_files: bool = False,
              shadow: bool = True, eval_se: float | None = None):
    """A run directory with per-layer metrics: `early` values at steps 5–20, `late` at 25 and 30 (the last
    third), `snapshot` values at step 30; `loss` (a function of the step, or None) a run-level value at every
    step 1..30; `evals` {step: held-out loss}, each with standard error `eval_se` when given. Values are
    {metric: {layer: value}} or {metric: value} (every layer)."""
    kind = "full" if method == "full" else "lora"
    path.mkdir(parents=True)
    write_meta(path, {
        "name": path.name, "method": method, "optimizer": {"loft": "LoFT"}.get(method, "AdamW"),
        "hyperparameters": hyper or {"lr": 1e-3}, "seed": seed, "data_order": "synthetic", "fingerprint": "f0",
        "layers": [{"name": name, "shape": list(SHAPE), "kind": kind, "rank": None if kind == "full" else rank,
                    "scale": None if kind == "full" else 1.0} for name in layers],
        "closed": True, "last_step": STEPS[-1], "schedule": "every 5", "snapshots": "every 20",
        "shadow": shadow, "capture_grad": shadow,
    })
    rows = []

    def add(step, values):
        for metric, per_layer in (values or {}).items():
            for layer in layers:
                value = per_layer.get(layer) if isinstance(per_layer, dict) else per_layer
                if value is not None:
                    rows.append((step, layer, metric, float(value)))

    for step in STEPS:
        add(step, late if step >= 25 else (early if early is not None else late))
    add(STEPS[-1], snapshot)
    if loss is not None:
        rows += [(step, "", "loss", float(loss(step))) for step in range(1, STEPS[-1] + 1)]
    rows += [(step, "", "eval_loss", float(value)) for step, value in (evals or {}).items()]
    if eval_se is not None:
        rows += [(step, "", "eval_loss_se", eval_se) for step in (evals or {})]
    write_metrics_part(path, rows)
    if snapshot_files:  # compare() reads ΔW's singular triplets at the snapshot steps
        tensors = {}
        for i, layer in enumerate(layers):
            g = torch.Generator().manual_seed(i)
            U = torch.linalg.qr(torch.randn(SHAPE[0], 2, generator=g)).Q
            V = torch.linalg.qr(torch.randn(SHAPE[1], 2, generator=g)).Q
            tensors |= {snapshot_key(layer, "delta", "U"): U, snapshot_key(layer, "delta", "Vh"): V.T,
                        snapshot_key(layer, "delta", "S"): torch.tensor([2.0, 1.0])}
        write_snapshot(path, STEPS[-1], tensors)
    return load_run(path)


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def only(findings: list[Finding], code: str) -> Finding:
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, codes(findings)
    return found[0]


# The metrics a healthy adapter run records: steps in scale, gradients alive, factors moving, expressible, moments
# in agreement, a used rank.
HEALTHY = {"update_lr_ratio": 0.6, "update_weight_ratio": 1e-3, "grad_norm": 1.0, "factor_a_change_norm": 0.5,
           "factor_b_change_norm": 0.5, "shadow_update_cosine": 0.9, "residual_tangent": 0.2,
           "shadow_m_proj_cosine": 0.98, "shadow_m_proj_rel_error": 0.1, "cos_moment_grad": 0.8,
           "delta_rel_size": 0.01}
SNAPSHOT = {"delta_r90": 6, "intruders": 0}


def test_healthy_run_has_no_findings(tmp_path):
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY, snapshot=SNAPSHOT))
    assert findings == []
    assert format_findings(findings).startswith("No findings")


# ---------------------------------------------------------------------------------------------- training went wrong
def test_a_loss_above_its_start_is_a_divergence_with_its_step_and_layer(tmp_path):
    """Finite all along, yet the late loss is above the first: diverged, beginning where the loss first rose."""
    rising = {**HEALTHY, "update_weight_ratio": {"l0": 0.001, "l1": 0.3}}
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=rising, snapshot=SNAPSHOT,
                                  loss=lambda step: 1.0 if step < 12 else 0.5 * step))
    diverged = only(findings, "diverged")
    assert codes(findings)[0] == "diverged" and diverged.evidence["began_step"] == 12
    assert diverged.evidence["layer"] == "l1" and "step 12" in diverged.title
    assert "undertrained" not in codes(findings)  # a diverged run is not "still improving"


@pytest.mark.parametrize("ratio, expected", [(T.STEP_LR_RATIO.value * 1.1, True), (T.STEP_LR_RATIO.value * 0.9, False)])
def test_step_too_large_against_adams_bound(tmp_path, ratio, expected):
    late = HEALTHY | {"update_lr_ratio": {"l0": ratio, "l1": 0.5}}
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT))
    assert ("step_too_large" in codes(findings)) is expected
    if expected:
        finding = only(findings, "step_too_large")
        assert finding.evidence["l0"] == pytest.approx(ratio) and "l1" not in finding.evidence
        assert "fault to report" in finding.suggestion  # LoFT's step is bounded by construction


def bounced(step: int) -> float:
    """A loss that reached 0.1 and came back up to 0.4 in the last third: the run got worse."""
    return converged(step) if step < 20 else 0.4


@pytest.mark.parametrize("ratio, loss, expected", [
    (T.UPDATE_WEIGHT_RATIO.value * 2, bounced, True),
    (T.UPDATE_WEIGHT_RATIO.value / 2, bounced, False),
    (T.UPDATE_WEIGHT_RATIO.value * 2, converged, False),  # large steps while the loss holds its best: early training
])
def test_lr_too_high_from_the_step_against_the_weight(tmp_path, ratio, loss, expected):
    findings = diagnose(write_run(tmp_path / "full", "full", late=HEALTHY | {"update_weight_ratio": ratio},
                                  snapshot=SNAPSHOT, loss=loss))
    assert ("lr_too_high" in codes(findings)) is expected
    if expected:
        assert only(findings, "lr_too_high").evidence["loss_above_best"] == pytest.approx(0.4 / converged(12), rel=0.2)


def test_lr_too_high_from_a_loss_spike(tmp_path):
    """The loss rose above its start mid-run and came back: the steps were too large, not too few."""
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                                  loss=lambda step: 1.0 if step == 1 else (5.0 if step < 21 else 0.9)))
    assert "lr_too_high" in codes(findings) and "undertrained" not in codes(findings)
    assert "rose above its start" in only(findings, "lr_too_high").title


def test_only_the_last_third_counts(tmp_path):
    """Large early steps that settled are not reported; large late steps after a calm start are."""
    calm, wild = HEALTHY, HEALTHY | {"update_weight_ratio": 0.2}
    settled = diagnose(write_run(tmp_path / "a", "full", early=wild, late=calm, snapshot=SNAPSHOT, loss=bounced))
    drifted = diagnose(write_run(tmp_path / "b", "full", early=calm, late=wild, snapshot=SNAPSHOT, loss=bounced))
    assert "lr_too_high" not in codes(settled) and "lr_too_high" in codes(drifted)


@pytest.mark.parametrize("loss, expected", [(lambda step: 1.0 - 0.03 * step, True), (converged, False)])
def test_undertrained_when_the_loss_still_falls(tmp_path, loss, expected):
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=loss))
    assert ("undertrained" in codes(findings)) is expected
    if expected:
        assert only(findings, "undertrained").evidence["loss_falling"] > T.LOSS_STILL_FALLING.value


HELD_OUT_FALLING = {0: 1.0, 10: 0.8, 20: 0.6, 30: 0.4}  # training loss still falling too (linear below)
OVERFIT = {0: 1.0, 10: 0.5, 20: 0.4, 30: 0.6}  # best 0.4 at step 20, then a rise beyond 2·0.01


@pytest.mark.parametrize("se, expected", [(0.01, True), (0.2, False)])
def test_undertrained_needs_a_held_out_drop_beyond_its_noise(tmp_path, se, expected):
    """Second-half held-out drop 0.2: beyond 2·0.01, within 2·0.2 (then the held-out loss counts as flat)."""
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=lambda step: 1.0 - 0.03 * step,
                    evals=HELD_OUT_FALLING, eval_se=se)
    assert ("undertrained" in codes(diagnose(run))) is expected


@pytest.mark.parametrize("evals, flat", [({0: 1.0, 10: 0.9, 20: 0.85, 30: 0.85}, True),  # fell, then flat
                                          ({0: 1.0, 10: 0.95, 20: 0.9, 30: 0.8}, False),  # still falling
                                          (None, False)])
def test_a_loss_that_has_not_fallen_says_when_the_records_cannot_tell_why(tmp_path, evals, flat):
    """The training loss at 0.95 of its first (over LOSS_NOT_FALLEN): undertrained either way, but where the
    held-out loss fell beyond its noise and flattened, the finding says a run at what its data allow looks the
    same."""
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                    loss=lambda step: 1.0 if step == 1 else 0.95, evals=evals, eval_se=0.01)
    finding = only(diagnose(run), "undertrained")
    assert ("cannot tell the two apart" in finding.title) is flat and ("eval_first" in finding.evidence) is flat
    assert finding.severity == ("info" if flat else "warning")  # what cannot be told is not a warning


NOT_FALLEN = {"loss": lambda step: 1.0 if step == 1 else 0.95, "evals": {0: 1.0, 10: 0.9, 20: 0.85, 30: 0.85}}


@pytest.mark.parametrize("reference_evals, severity, said", [
    ({0: 1.0, 10: 0.88, 20: 0.845, 30: 0.84}, None, ""),  # converged, as long, 6% of its gain ahead: no more to get
    ({0: 1.0, 10: 0.7, 20: 0.61, 30: 0.6}, "warning", "so it stopped early"),  # converged, 62% ahead
    ({0: 1.0, 10: 0.95, 20: 0.9, 30: 0.84}, "info", "cannot tell the two apart"),  # still falling: no answer
    ({0: 1.0, 10: 0.88, 20: 0.845, 30: 0.84, 40: 0.84}, "info", "cannot tell the two apart"),  # trained longer
])
def test_the_reference_tells_a_run_stopped_early_from_one_at_what_its_data_give(tmp_path, reference_evals, severity,
                                                                                said):
    """A training loss at 0.95 of its first, a held-out loss that fell and flattened: the run's own records cannot
    tell (an info); a converged reference, as long, can."""
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, eval_se=0.01, **NOT_FALLEN)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals=reference_evals, eval_se=0.01)
    findings = diagnose(run, reference=full)
    if severity is None:
        assert "undertrained" not in codes(findings) and only(findings, "loss_gap").severity == "info"
    else:
        finding = only(findings, "undertrained")
        assert finding.severity == severity and said in finding.title


def test_a_loss_still_falling_that_a_converged_reference_matches_is_not_a_warning(tmp_path):
    """Training and held-out losses still falling at the end (a warning alone), ending where full fine-tuning,
    converged over as many steps, ends."""
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=lambda step: 1.0 - 0.03 * step,
                    evals=HELD_OUT_FALLING, eval_se=0.01)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals={0: 1.0, 10: 0.5, 20: 0.41, 30: 0.4},
                     eval_se=0.01)
    assert only(diagnose(run), "undertrained").severity == "warning"
    assert "undertrained" not in codes(diagnose(run, reference=full))


@pytest.mark.parametrize("se, last, expected", [
    (0.01, 0.6, "overfitting"),  # rose 0.2 from its best 0.4, still below its start 1.0
    (0.15, 0.6, None),  # 0.2 is within 2·0.15
    (None, 0.42, None),  # no standard error: the 10%-of-the-drop floor (0.06) decides
    (None, 0.6, "overfitting"),
    (0.01, 1.2, "lr_too_high"),  # ended above its start
])
def test_a_held_out_rise_while_the_training_loss_falls(tmp_path, se, last, expected):
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                    evals={0: 1.0, 10: 0.5, 20: 0.4, 30: last}, eval_se=se)
    found = [code for code in codes(diagnose(run)) if code in ("overfitting", "lr_too_high")]
    assert found == ([expected] if expected else [])
    if expected:
        finding = only(diagnose(run), expected)
        assert finding.evidence["best_step"] == 20 and "step 20" in finding.suggestion


@pytest.mark.parametrize("late_rise, expected", [(0.04, "lr_too_high"), (0.001, None)])
def test_both_losses_worse_at_the_end_is_lr_too_high_not_overfitting(tmp_path, late_rise, expected):
    """The training loss fell to ~0.13 by step 20, then rose by `late_rise` a step (to ~0.5 at 30: below its
    start, so not a divergence; ×1.1 only: neither worse nor falling)."""
    def bounced(step):
        return converged(step) if step <= 20 else converged(20) + late_rise * (step - 20)
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=bounced,
                    evals=OVERFIT, eval_se=0.01)
    found = [code for code in codes(diagnose(run)) if code in ("overfitting", "lr_too_high")]
    assert found == ([expected] if expected else [])


@pytest.mark.parametrize("ratio, expected", [(1e-2, "lr_too_high"), (1e-3, "overfitting")])
def test_a_held_out_rise_with_large_steps_is_lr_too_high(tmp_path, ratio, expected):
    """Held-out 1.0 → best 0.4 → 0.6, the training loss falling: overfitting, unless the late steps are over
    UPDATE_WEIGHT_RATIO_OVERFIT (median over layers) of the weights."""
    run = write_run(tmp_path / "loft", "loft", late=HEALTHY | {"update_weight_ratio": ratio}, snapshot=SNAPSHOT,
                    evals=OVERFIT, eval_se=0.01)
    findings = diagnose(run)
    assert [code for code in codes(findings) if code in ("overfitting", "lr_too_high")] == [expected]
    finding = only(findings, expected)
    assert finding.evidence["update_weight_ratio_median"] == ratio
    if expected == "overfitting":  # small steps: too many of them or too high an lr, which the records cannot tell
        assert "0.10% of the weights" in finding.title and "look alike" in finding.title


@pytest.mark.parametrize("late, expected", [(0.05, "lr_too_high"), (0.01, "overfitting")])
def test_a_held_out_rise_with_a_training_loss_that_cannot_settle_is_lr_too_high(tmp_path, late, expected):
    """Held-out 1.0 → best 0.4 → 0.6 while the training loss fell from 0.3 (at the held-out best) to 0.01, then
    bounced back to `late` (5× its best: the steps are too large to settle; 1×: it settled and overfits)."""
    def loss(step):
        return 1.0 if step <= 10 else 0.3 if step <= 20 else 0.01 if step <= 24 else late
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=loss, evals=OVERFIT,
                    eval_se=0.01)
    findings = diagnose(run)
    assert [code for code in codes(findings) if code in ("overfitting", "lr_too_high")] == [expected]
    if expected == "lr_too_high":
        assert only(findings, "lr_too_high").evidence["loss_above_best"] == pytest.approx(5.0)


def test_overfitting_beside_step_too_large_does_not_call_its_steps_small(tmp_path):
    """Steps 1000× the lr's scale stop the lr checks at step_too_large; the held-out rise is still overfitting,
    but its text must not call 2% of the weights "under" the 0.5% that marks steps too large."""
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY | {"update_lr_ratio": 1e3, "update_weight_ratio": 2e-2},
                    snapshot=SNAPSHOT, evals=OVERFIT, eval_se=0.01)
    findings = diagnose(run)
    assert {"step_too_large", "overfitting"} <= set(codes(findings))
    finding = only(findings, "overfitting")
    assert finding.evidence["update_weight_ratio_median"] == 2e-2 and "look alike" not in finding.title


@pytest.mark.parametrize("peak, se, expected", [
    (1.2, 0.01, True),  # 20% above its start mid-run, beyond 2·0.01
    (1.04, 0.001, False),  # under HELD_OUT_SPIKE's 5%
    (1.2, 0.15, False),  # within 2·0.15
    (1.2, None, False),  # no standard error (a deterministic loss): the training loss decides
])
def test_a_held_out_loss_that_jumped_above_its_start_mid_run_is_lr_too_high(tmp_path, peak, se, expected):
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                    evals={0: 1.0, 10: peak, 20: 0.5, 30: 0.45}, eval_se=se)
    findings = diagnose(run)
    assert ("lr_too_high" in codes(findings)) is expected
    if expected:
        finding = only(findings, "lr_too_high")
        assert finding.evidence["peak_step"] == 10 and "undertrained" not in codes(findings)


@pytest.mark.parametrize("last, expected", [(1.5, "diverged"), (1.1, "lr_too_high")])
def test_a_held_out_loss_that_ends_far_above_its_start_is_a_divergence(tmp_path, last, expected):
    """The training loss fell (converged) but the held-out loss ended ×1.5 its start (over LOSS_RISE): the run
    left the model worse than it found it, said once (not again as lr_too_high's "ended above its start"); ×1.1
    is not a divergence, and lr_too_high names it."""
    run = write_run(tmp_path / "full", "full", late=HEALTHY, snapshot=SNAPSHOT,
                    evals={0: 1.0, 10: 0.8, 20: 0.7, 30: last}, eval_se=0.01)
    findings = diagnose(run)
    assert [code for code in codes(findings) if code in ("diverged", "lr_too_high", "overfitting")] == [expected]
    if expected == "diverged":
        finding = only(findings, "diverged")
        assert finding.evidence["began_step"] == 30 and "×1.5" in finding.title


def test_checks_against_the_start_need_an_evaluation_at_the_start(tmp_path):
    """The HF Trainer's first eval_loss comes after some steps: a held-out loss 0.40 → 0.38 → 0.50 has risen from
    its best, but nothing says where it started, so it is neither a divergence nor "above its start"."""
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                    evals={10: 0.40, 15: 0.38, 20: 0.42, 25: 0.46, 30: 0.50})
    found = [code for code in codes(diagnose(run)) if code in ("diverged", "lr_too_high", "overfitting")]
    assert found == ["overfitting"]


def test_a_held_out_jump_after_the_model_learned_is_not_a_spike(tmp_path):
    """1.0 → 0.8 (learned: beyond 2·0.01 below the start) → 1.2 → 0.45: a noisy curve's swing, which ends at its
    best; the same jump before the model learned (0.8 → 1.1 at step 10) is lr_too_high."""
    after = write_run(tmp_path / "after", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                      evals={0: 1.0, 10: 0.8, 20: 1.2, 30: 0.45}, eval_se=0.01)
    before = write_run(tmp_path / "before", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                       evals={0: 1.0, 10: 1.1, 20: 1.2, 30: 0.45}, eval_se=0.01)
    assert "lr_too_high" not in codes(diagnose(after))
    assert only(diagnose(before), "lr_too_high").evidence["peak_step"] == 20


@pytest.mark.parametrize("reference_evals, expected", [
    ({0: 1.0, 10: 0.6, 20: 0.46, 30: 0.45}, "lr_too_high"),  # full fine-tuning, as long, did not rise: 27% short
    ({0: 1.0, 10: 0.7, 20: 0.5, 30: 0.45}, "overfitting"),  # the same, still falling (0.05 > 2·0.01): no rise yet
    ({0: 1.0, 10: 0.4, 20: 0.3, 30: 0.45}, "overfitting"),  # it rose too (27% short): the run trained too long
    ({0: 1.0, 10: 0.7, 20: 0.6, 30: 0.58}, "overfitting"),  # 4% of its gain short: no gap to explain
    ({0: 1.0, 5: 0.7, 10: 0.5, 20: 0.45}, "overfitting"),  # its last evaluation at step 20, before the run's rise
    ({0: 1.0, 20: 0.3, 30: 0.45}, "overfitting"),  # three evaluations: whether it rose is unknown
])
def test_overfitting_that_the_reference_did_not_show_is_lr_too_high(tmp_path, reference_evals, expected):
    run = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, evals=OVERFIT, eval_se=0.01)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals=reference_evals, eval_se=0.01)
    findings = diagnose(run, reference=full)
    assert [code for code in codes(findings) if code in ("overfitting", "lr_too_high")] == [expected]
    assert "overfitting" in codes(diagnose(run))  # without the reference the records cannot tell
    if expected == "lr_too_high":
        finding = only(findings, "lr_too_high")
        assert finding.evidence["best_step"] == 20 and "did not rise over its 30 steps" in finding.title


def test_steps_too_large_against_the_reference_are_a_training_fault(tmp_path):
    """Overfitting that the reference did not show is lr_too_high, decided before the other checks: no
    undertrained beside it (its training loss at ~0.95 of its first would say "train longer"), and no LoRA
    optimizer_state info (a broken run's alignment says little)."""
    late = HEALTHY | {"shadow_precond_proj_cosine": 0.5}
    run = write_run(tmp_path / "lora", "lora", late=late, snapshot=SNAPSHOT, evals=OVERFIT, eval_se=0.01,
                    loss=lambda step: 1.0 if step == 1 else 0.97 - 0.001 * step)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals={0: 1.0, 10: 0.6, 20: 0.46, 30: 0.45},
                     eval_se=0.01)
    alone = codes(diagnose(run))
    assert {"undertrained", "overfitting"} <= set(alone)
    against = codes(diagnose(run, reference=full))
    assert "lr_too_high" in against and "undertrained" not in against and "optimizer_state" not in against


@pytest.mark.parametrize("method, lr_ratio, expected", [
    ("loft", 3e-3, "optimizer_state"),  # LoFT's steps a small fraction of its lr's scale: its update, not the lr
    ("loft", 0.3, "undertrained"),  # steps of the lr's scale, tiny against the weights: the lr is too small
    ("lora", 3e-3, "undertrained"),  # LoRA's step has no scale in units of the lr
])
def test_a_still_loft_run_whose_steps_fall_short_of_its_lr(tmp_path, method, lr_ratio, expected):
    late = HEALTHY | {"update_lr_ratio": lr_ratio, "update_weight_ratio": 1e-6}
    hyper = {"lr": 1e-3, "projected_update": False}
    findings = diagnose(write_run(tmp_path / method, method, late=late, snapshot=SNAPSHOT, loss=lambda step: 1.0,
                                  hyper=hyper))
    found = [code for code in codes(findings) if code in ("optimizer_state", "undertrained")]
    assert found == [expected]
    if expected == "optimizer_state":
        finding = only(findings, "optimizer_state")
        assert finding.evidence["update_lr_ratio_max"] == lr_ratio and "projected_update=False" in finding.suggestion


def test_dead_gradients_name_the_layer(tmp_path):
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=HEALTHY | {"grad_norm": {"l0": 0.0, "l1": 1.0}},
                                  snapshot=SNAPSHOT))
    finding = only(findings, "dead_gradients")
    assert finding.evidence["layers"] == "l0" and finding.evidence["layers_dead"] == 1


@pytest.mark.parametrize("factor", ["a", "b"])
def test_a_frozen_factor_is_named(tmp_path, factor):
    late = HEALTHY | {f"factor_{factor}_change_norm": {"l0": 0.0, "l1": 0.5}}
    finding = only(diagnose(write_run(tmp_path / "lora", "lora", late=late, snapshot=SNAPSHOT)), "frozen_factor")
    assert finding.evidence["factors"] == f"l0 ({factor.upper()})"
    assert ("B = 0" in finding.title) is (factor == "b")


# ---------------------------------------------------------------------------------------------- subspace and optimizer
@pytest.mark.parametrize("residual, r90, expected", [
    (T.RESIDUAL_HIGH.value + 0.05, 8, "rank_too_low"),
    (T.RESIDUAL_HIGH.value + 0.05, 5, None),  # the rank has room left: the residual alone does not limit it
    (T.RESIDUAL_HIGH.value - 0.05, 8, None),
])
def test_rank_too_low_needs_a_high_residual_and_a_used_rank(tmp_path, residual, r90, expected):
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY | {"residual_tangent": residual},
                                  snapshot={"delta_r90": r90, "intruders": 0}))
    assert ({"rank_too_low", "gap_from_subspace"} & set(codes(findings))) == ({expected} if expected else set())
    if expected:
        assert "rank 16" in only(findings, "rank_too_low").suggestion


@pytest.mark.parametrize("high_layers, expected", [(1, "gap_from_subspace"), (2, "rank_too_low"),
                                                   (3, "rank_too_low")])
def test_subspace_limit_local_or_run_wide(tmp_path, high_layers, expected):
    """Fewer than RANK_LAYER_FRACTION of the layers limited: the layers; at least that: the run's rank."""
    layers = ["l0", "l1", "l2", "l3"]
    residual = {layer: 0.95 if i < high_layers else 0.2 for i, layer in enumerate(layers)}
    findings = diagnose(write_run(tmp_path / "loft", "loft", layers=layers,
                                  late=HEALTHY | {"residual_tangent": residual},
                                  snapshot={"delta_r90": 8, "intruders": 0}))
    assert {"rank_too_low", "gap_from_subspace"} & set(codes(findings)) == {expected}
    assert only(findings, expected).evidence["layers_limited"] == high_layers


def test_worst_layers_first_and_at_most_worst_shown(tmp_path):
    layers = [f"l{i}" for i in range(5)]
    residual = {"l0": 0.86, "l1": 0.99, "l2": 0.9, "l3": 0.95, "l4": 0.87}
    finding = only(diagnose(write_run(tmp_path / "loft", "loft", layers=layers,
                                      late=HEALTHY | {"residual_tangent": residual},
                                      snapshot={"delta_r90": 8, "intruders": 0})), "rank_too_low")
    shown = [key for key in finding.evidence if key in layers]
    assert shown == ["l1", "l3", "l2"][: T.WORST_SHOWN]
    assert "and 2 more" in finding.title


@pytest.mark.parametrize("error, residual, expected", [
    (T.PROJ_REL_ERROR.value * 1.5, 0.2, True),
    (T.PROJ_REL_ERROR.value * 1.5, 0.95, True),  # a high residual does not hide an optimizer fault
    (T.PROJ_REL_ERROR.value * 0.5, 0.2, False),
])
def test_optimizer_state_regardless_of_the_residual(tmp_path, error, residual, expected):
    late = HEALTHY | {"shadow_m_proj_rel_error": error, "residual_tangent": residual}
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT))
    assert ("optimizer_state" in codes(findings)) is expected
    if expected:
        assert "at its default" in only(findings, "optimizer_state").suggestion


def test_optimizer_state_names_the_switches_changed(tmp_path):
    hyper = {"lr": 1e-3, "transport": False, "alternating": True, "second_moment": "simple"}
    late = HEALTHY | {"shadow_m_proj_rel_error": 5.0}
    finding = only(diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT, hyper=hyper)),
                   "optimizer_state")
    assert "transport=False" in finding.suggestion and "second_moment='simple'" in finding.suggestion
    assert "alternating" not in finding.suggestion


# LoRA's lifted steps: aligned late (0.96) but not over the first two thirds of the run (0.3), as matfact's LoRA
MISALIGNED_EARLY = ({**HEALTHY, "shadow_precond_proj_cosine": 0.3}, {**HEALTHY, "shadow_precond_proj_cosine": 0.96})


@pytest.mark.parametrize("early, late, fires", [(0.3, 0.96, True), (0.96, 0.3, False), (0.95, 0.95, False),
                                                (0.93, 0.93, True)])
def test_lora_steps_away_from_full_finetuning_over_the_run_is_information(tmp_path, early, late, fires):
    """Decided on the whole run's median of shadow_precond_proj_cosine against LORA_PRECOND_ALIGNED (0.94):
    an info without a reference, and no warning on a healthy run."""
    findings = diagnose(write_run(tmp_path / "lora", "lora", snapshot=SNAPSHOT,
                                  early=HEALTHY | {"shadow_precond_proj_cosine": early},
                                  late=HEALTHY | {"shadow_precond_proj_cosine": late}))
    assert codes(findings) == (["optimizer_state"] if fires else [])
    if fires:
        finding = findings[0]
        assert finding.severity == "info" and finding.evidence["median"] == pytest.approx(min(early, late))
        assert finding.evidence["layers_below"] == 2 and "a LoFT run of the same rank tells" in finding.suggestion


@pytest.mark.parametrize("evals, severity", [({0: 2.0, 30: 1.0}, "warning"), ({0: 2.0, 30: 0.55}, "info")])
def test_lora_steps_away_warn_only_when_they_are_all_that_explains_a_loss_gap(tmp_path, evals, severity):
    """Against a reference: a warning (try LoFT) when the run ends short of it and nothing else names a cause;
    information that it cost nothing when the run matches it."""
    early, late = MISALIGNED_EARLY
    adapter = write_run(tmp_path / "lora", "lora", early=early, late=late, snapshot=SNAPSHOT, evals=evals)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals=EVALS_FULL)
    findings = diagnose(adapter, reference=full)
    finding = only(findings, "optimizer_state")
    assert finding.severity == severity
    if severity == "warning":
        assert "Try LoFT at the same rank" in finding.suggestion and "nothing else in the record" in finding.title
        assert "Nothing else in the record" not in only(findings, "loss_gap").title  # it names this one
    else:
        assert "costs nothing measurable" in finding.title and "Nothing to change" in finding.suggestion


def test_lora_steps_away_are_not_blamed_in_a_broken_run(tmp_path):
    """A frozen factor explains more than the direction of the other factor's steps (issue 10: frozen-A runs
    were told to try LoFT)."""
    early, late = MISALIGNED_EARLY
    findings = diagnose(write_run(tmp_path / "lora", "lora", early=early | {"factor_a_change_norm": 0.0},
                                  late=late | {"factor_a_change_norm": 0.0}, snapshot=SNAPSHOT))
    assert codes(findings) == ["frozen_factor"]


@pytest.mark.parametrize("r90, expected", [({"l0": 2, "l1": 1}, True), ({"l0": 2, "l1": 3}, False)])
def test_rank_more_than_needed(tmp_path, r90, expected):
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY, snapshot={"delta_r90": r90, "intruders": 0},
                                  rank=8))
    assert ("rank_more_than_needed" in codes(findings)) is expected
    if expected:
        finding = only(findings, "rank_more_than_needed")
        assert finding.severity == "info" and finding.evidence["max_r90"] == 2 and finding.evidence["rank"] == 8


# ---------------------------------------------------------------------------------------------- against the reference
def test_intruders_need_a_reference(tmp_path):
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot={"delta_r90": 6, "intruders": 3}))
    assert "intruders" not in codes(findings)


@pytest.mark.parametrize("mine, theirs, fires", [(3, 1, True), (1, 2, False), (2, 2, False)])
def test_intruders_against_reference(tmp_path, mine, theirs, fires):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot={"delta_r90": 6, "intruders": mine},
                        snapshot_files=True)
    full = write_run(tmp_path / "full", "full", late={}, snapshot={"delta_r90": 6, "intruders": theirs},
                     snapshot_files=True)
    findings = diagnose(adapter, reference=full)
    assert ("intruders" in codes(findings)) is fires
    if fires:
        finding = only(findings, "intruders")
        assert finding.evidence["total"] == 2 * mine and finding.evidence["reference_total"] == 2 * theirs


def test_intruders_not_reported_from_a_zero_base(tmp_path):
    """delta_rel_size is undefined (missing) exactly when W_0 = 0 (matfact): no pretrained directions to intrude."""
    late = {k: v for k, v in HEALTHY.items() if k != "delta_rel_size"}
    adapter = write_run(tmp_path / "lora", "lora", late=late, snapshot={"delta_r90": 6, "intruders": 5},
                        snapshot_files=True)
    full = write_run(tmp_path / "full", "full", late={}, snapshot={"delta_r90": 6, "intruders": 0},
                     snapshot_files=True)
    assert "intruders" not in codes(diagnose(adapter, reference=full))


EVALS_FULL = {0: 2.0, 10: 1.0, 20: 0.52, 30: 0.5}


@pytest.mark.parametrize("final, severity", [(0.7, "warning"), (0.6, "info"), (0.4, "info")])
def test_loss_gap_as_a_share_of_the_references_gain(tmp_path, final, severity):
    """Gain of the reference 2.0 → 0.5 = 1.5; 0.7 misses 13% of it (warning), 0.6 misses 7% (no)."""
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                        evals={0: 2.0, 10: 1.2, 20: 0.8, 30: final})
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals=EVALS_FULL)
    finding = only(diagnose(adapter, reference=full), "loss_gap")
    assert finding.severity == severity
    assert finding.evidence["shortfall"] == pytest.approx((final - 0.5) / 1.5)
    assert "not converged" not in finding.title


def test_loss_gap_floor_two_converged_runs_do_not_differ(tmp_path):
    """A solved run at 1.5e-8 against a reference at 1e-9 is not "+1400%": both kept all of the gain."""
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, evals={0: 1.0, 30: 1.5e-8})
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals={0: 1.0, 20: 2e-9, 30: 1e-9})
    assert only(diagnose(adapter, reference=full), "loss_gap").severity == "info"


def test_a_shorter_run_is_never_called_better(tmp_path):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, evals={0: 2.0, 20: 0.45})
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals=EVALS_FULL)
    finding = only(diagnose(adapter, reference=full), "loss_gap")
    assert "no worse" not in finding.title and "ran 20 steps against full's 30" in finding.title


def test_a_reference_that_has_not_converged_is_called_out(tmp_path):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, evals={0: 2.0, 30: 1.2})
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals={0: 2.0, 10: 1.8, 20: 1.5, 30: 1.0})
    finding = only(diagnose(adapter, reference=full), "loss_gap")
    assert "full itself has not converged" in finding.title


def test_a_gap_within_the_held_out_noise_is_not_a_warning(tmp_path):
    """0.7 against 0.5 misses 13% of the gain (a warning at se 0.01), but 0.2 is within 2·0.15."""
    for se, severity in ((0.01, "warning"), (0.15, "info")):
        adapter = write_run(tmp_path / f"lora{se}", "lora", late=HEALTHY, snapshot=SNAPSHOT,
                            evals={0: 2.0, 10: 1.2, 20: 0.8, 30: 0.7}, eval_se=se)
        full = write_run(tmp_path / f"full{se}", "full", late={}, snapshot=SNAPSHOT, evals=EVALS_FULL, eval_se=se)
        finding = only(diagnose(adapter, reference=full), "loss_gap")
        assert finding.severity == severity
        assert ("within the held-out set's noise" in finding.title) is (severity == "info")


def test_a_reference_still_falling_within_its_noise_is_converged(tmp_path):
    """The reference's last interval fell 0.5 (33% of its gain): called out at se 0.01, not at se 0.3."""
    for se, called in ((0.01, True), (0.3, False)):
        adapter = write_run(tmp_path / f"lora{se}", "lora", late=HEALTHY, snapshot=SNAPSHOT, evals={0: 2.0, 30: 1.2},
                            eval_se=se)
        full = write_run(tmp_path / f"full{se}", "full", late={}, snapshot=SNAPSHOT,
                         evals={0: 2.0, 10: 1.8, 20: 1.5, 30: 1.0}, eval_se=se)
        assert ("not converged" in only(diagnose(adapter, reference=full), "loss_gap").title) is called


def test_an_unexplained_lora_gap_says_so(tmp_path):
    """LoRA's steps aligned with full fine-tuning's (no optimizer_state) and no other finding: nothing names the gap."""
    late = HEALTHY | {"shadow_precond_proj_cosine": 0.99}
    adapter = write_run(tmp_path / "lora", "lora", late=late, snapshot=SNAPSHOT, evals={0: 2.0, 30: 1.0})
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, evals=EVALS_FULL)
    findings = diagnose(adapter, reference=full)
    assert codes(findings) == ["loss_gap"]
    assert findings[0].severity == "warning" and "Nothing else in the record names a cause" in findings[0].title


def test_loss_gap_without_common_losses(tmp_path):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=None)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT)
    finding = only(diagnose(adapter, reference=full), "loss_gap")
    assert finding.severity == "info" and "share no loss" in finding.title


def test_incompatible_reference_is_refused(tmp_path):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, seed=1)
    with pytest.raises(IncompatibleRunsError, match="seed"):
        diagnose(adapter, reference=full)


# ---------------------------------------------------------------------------------------------- sparse runs
def test_no_shadow_says_what_to_turn_on(tmp_path):
    findings = diagnose(write_run(tmp_path / "lora", "lora", late={"cos_moment_grad": 0.8, "update_lr_ratio": 0.5},
                                  snapshot=SNAPSHOT, shadow=False))
    finding = only(findings, "not_recorded")
    assert finding.severity == "info" and "shadow=True" in finding.suggestion
    assert "Gradients(capture=True)" in finding.suggestion  # the residual needs the captured gradient too
    assert not {"optimizer_state", "rank_too_low", "gap_from_subspace"} & set(codes(findings))


def test_empty_run(tmp_path):
    write_meta(tmp_path, {"name": "x", "method": "lora", "layers": [{"name": "l0", "shape": [4, 4], "kind": "lora",
                                                                      "rank": 2, "scale": 1.0}]})
    findings = diagnose(load_run(tmp_path))
    assert codes(findings) == ["not_recorded"] and "no metrics" in findings[0].title
    assert "not closed" in describe_run(load_run(tmp_path))


def test_sparse_run_does_not_crash(tmp_path):
    """Only a loss, one layer metric at one step, NaN values and a layer missing from the meta table."""
    write_meta(tmp_path, {"name": "x", "method": "loft", "layers": [{"name": "l0", "shape": [4, 4], "kind": "lora",
                                                                      "rank": 2, "scale": 1.0}], "closed": False})
    write_metrics_part(tmp_path, [(1, "", "loss", 1.0), (2, "l0", "shadow_update_cosine", math.nan),
                                  (2, "ghost", "residual_tangent", 0.9), (2, "l0", "shadow_m_proj_cosine", 0.1)])
    run_ = load_run(tmp_path)
    findings = diagnose(run_)
    assert "not_recorded" in codes(findings)
    json.loads(findings_to_json(findings))
    assert "not_recorded" in format_findings(findings)
    assert "method loft" in describe_run(run_) and run_headline(run_)["name"] == "x"


# ---------------------------------------------------------------------------------------------- output
def test_format_and_json():
    findings = [Finding("a_code", "warning", "A title.", {"threshold": 0.5, "layer.0": 0.25, "path": "x"}, "Do it."),
                Finding("b_code", "info", "B title.", {"gap": math.inf, "count": 3.0}, "Nothing.")]
    text = format_findings(findings)
    assert text.splitlines()[0] == "[warning] a_code: A title."
    assert "threshold=0.5, layer.0=0.25, path=x" in text and "count=3" in text and "try: Do it." in text
    items = json.loads(findings_to_json(findings))
    assert [item["code"] for item in items] == ["a_code", "b_code"]
    assert items[0]["evidence"] == {"threshold": 0.5, "layer.0": 0.25, "path": "x"}
    assert items[1]["evidence"]["gap"] == "inf"
    assert set(items[0]) == {"code", "severity", "title", "evidence", "suggestion"}


def test_warnings_come_first(tmp_path):
    late = HEALTHY | {"shadow_m_proj_rel_error": 5.0}
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot={"delta_r90": 1, "intruders": 0}))
    assert codes(findings) == ["optimizer_state", "rank_more_than_needed"]  # the warning before the info


def test_a_broken_run_gets_no_rank_advice(tmp_path):
    """A frozen factor (a training fault) leaves ΔW degenerate: its small r90 says nothing about the rank."""
    late = HEALTHY | {"factor_a_change_norm": 0.0}
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=late, snapshot={"delta_r90": 1, "intruders": 0}))
    assert codes(findings) == ["frozen_factor"]


def test_undefined_metrics_do_not_ask_for_a_switch_that_is_on(tmp_path):
    """A dead layer has no residuals (undefined at G = 0): that is dead_gradients, not "turn on capture_grad"."""
    late = {k: v for k, v in HEALTHY.items() if k != "residual_tangent"} | {"grad_norm": 0.0}
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=late, snapshot=SNAPSHOT))
    assert "dead_gradients" in codes(findings) and "not_recorded" not in codes(findings)


def test_describe_run_lists_everything(tmp_path):
    layers = [f"layer{i}" for i in range(D.MAX_LAYERS_SHOWN + 2)]
    text = describe_run(write_run(tmp_path / "lora", "lora", layers=layers, late=HEALTHY, snapshot=SNAPSHOT))
    assert "method lora, optimizer AdamW" in text
    assert "closed at step 30" in text and "recorded steps: 6 (5–30)" in text
    assert "layer0" in text and "16×8" in text and "rank 8" in text
    assert f"layer{D.MAX_LAYERS_SHOWN + 1}" not in text and "... and 2 more" in text
    assert "loss 30" in text and f"shadow_update_cosine {6 * len(layers)}" in text


# ---------------------------------------------------------------------------------------------- real runs
# digits_runs: the session's full, LoRA and LoFT digits runs from one seed, 30 steps recorded every 5 (conftest.py)
def test_real_full_run(digits_runs):
    found = set(codes(diagnose(digits_runs["full"])))
    # A full run is its own shadow: no subspace, no factors, no optimizer-state gap; a short healthy run.
    assert not found & {"rank_too_low", "gap_from_subspace", "optimizer_state", "frozen_factor", "dead_gradients",
                        "step_too_large", "diverged", "not_recorded", "loss_gap"}


@pytest.mark.parametrize("method", ["lora", "loft"])
def test_real_adapter_runs(digits_runs, method):
    findings = diagnose(digits_runs[method], reference=digits_runs["full"])
    found = codes(findings)
    assert "loss_gap" in found and "not_recorded" not in found
    assert not {"diverged", "step_too_large", "dead_gradients", "frozen_factor"} & set(found)
    warned = {f.code for f in findings if f.severity == "warning"}
    assert "optimizer_state" not in warned  # LoFT's moments are aligned; LoRA's cost nothing on digits
    for f in findings:
        assert f.severity in ("info", "warning") and f.title and f.suggestion
        assert all(isinstance(v, str) or math.isfinite(v) for v in f.evidence.values())
    loss_gap = only(findings, "loss_gap")
    assert loss_gap.evidence["reference"] == "full" and loss_gap.evidence["metric"] == "eval_loss"
    json.loads(findings_to_json(findings))


def test_real_run_without_shadow(tmp_path):
    path = run(RunConfig(task="digits", method="lora", out=tmp_path / "lora", steps=10, every=5, shadow=False))
    finding = only(diagnose(load_run(path)), "not_recorded")
    assert "shadow=True" in finding.suggestion


def test_headline_of_real_run(digits_runs):
    numbers = run_headline(digits_runs["loft"])
    assert numbers["name"] == "loft" and numbers["last_step"] == 30
    assert 0 <= numbers["eval_accuracy"] <= 1 and -1 <= numbers["update_cosine"] <= 1 and numbers["loss"] > 0


# ---------------------------------------------------------------------------------------------- non-finite runs
def test_a_diverged_run_is_a_finding_never_a_pass(tmp_path):
    """NaN loss from step 21 and NaN updates in l1 from step 25: "diverged at step 21", and no loss gap "within
    10%" computed from NaN."""
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT)
    write_metrics_part(tmp_path / "lora", [(t, "", "loss", math.nan) for t in range(21, 31)]
                       + [(t, "l1", "update_norm", math.nan) for t in (25, 30)])
    adapter = load_run(tmp_path / "lora")
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT)
    findings = diagnose(adapter, reference=full)
    assert codes(findings)[0] == "diverged"
    diverged = only(findings, "diverged")
    assert diverged.severity == "warning" and "diverged at step 21" in diverged.title
    assert diverged.evidence["first_step"] == 21 and diverged.evidence["last_step"] == 30
    gap = only(findings, "loss_gap")
    assert gap.severity == "warning" and "not finite" in gap.title and "No loss gap" not in gap.suggestion
    json.loads(findings_to_json(findings))  # evidence stays valid JSON


def test_nonfinite_steps_the_run_recovered_from_are_named(tmp_path):
    run_ = write_run(tmp_path / "loft", "loft", late=HEALTHY, snapshot=SNAPSHOT)
    write_metrics_part(tmp_path / "loft", [(7, "", "skipped_step", 1.0), (7, "", "loss", math.nan)])
    finding = only(diagnose(load_run(tmp_path / "loft")), "nonfinite_steps")
    assert finding.severity == "warning" and "first at step 7" in finding.title
    assert not any(f.code == "diverged" for f in diagnose(run_))  # the run before the damage: nothing
