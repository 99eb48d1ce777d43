"""The diagnosis benchmark's tiny version: digits runs with a known cause each, and the findings they must get.

The full benchmark (benchmarks/diagnosis_benchmark.py) scores ~300 runs; these five, one seed of the
calibration split, pin the findings a user must be able to trust: nothing on healthy runs, divergence named,
a rank limit named, a learning rate too high named. Each run takes a few seconds.
"""

import math

import pandas as pd
import pytest

from loft_probe.diagnosis.benchmark import Case, diagnose_case, part_of, parts, score, train, with_loft_twins
from loft_probe.diagnosis.cases import CALIBRATION, CAUSE, EVALUATION, HELD_OUT_TASKS, MINILM_SMALL, READ_BY_A_REFIT

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


def test_a_cause_named_by_an_info_alone_is_counted_as_a_hedge():
    """undertrained as an info (the records cannot tell) names the cause, and is counted apart; an info by design
    (rank_more_than_needed) is no hedge."""
    rows = pd.DataFrame([
        {"split": "s", "task": "t", "seed": 0, "method": "lora", "cause": cause, "gap_to_full": False, "hurt": True,
         "warnings": warned, "infos": informed, "warnings_ref": warned, "infos_ref": informed}
        for cause, warned, informed in (("too_few_steps", "", "undertrained"), ("lr_div100", "undertrained", ""),
                                        ("rank_far_too_high", "", "rank_more_than_needed"))])
    summary = score(rows, reference=False).summary
    assert summary["hurt runs named correctly"] == 1.0 and summary["hurt runs named by an info only"] == 1 / 3


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


def test_the_held_out_task_is_no_calibration_task_and_gets_its_own_line():
    assert set(HELD_OUT_TASKS) <= set(EVALUATION.tasks) and not set(HELD_OUT_TASKS) & set(CALIBRATION.tasks)
    assert set(EVALUATION.tasks) - set(HELD_OUT_TASKS) == set(CALIBRATION.tasks)
    assert not set(CALIBRATION.seeds) & set(EVALUATION.seeds)
    held_out = next(task for task in HELD_OUT_TASKS if task not in READ_BY_A_REFIT)
    rows = pd.DataFrame([
        {"split": split, "task": task, "seed": seed, "method": "lora", "cause": cause, "hurt": cause != "healthy",
         "gap_to_full": False, "warnings": warned, "infos": "", "warnings_ref": warned, "infos_ref": ""}
        for split, task, seed in (("calibration", "digits", 0), ("evaluation", "digits", 2),
                                  ("evaluation", held_out, 2))
        for cause, warned in (("healthy", ""), ("lr_x10", "lr_too_high"),
                              ("rank_too_low", "overfitting" if task == held_out else "rank_too_low"))])
    table = parts(rows).set_index("part")
    assert list(table.index) == ["calibration", "held-out seeds", f"held-out task ({held_out})", "held-out, pooled"]
    assert table.loc["held-out seeds", "hurt named"] == 1.0 and table.loc["held-out seeds", "hurt"] == 2
    line = table.loc[f"held-out task ({held_out})"]
    assert line["hurt named (reference)"] == 0.5 and line["wrong cause"] == 0.5 and line["healthy silent"] == 1.0
    pooled = table.loc["held-out, pooled"]
    assert pooled["runs"] == 6 and pooled["hurt"] == 4 and pooled["hurt named"] == 0.75
    assert pooled["tasks"] == f"digits, {held_out}" and pooled["healthy silent"] == 1.0
    assert len(parts(rows[rows["split"] == "calibration"])) == 1  # one part: nothing to pool


def test_the_convention_task_is_a_second_held_out_task_with_the_plot_tasks_options():
    assert HELD_OUT_TASKS[:2] == ("minilm-plot", "minilm-convention")
    assert EVALUATION.tasks["minilm-convention"] == EVALUATION.tasks["minilm-plot"] == MINILM_SMALL
    assert EVALUATION.seeds == (2, 3)


def test_the_debates_task_is_a_third_held_out_task_with_the_same_options():
    assert HELD_OUT_TASKS[-1] == "minilm-debates" and "minilm-debates" not in CALIBRATION.tasks
    assert EVALUATION.tasks["minilm-debates"] == MINILM_SMALL


def test_a_held_out_task_a_refit_read_is_labelled_so():
    """The plot and convention tasks were read by the refit the debates task measures: their line says it."""
    assert set(READ_BY_A_REFIT) < set(HELD_OUT_TASKS) and "minilm-debates" not in READ_BY_A_REFIT
    assert part_of("evaluation", "minilm-plot") == "held-out task, read by a refit (minilm-plot)"
    assert part_of("evaluation", "minilm-debates") == "held-out task (minilm-debates)"
    assert part_of("evaluation", "digits") == "held-out seeds" and part_of("calibration", "digits") == "calibration"
