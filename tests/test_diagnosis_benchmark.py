"""The diagnosis benchmark's tiny version: digits runs with a known cause each, and the findings they must get.

The full benchmark (benchmarks/diagnosis_benchmark.py) scores ~300 runs; these five, one seed of the
calibration split, pin the findings a user must be able to trust: nothing on healthy runs, divergence named,
a rank limit named, a learning rate too high named. Each run takes a few seconds.
"""

import math

import pandas as pd
import pytest

from loft_probe.diagnosis.benchmark import Case, diagnose_case, score, train, with_loft_twins
from loft_probe.diagnosis.cases import CAUSE

CASES = [("full", "healthy"), ("lora", "healthy"), ("loft", "healthy"), ("lora", "rank_too_low"),
         ("full", "lr_x100"), ("lora", "diverging")]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    cases = [Case("calibration", "digits", 0, method, cause) for method, cause in CASES]
    assert [train(case, out) for case in cases] == [""] * len(cases)
    return pd.DataFrame([diagnose_case(case, out) for case in cases]).set_index(["method", "cause"])


def codes(rows, method, cause, reference=False):
    row = rows.loc[(method, cause)]
    suffix = "_ref" if reference else ""
    return set(row["warnings" + suffix].split()), set(row["infos" + suffix].split())


@pytest.mark.parametrize("method", ["full", "lora", "loft"])
def test_healthy_runs_get_no_warning(rows, method):
    for reference in (False, True):
        warnings, _ = codes(rows, method, "healthy", reference)
        assert warnings == set(), (method, reference)


def test_a_diverged_run_is_named(rows):
    warnings, _ = codes(rows, "lora", "diverging")
    assert "diverged" in warnings
    assert rows.loc[("lora", "diverging"), "hurt"]


def test_a_rank_limited_run_is_named_and_its_cost_weighed(rows):
    warnings, _ = codes(rows, "lora", "rank_too_low")
    assert "rank_too_low" in warnings
    # rank 1 is enough for digits: against the reference the limit is information, not a warning
    warnings_ref, infos_ref = codes(rows, "lora", "rank_too_low", reference=True)
    assert not rows.loc[("lora", "rank_too_low"), "hurt"]
    assert "rank_too_low" in infos_ref and "rank_too_low" not in warnings_ref


def test_a_learning_rate_too_high_is_named(rows):
    warnings, _ = codes(rows, "full", "lr_x100")
    assert warnings & set(CAUSE["lr_x100"].expect) == {"lr_too_high"}


def test_the_score_counts_hits_and_false_alarms(rows):
    result = score(rows.reset_index(), reference=True)
    causes = result.causes.set_index("cause")
    assert causes.loc["healthy", "runs"] == 3 and causes.loc["healthy", "hits"] == 3
    assert causes.loc["diverging", "hits"] == 1
    assert result.summary["healthy runs without a warning"] == 1.0
    assert result.summary["hurt runs named correctly"] == 1.0
    findings = result.findings.set_index("finding")
    assert findings.loc["diverged", "precision"] == 1.0 and math.isnan(findings.loc["gap_from_subspace", "precision"])


def test_a_lora_gap_that_its_loft_twin_closes_is_the_ground_truth_of_optimizer_state():
    """A LoRA run short of full fine-tuning whose LoFT twin (same task, seed, cause) is not: LoRA's optimizer
    state made the gap, so an optimizer_state warning there is true; anywhere else it is a wrong cause."""
    rows = pd.DataFrame([
        {"split": "s", "task": "t", "seed": 0, "method": method, "cause": "healthy", "gap_to_full": gap, "hurt": False,
         "warnings": "", "infos": "", "warnings_ref": warned, "infos_ref": ""}
        for method, gap, warned in (("full", False, ""), ("lora", True, "loss_gap optimizer_state"),
                                    ("loft", False, ""))])
    rows = with_loft_twins(rows)
    assert rows["loft_closes_gap"].tolist() == [False, True, False]
    result = score(rows, reference=True)
    assert result.summary["healthy runs without a warning"] == 1.0
    assert result.summary["healthy LoRA gaps that LoFT at the same rank closes, named optimizer_state"] == 1.0
    rows.loc[2, "gap_to_full"] = True  # LoFT at that rank falls short too: the subspace, not the optimizer
    assert score(with_loft_twins(rows), reference=True).summary["healthy runs without a warning"] == 2 / 3
