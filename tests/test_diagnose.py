"""Findings of `loft_probe.diagnosis` on synthetic run directories (each threshold crossed and not crossed)
and on real small digits runs (full, LoRA, LoFT from the same seed)."""

import json
import math
from pathlib import Path

import pytest
import torch

from loft_probe import diagnosis as D
from loft_probe.comparison import IncompatibleRunsError
from loft_probe.diagnosis import Finding, describe_run, diagnose, findings_to_json, format_findings, headline
from loft_probe.probe.rundir import load_run, snapshot_key, write_meta, write_metrics_part, write_snapshot
from loft_probe.runner import RunConfig, run

STEPS = (5, 10, 15, 20, 25, 30)  # recorded steps: the last third is 25 and 30
SHAPE = (16, 8)


# ---------------------------------------------------------------------------------------------- synthetic runs
def write_run(path: Path, method: str = "lora", layers=("l0", "l1"), late=None, early=None, snapshot=None,
              loss=None, rank: int = 8, hyper=None, seed: int = 0, snapshot_files: bool = False):
    """A run directory with per-layer metrics: `early` values at steps 5–20, `late` at 25 and 30 (the last
    third), `snapshot` values at step 30; `loss` a run-level value at every step 1..30. Values are
    {metric: {layer: value}} or {metric: value} (every layer)."""
    kind = "full" if method == "full" else "lora"
    path.mkdir(parents=True)
    write_meta(path, {
        "name": path.name, "method": method, "optimizer": {"loft": "LoFT"}.get(method, "AdamW"),
        "hyperparameters": hyper or {"lr": 1e-3}, "seed": seed, "data_order": "synthetic", "fingerprint": "f0",
        "layers": [{"name": name, "shape": list(SHAPE), "kind": kind, "rank": None if kind == "full" else rank,
                    "scale": None if kind == "full" else 1.0} for name in layers],
        "closed": True, "last_step": STEPS[-1], "schedule": "every 5", "snapshots": "every 20",
        "shadow": True, "capture_grad": True,
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
        rows += [(step, "", "loss", float(loss)) for step in range(1, STEPS[-1] + 1)]
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


# The metrics a healthy adapter run records: aligned, expressible, moments in agreement, a used rank.
HEALTHY = {"shadow_update_cosine": 0.9, "residual_tangent": 0.2, "shadow_m_proj_cosine": 0.98,
           "shadow_m_proj_rel_error": 0.1, "cos_moment_grad": 0.8}
SNAPSHOT = {"delta_r90": 6, "intruders": 0}


def test_healthy_run_has_no_findings(tmp_path):
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY, snapshot=SNAPSHOT))
    assert findings == []
    assert format_findings(findings).startswith("No findings")


@pytest.mark.parametrize("late_cosine, expected", [(0.49, True), (0.51, False), (D.UPDATE_COSINE_MIN, False)])
def test_update_misaligned_threshold(tmp_path, late_cosine, expected):
    late = HEALTHY | {"shadow_update_cosine": {"l0": late_cosine, "l1": 0.9}}
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT))
    assert ("update_misaligned" in codes(findings)) is expected
    if expected:
        finding = only(findings, "update_misaligned")
        assert finding.severity == "warning"
        assert finding.evidence["l0"] == pytest.approx(late_cosine)
        assert "l1" not in finding.evidence and "l0" in finding.title


def test_only_the_last_third_counts(tmp_path):
    """Early misalignment that recovered is not reported; late misalignment after a good start is."""
    good, bad = HEALTHY | {"shadow_update_cosine": 0.9}, HEALTHY | {"shadow_update_cosine": 0.2}
    recovered = diagnose(write_run(tmp_path / "a", "loft", early=bad, late=good, snapshot=SNAPSHOT))
    drifted = diagnose(write_run(tmp_path / "b", "loft", early=good, late=bad, snapshot=SNAPSHOT))
    assert "update_misaligned" not in codes(recovered)
    assert "update_misaligned" in codes(drifted)


def test_worst_layers_first_and_at_most_worst_shown(tmp_path):
    layers = [f"l{i}" for i in range(5)]
    cosines = {"l0": 0.4, "l1": 0.1, "l2": 0.3, "l3": 0.2, "l4": 0.45}
    findings = diagnose(write_run(tmp_path / "loft", "loft", layers=layers,
                                  late=HEALTHY | {"shadow_update_cosine": cosines}, snapshot=SNAPSHOT))
    finding = only(findings, "update_misaligned")
    shown = [key for key in finding.evidence if key in layers]
    assert shown == ["l1", "l3", "l2"][: D.WORST_SHOWN]
    assert finding.evidence["layers_below"] == 5
    assert "and 2 more" in finding.title


