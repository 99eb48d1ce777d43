"""The study of a sweep: bootstrap intervals against direct numpy computations, the results table against the
runs, the page with every figure (and in headless chromium where it is installed)."""

from __future__ import annotations

import itertools
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from loft_probe import cli
from loft_probe.study import RESULT_COLUMNS, bootstrap_mean, bootstrap_spearman
from loft_probe.study.frames import summary
from loft_probe.study.stats import resample_indices
from loft_probe.sweeps import final_metric

pytestmark = pytest.mark.forks  # starts processes from the tests' fork server

F64 = {"rtol": 1e-12, "atol": 1e-12}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("alpha", "rank", "gap", "alignment", "correlation", "reference")
PROBE = ("<script>window.addEventListener('load', () => { const images = [...document.images];"
         " document.body.dataset.images = images.length;"
         " document.body.dataset.loaded = images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);"
         " });</script>")


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.tensor(np.asarray(actual, dtype=np.float64)),
                               torch.tensor(np.asarray(expected, dtype=np.float64)), **F64)


# ---------------------------------------------------------------------------------------------- bootstrap
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_bootstrap_mean_enumerates_every_resample(n):
    values = np.random.default_rng(n).normal(size=n)
    means = [np.mean([values[i] for i in rows]) for rows in itertools.product(range(n), repeat=n)]  # direct
    interval = bootstrap_mean(values)
    close([interval.estimate, interval.low, interval.high], [values.mean(), *np.quantile(means, [0.025, 0.975])])
    assert interval.n == n


def test_bootstrap_mean_draws_resamples_beyond_five_values():
    values = np.random.default_rng(7).normal(size=12)
    rows = np.random.default_rng(0).integers(0, 12, size=(10_000, 12))  # the documented generator and seed
    expected = np.quantile(values[rows].mean(axis=1), [0.025, 0.975])
    interval = bootstrap_mean(values)
    close([interval.low, interval.high], expected)


def test_drawn_resamples_converge_to_the_exact_interval():
    values = np.array([0.31, 0.29, 0.47, 0.33, 0.52])
    exact = bootstrap_mean(values)  # 5^5 = 3125 resamples, all enumerated
    drawn = bootstrap_mean(values, resamples=3000)  # fewer than 3125 allowed: drawn
    assert resample_indices(5, 3000).shape == (3000, 5) and resample_indices(5).shape == (3125, 5)
    spread = values.max() - values.min()
    assert abs(drawn.low - exact.low) < 0.03 * spread and abs(drawn.high - exact.high) < 0.03 * spread


def test_bootstrap_mean_edges():
    empty = bootstrap_mean([])
    assert empty.n == 0 and all(math.isnan(v) for v in (empty.estimate, empty.low, empty.high))
    same = bootstrap_mean([0.5, 0.5, 0.5])
    close([same.low, same.high], [0.5, 0.5])
    assert math.isnan(bootstrap_mean([0.1, math.nan]).estimate)  # a diverged seed shows, it is not dropped
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_mean([1.0], level=1.5)


def test_spearman_matches_scipy_and_its_interval_a_direct_computation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = np.round(x + rng.normal(size=20), 1)  # rounded: ties share their mean rank
    interval = bootstrap_spearman(x, y)
    close(interval.estimate, spearmanr(x, y).statistic)
    rows = np.random.default_rng(0).integers(0, 20, size=(2000, 20))  # the documented generator and seed
    rhos = [spearmanr(x[r], y[r]).statistic for r in rows]  # one scipy call per resample
    drawn = bootstrap_spearman(x, y, resamples=2000)
    close([drawn.low, drawn.high], np.quantile(rhos, [0.025, 0.975]))
    monotone = bootstrap_spearman(x, np.exp(x))
    close([monotone.estimate, monotone.low, monotone.high], [1.0, 1.0, 1.0])
    assert math.isnan(bootstrap_spearman([1.0, 2.0], [3.0, 4.0]).estimate)


