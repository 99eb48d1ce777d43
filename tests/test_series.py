"""The one summary rule (loft_probe.run.series) on hand-made series, against values worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from loft_probe.run.series import late_slice, late_value, layer_values, summary_value
from loft_probe.run.vocabulary import END_STATE, METRICS
from loft_probe.summary import comparison_table


def frame(rows: list[tuple[int, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "layer", "value"])


def test_late_slice_takes_the_last_third_of_distinct_steps():
    assert late_slice(pd.Series([1, 2, 3, 4, 5, 6]).to_numpy()).tolist() == [False] * 4 + [True] * 2
    assert late_slice(pd.Series([1, 2, 3, 4]).to_numpy()).tolist() == [False, False, True, True]  # ceil(4/3)
    assert late_slice(pd.Series([7]).to_numpy()).tolist() == [True]
    assert late_slice(pd.Series([], dtype="int64").to_numpy()).tolist() == []


def test_late_value_is_the_median_of_the_finite_late_values():
    rows = frame([(1, "", 9.0), (2, "", 5.0), (3, "", 1.0), (4, "", 3.0), (5, "", 2.0), (6, "", 4.0)])
    assert late_value(rows) == 3.0  # steps 5 and 6: median(2, 4)
    with_nan = frame([(1, "", 1.0), (2, "", math.nan), (3, "", math.inf)])
    assert late_value(with_nan) == 1.0  # non-finite values do not count, and the late third is of what is left
    assert math.isnan(late_value(frame([(1, "", math.nan)])))


def test_layer_values_late_per_layer_or_at_the_last_step():
    rows = frame([(1, "a", 1.0), (2, "a", 2.0), (3, "a", 3.0), (1, "b", 10.0), (2, "b", 20.0), (3, "b", 30.0),
                  (2, "c", 5.0)])
    assert layer_values(rows, end_state=False).to_dict() == {"a": 3.0, "b": 30.0, "c": 5.0}
    assert layer_values(rows, end_state=True).to_dict() == {"a": 3.0, "b": 30.0}  # c has no row at step 3
    assert summary_value(rows, end_state=False) == 5.0  # median(3, 30, 5)
    assert summary_value(rows, end_state=True) == 16.5
    assert math.isnan(summary_value(frame([]), end_state=True))


def test_end_state_metrics_are_recorded_metrics():
    assert END_STATE <= set(METRICS)
    assert "loss" not in END_STATE and "shadow_update_cosine" not in END_STATE


def test_comparison_table_takes_the_late_loss_gap_and_the_last_snapshot():
    rows = [(s, "", "loss_gap", v) for s, v in ((1, 9.0), (2, 0.1), (3, 0.2))]
    rows += [(s, layer, "angle_left_max", v) for s, layer, v in ((2, "l0", 0.9), (3, "l0", 0.1), (3, "l1", 0.3))]
    table = comparison_table(pd.DataFrame([(s, layer, "lora", "lora", "full", m, v) for s, layer, m, v in rows],
                                          columns=["step", "layer", "run", "method", "reference", "metric", "value"]))
    table = table.set_index("metric")
    assert table.at["loss_gap", "median"] == pytest.approx(0.2) and table.at["loss_gap", "step"] == 3
    assert table.at["angle_left_max", "median"] == pytest.approx(0.2)  # step 3 only: median(0.1, 0.3)
    assert table.at["angle_left_max", "worst_layer"] == "l1" and table.at["angle_left_max", "layers"] == 2