@pytest.mark.parametrize("residual, expected", [(0.6, "rank_too_low"), (0.5, None), (0.4, None)])
def test_rank_too_low_threshold(tmp_path, residual, expected):
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY | {"residual_tangent": residual},
                                  snapshot=SNAPSHOT))
    assert ({"rank_too_low", "gap_from_subspace"} & set(codes(findings))) == ({expected} if expected else set())
    if expected:
        assert "--rank 16" in only(findings, "rank_too_low").suggestion


@pytest.mark.parametrize("high_layers, expected", [(1, "gap_from_subspace"), (2, "rank_too_low"),
                                                   (3, "rank_too_low")])
def test_subspace_limit_local_or_run_wide(tmp_path, high_layers, expected):
    """Fewer than RANK_LAYER_FRACTION of the layers limited: the layers; at least that: the run's rank."""
    layers = ["l0", "l1", "l2", "l3"]
    residual = {layer: 0.8 if i < high_layers else 0.2 for i, layer in enumerate(layers)}
    findings = diagnose(write_run(tmp_path / "loft", "loft", layers=layers,
                                  late=HEALTHY | {"residual_tangent": residual}, snapshot=SNAPSHOT))
    assert {"rank_too_low", "gap_from_subspace"} & set(codes(findings)) == {expected}
    assert only(findings, expected).evidence["layers_above"] == high_layers


@pytest.mark.parametrize("proj_cosine, proj_error, expected", [
    (0.8, 0.1, True),  # the angle is off
    (0.95, 0.6, True),  # the length is off
    (0.95, 0.4, False),
    (D.PROJ_COSINE_MIN, D.PROJ_REL_ERROR_MAX, False),  # exactly at the thresholds: not off
])
def test_gap_from_optimizer_loft(tmp_path, proj_cosine, proj_error, expected):
    late = HEALTHY | {"shadow_m_proj_cosine": proj_cosine, "shadow_m_proj_rel_error": proj_error}
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT))
    assert ("gap_from_optimizer" in codes(findings)) is expected
    if expected:
        assert "Every LoFT switch is on" in only(findings, "gap_from_optimizer").suggestion


def test_gap_from_optimizer_needs_a_modest_residual(tmp_path):
    """Where the subspace cannot express G, an off moment is the subspace's doing: not the optimizer's."""
    late = HEALTHY | {"residual_tangent": {"l0": 0.9, "l1": 0.2}, "shadow_m_proj_cosine": 0.5}
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT))
    finding = only(findings, "gap_from_optimizer")
    assert "l1" in finding.evidence and "l0" not in finding.evidence
    assert "gap_from_subspace" not in codes(findings)  # 1 of 2 layers is RANK_LAYER_FRACTION: the rank
    assert "rank_too_low" in codes(findings)


def test_gap_from_optimizer_names_the_switches_turned_off(tmp_path):
    hyper = {"lr": 1e-3, "transport": False, "alternating": True, "second_moment": "simple"}
    late = HEALTHY | {"shadow_m_proj_cosine": 0.5}
    finding = only(diagnose(write_run(tmp_path / "loft", "loft", late=late, snapshot=SNAPSHOT, hyper=hyper)),
                   "gap_from_optimizer")
    assert "--no-transport" in finding.suggestion and "--second-moment simple" in finding.suggestion
    assert "--no-alternating" not in finding.suggestion


@pytest.mark.parametrize("update_cosine, expected", [(0.4, True), (0.6, False)])
def test_gap_from_optimizer_lora_uses_the_update_cosine(tmp_path, update_cosine, expected):
    """LoRA has no full-space moments: with a modest residual, a misaligned step is the optimizer's."""
    late = {"shadow_update_cosine": update_cosine, "residual_tangent": 0.3, "cos_moment_grad": 0.8}
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=late, snapshot=SNAPSHOT))
    assert ("gap_from_optimizer" in codes(findings)) is expected
    if expected:
        assert "--method loft" in only(findings, "gap_from_optimizer").suggestion


@pytest.mark.parametrize("moment_cosine, severity", [(0.2, "warning"), (0.5, "info"),
                                                     (D.MOMENT_GRAD_COSINE_MIN, "info")])
def test_factor_moments_lora(tmp_path, moment_cosine, severity):
    late = {"shadow_update_cosine": 0.9, "residual_tangent": 0.3, "cos_moment_grad": moment_cosine}
    finding = only(diagnose(write_run(tmp_path / "lora", "lora", late=late, snapshot=SNAPSHOT)), "factor_moments")
    assert finding.severity == severity
    assert "no full-space moments" in finding.title
    assert finding.evidence["median_cos_moment_grad"] == pytest.approx(moment_cosine)