# ---------------------------------------------------------------------------------------------- the study
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A 2-seed sweep of digits (full, LoRA and LoFT at ranks 2 and 4, α = r and 4r, shadow on) and its study."""
    root = tmp_path_factory.mktemp("study")
    sweep = CliRunner().invoke(cli.app, ["sweep", "digits", "--rank", "2,4", "--alpha", "r,4r", "--seeds", "0,1",
                                         "--steps", "10", "--every", "5", "--shadow", "--option", "pretrain_steps=20",
                                         "--jobs", "2", "--out", str(root / "sw")])
    assert sweep.exit_code == 0, sweep.output
    result = CliRunner().invoke(cli.app, ["study", str(root / "sw"), "--out", str(root / "study")])
    assert result.exit_code == 0, result.output
    return root


def test_study_writes_page_markdown_figures_and_tables(study_dir):
    out = study_dir / "study"
    html = (out / "study.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/png;base64,', html)
    assert len(images) == len(FIGURES) and "Not drawn" not in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:image/png;base64,)""", html)  # self-contained
    md = (out / "study.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"figures/t0_{name}.png" for name in FIGURES)
    for link in links:
        assert (out / link).read_bytes().startswith(PNG_MAGIC)


def test_results_table_holds_every_cell_as_the_runs_recorded_it(study_dir):
    results = pd.read_parquet(study_dir / "study" / "results.parquet")
    csv = pd.read_csv(study_dir / "study" / "results.csv")
    assert list(results.columns) == list(RESULT_COLUMNS) and len(results) == len(csv) == 2 * (1 + 2 * 2 * 2)
    pd.testing.assert_frame_equal(results.drop(columns=["rank"]), csv.drop(columns=["rank"]), check_dtype=False)
    names = {f"{m}-r{r}-a{a}-s{s}" for m in ("lora", "loft") for r in (2, 4) for a in ("r", "4r") for s in (0, 1)}
    assert set(results["cell"]) == names | {"full-s0", "full-s1"}
    runs = study_dir / "sw" / "runs"
    close(results["eval_loss"].to_numpy(), [final_metric(runs / cell) for cell in results["cell"]])
    full = results[results["method"] == "full"].set_index("seed")["eval_loss"]
    close(results["gap_eval_loss"].to_numpy(), (results["eval_loss"] - results["seed"].map(full)).to_numpy())
    assert results.loc[results["method"] == "lora", "shadow_m_cosine"].isna().all()  # no full-space moment
    assert results.loc[results["method"] == "loft", "shadow_m_cosine"].between(-1, 1).all()
    assert results.loc[results["method"] != "full", "angle_deg"].between(0, 90).all()


def test_summary_intervals_match_a_direct_numpy_bootstrap(study_dir):
    results = pd.read_parquet(study_dir / "study" / "results.parquet")
    stats = summary(results)
    for (method, rank, alpha), cells in results[results["method"] != "full"].groupby(["method", "rank", "alpha"]):
        values = cells.sort_values("seed")["eval_loss"].to_numpy()
        means = [values[list(rows)].mean() for rows in itertools.product(range(2), repeat=2)]  # 4 resamples
        row = stats[(stats["method"] == method) & (stats["rank"] == rank) & (stats["alpha"] == alpha)
                    & (stats["metric"] == "eval_loss")].iloc[0]
        close([row["mean"], row["low"], row["high"]], [values.mean(), *np.quantile(means, [0.025, 0.975])])


def test_study_refuses_a_folder_that_is_no_sweep_and_two_sweeps_of_one_task(study_dir, tmp_path):
    sweep = str(study_dir / "sw")
    for args, fragment in (([str(tmp_path)], "not a sweep directory"), ([sweep, sweep], "several of digits")):
        result = CliRunner().invoke(cli.app, ["study", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and fragment in result.stderr


@pytest.fixture(scope="module")
def browser() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def test_study_page_loads_every_figure_in_chromium(browser, study_dir, tmp_path):
    import subprocess

    page = (study_dir / "study" / "study.html").read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    # the page's policy (rightly) blocks scripts, the test's probe included: drop it for this copy
    probed.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                      .replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                          "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(FIGURES)}"' in body and 'data-loaded="true"' in body