def test_factor_moments_only_for_lora(tmp_path):
    late = HEALTHY | {"cos_moment_grad": 0.1}
    assert "factor_moments" not in codes(diagnose(write_run(tmp_path / "loft", "loft", late=late,
                                                            snapshot=SNAPSHOT)))


@pytest.mark.parametrize("r90, expected", [({"l0": 2, "l1": 1}, True), ({"l0": 2, "l1": 3}, False)])
def test_rank_more_than_needed(tmp_path, r90, expected):
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY, snapshot={"delta_r90": r90, "intruders": 0},
                                  rank=8))
    assert ("rank_more_than_needed" in codes(findings)) is expected
    if expected:
        finding = only(findings, "rank_more_than_needed")
        assert finding.severity == "info" and finding.evidence["max_r90"] == 2 and finding.evidence["rank"] == 8


def test_rank_more_than_needed_yields_to_a_high_residual(tmp_path):
    """A small r90 with a high residual says the rank is too low for the gradient, not more than needed."""
    findings = diagnose(write_run(tmp_path / "loft", "loft", late=HEALTHY | {"residual_tangent": 0.9},
                                  snapshot={"delta_r90": 1, "intruders": 0}))
    assert "rank_too_low" in codes(findings) and "rank_more_than_needed" not in codes(findings)


@pytest.mark.parametrize("counts, severity", [({"l0": 3, "l1": 0}, "warning"), ({"l0": 0, "l1": 0}, None)])
def test_intruders_without_reference(tmp_path, counts, severity):
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=HEALTHY,
                                  snapshot={"delta_r90": 6, "intruders": counts}))
    if severity is None:
        assert "intruders" not in codes(findings)
    else:
        finding = only(findings, "intruders")
        assert finding.severity == severity and finding.evidence["total"] == 3 and finding.evidence["l0"] == 3
        assert "l1" not in finding.evidence


@pytest.mark.parametrize("mine, theirs, severity", [(3, 1, "warning"), (1, 2, "info"), (2, 2, "info")])
def test_intruders_against_reference(tmp_path, mine, theirs, severity):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot={"delta_r90": 6, "intruders": mine},
                        loss=1.0, snapshot_files=True)
    full = write_run(tmp_path / "full", "full", late={}, snapshot={"delta_r90": 6, "intruders": theirs},
                     loss=1.0, snapshot_files=True)
    finding = only(diagnose(adapter, reference=full), "intruders")
    assert finding.severity == severity
    assert finding.evidence["total"] == 2 * mine and finding.evidence["reference_total"] == 2 * theirs
    assert "(full: " in finding.title


def test_full_run_intruders_are_information(tmp_path):
    finding = only(diagnose(write_run(tmp_path / "full", "full", late={}, snapshot={"intruders": 1, "delta_r90": 3})),
                   "intruders")
    assert finding.severity == "info"


@pytest.mark.parametrize("loss, severity", [(1.2, "warning"), (1.05, "info"), (0.8, "info")])
def test_loss_gap(tmp_path, loss, severity):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=loss)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, loss=1.0)
    finding = only(diagnose(adapter, reference=full), "loss_gap")
    assert finding.severity == severity
    assert finding.evidence["relative_gap"] == pytest.approx(loss - 1.0)
    assert finding.evidence["from_step"] == 21 and finding.evidence["to_step"] == 30  # the last third


def test_loss_gap_without_common_losses(tmp_path):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, loss=1.0)
    finding = only(diagnose(adapter, reference=full), "loss_gap")
    assert finding.severity == "info" and "share no step" in finding.title


def test_incompatible_reference_is_refused(tmp_path):
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=1.0)
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, loss=1.0, seed=1)
    with pytest.raises(IncompatibleRunsError, match="seed"):
        diagnose(adapter, reference=full)


# ---------------------------------------------------------------------------------------------- sparse runs
def test_no_shadow_says_what_to_turn_on(tmp_path):
    findings = diagnose(write_run(tmp_path / "lora", "lora", late={"cos_moment_grad": 0.8}, snapshot=SNAPSHOT))
    finding = only(findings, "not_recorded")
    assert finding.severity == "info" and "shadow=True" in finding.suggestion
    assert "capture_grad=True" in finding.suggestion  # the residual needs the captured gradient too
    assert not {"update_misaligned", "gap_from_optimizer", "rank_too_low"} & set(codes(findings))


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
    assert format_findings(findings)
    assert describe_run(run_) and headline(run_)["name"] == "x"


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
    late = {"shadow_update_cosine": 0.9, "residual_tangent": 0.3, "cos_moment_grad": 0.8}
    findings = diagnose(write_run(tmp_path / "lora", "lora", late=late, snapshot={"delta_r90": 6, "intruders": 2}))
    assert codes(findings) == ["intruders", "factor_moments"]  # the warning before the info


def test_describe_run_lists_everything(tmp_path):
    layers = [f"layer{i}" for i in range(D.MAX_LAYERS_SHOWN + 2)]
    text = describe_run(write_run(tmp_path / "lora", "lora", layers=layers, late=HEALTHY, snapshot=SNAPSHOT,
                                  loss=1.0))
    assert "method lora, optimizer AdamW" in text
    assert "closed at step 30" in text and "recorded steps: 6 (5–30)" in text
    assert "layer0" in text and "16×8" in text and "rank 8" in text
    assert f"layer{D.MAX_LAYERS_SHOWN + 1}" not in text and "... and 2 more" in text
    assert "loss 30" in text and f"shadow_update_cosine {6 * len(layers)}" in text


# ---------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Full, LoRA and LoFT fine-tuning of the digits task from one seed, 30 steps recorded every 5."""
    root = tmp_path_factory.mktemp("digits")
    return {method: load_run(run(RunConfig(task="digits", method=method, out=root / method, steps=30, every=5)))
            for method in ("full", "lora", "loft")}


def test_real_full_run(digits_runs):
    found = set(codes(diagnose(digits_runs["full"])))
    # A full run is its own shadow: nothing can be misaligned, no subspace, no factor moments.
    assert not found & {"update_misaligned", "rank_too_low", "gap_from_subspace", "gap_from_optimizer",
                        "factor_moments", "not_recorded", "loss_gap"}


@pytest.mark.parametrize("method", ["lora", "loft"])
def test_real_adapter_runs(digits_runs, method):
    findings = diagnose(digits_runs[method], reference=digits_runs["full"])
    found = codes(findings)
    assert ("factor_moments" in found) is (method == "lora")
    assert "loss_gap" in found and "not_recorded" not in found
    for f in findings:
        assert f.severity in ("info", "warning") and f.title and f.suggestion
        assert all(isinstance(v, str) or math.isfinite(v) for v in f.evidence.values())
    loss_gap = only(findings, "loss_gap")
    assert loss_gap.evidence["reference"] == "full" and "eval_loss" in loss_gap.evidence
    json.loads(findings_to_json(findings))


def test_real_run_without_shadow(tmp_path):
    path = run(RunConfig(task="digits", method="lora", out=tmp_path / "lora", steps=10, every=5, shadow=False))
    finding = only(diagnose(load_run(path)), "not_recorded")
    assert "shadow=True" in finding.suggestion


def test_headline_of_real_run(digits_runs):
    numbers = headline(digits_runs["loft"])
    assert numbers["name"] == "loft" and numbers["last_step"] == 30
    assert 0 <= numbers["eval_accuracy"] <= 1 and -1 <= numbers["update_cosine"] <= 1 and numbers["loss"] > 0


# ---------------------------------------------------------------------------------------------- non-finite runs
def test_a_diverged_run_is_a_finding_never_a_pass(tmp_path):
    """NaN loss from step 21 and NaN updates in l1 from step 25: "diverged at step 21", and no loss gap "within
    10%" computed from NaN."""
    adapter = write_run(tmp_path / "lora", "lora", late=HEALTHY, snapshot=SNAPSHOT, loss=1.0)
    write_metrics_part(tmp_path / "lora", [(t, "", "loss", math.nan) for t in range(21, 31)]
                       + [(t, "l1", "update_norm", math.nan) for t in (25, 30)])
    adapter = load_run(tmp_path / "lora")
    full = write_run(tmp_path / "full", "full", late={}, snapshot=SNAPSHOT, loss=1.0)
    findings = diagnose(adapter, reference=full)
    assert codes(findings)[0] == "diverged"
    diverged = only(findings, "diverged")
    assert diverged.severity == "warning" and "diverged at step 21" in diverged.title
    assert diverged.evidence["first_step"] == 21 and diverged.evidence["last_step"] == 30
    gap = only(findings, "loss_gap")
    assert gap.severity == "warning" and "not finite" in gap.title and "No loss gap" not in gap.suggestion
    json.loads(findings_to_json(findings))  # evidence stays valid JSON


def test_nonfinite_steps_the_run_recovered_from_are_named(tmp_path):
    run_ = write_run(tmp_path / "loft", "loft", late=HEALTHY, snapshot=SNAPSHOT, loss=1.0)
    write_metrics_part(tmp_path / "loft", [(7, "", "skipped_step", 1.0), (7, "", "loss", math.nan)])
    finding = only(diagnose(load_run(tmp_path / "loft")), "nonfinite_steps")
    assert finding.severity == "warning" and "first at step 7" in finding.title
    assert not any(f.code == "diverged" for f in diagnose(run_))  # the run before the damage: nothing
