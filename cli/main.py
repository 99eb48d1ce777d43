"""The ``loft-probe`` command: parse arguments, call the library, print its results.

Errors become one ``error: ...`` line and exit code 2 in one place (`cli/errors.py`); ``--debug``
shows the traceback instead. The report's matplotlib and seaborn are imported inside the commands that draw,
so ``--help`` does not pay for them; it still imports torch (about 2 s here), through the library modules whose
names and defaults the options show.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console

from loft_probe.demo import DEMO_EVERY, DEMO_STEPS, demo_configs, run_demo
from loft_probe.diagnosis import describe_run, diagnose, findings_to_json, format_findings
from loft_probe.run import Run, load_run
from loft_probe.runner import METHODS, RunConfig, run
from loft_probe.summary import run_headline
from loft_probe.tasks import TASKS

from . import render, sweeps
from .errors import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    help="Probes, metrics and the LoFT optimizer: how LoRA, LoFT and full fine-tuning differ, measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # --debug shows Python's own traceback
    context_settings={"help_option_names": ["-h", "--help"]},
)


class SecondMoment(str, Enum):
    full = "full"
    simple = "simple"


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _switch(name: str, what: str):
    """A LoFT ablation switch: --NAME/--no-NAME, None (the optimizer's default) when not given."""
    return typer.Option(f"--{name}/--no-{name}", help=f"LoFT: {what} (loft only; default on).")


RunDir = Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")]
RunDirs = Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run directories.")]
ReferenceName = Annotated[str | None, typer.Option(help="Name of the reference run; default the single full run.")]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show an error's traceback, not one line.")] = False):
    """Fine-tune small tasks with a probe attached, then compare, diagnose and report the runs."""


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Optimizer steps of each run.")] = DEMO_STEPS,
    rank: Annotated[int | None, typer.Option(help="LoRA rank; default the task's (8).")] = None,
    layers: Annotated[int, typer.Option(help="MiniLM encoder layers kept (1-6).")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for the three runs and the report.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the head, the LoRA initialisation and the data order.")] = 0,
    every: Annotated[int, typer.Option(hidden=True, help="Record every k steps.")] = DEMO_EVERY,
    n_train: Annotated[int | None, typer.Option(hidden=True, help="Training snippets (task option).")] = None,
    n_eval: Annotated[int | None, typer.Option(hidden=True, help="Held-out snippets (task option).")] = None,
):
    """Fine-tune MiniLM on movie-review sentiment three ways (full, LoRA, LoFT), then report and diagnose.

    The three runs share the seed: they start from the same model and see the same batches. Writes
    OUT/full, OUT/lora, OUT/loft and OUT/report (report.html, report.md). The defaults take 2-3 minutes
    on a 2-core CPU. Needs the hf extra and the data package; without them it says what to install.

    Example: loft-probe demo --steps 60 --out runs/demo
    """
    configs = demo_configs(out, steps=steps, rank=rank, layers=layers, seed=seed, every=every, n_train=n_train,
                           n_eval=n_eval)
    for config in configs:
        _check_new(config.out)
    result = run_demo(configs, out / "report", progress=lambda config: render.progress_bar(config.method, steps))
    Console().print(render.table(_headlines(result.runs.values()), title="Runs"))
    for method, findings in result.findings.items():
        typer.echo(f"\nDiagnosis of {method} against full fine-tuning:")
        typer.echo(format_findings(findings))
    typer.echo(f"\nReport: {result.report}")


@app.command("run")
def run_command(
    task: Annotated[str, typer.Argument(metavar="TASK", help=f"Task: {', '.join(TASKS)}.")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"Method: {', '.join(METHODS)}.")],
    rank: Annotated[int | None, typer.Option(help="LoRA rank; default the task's.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha; default the task's, else the rank.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate; default the task's for the method.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps; default the task's.")] = None,
    every: Annotated[int, typer.Option(help="Record every k steps (snapshots every 4k and at the end).")] = 10,
    evals: Annotated[int, typer.Option(help="Held-out evaluations spread over the run.")] = 5,
    shadow: Annotated[bool, typer.Option(help="Keep a shadow full fine-tuning on the probed layers.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the model, the LoRA initialisation and the data order.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run directory to create; default runs/TASK-METHOD.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name in reports; default the method.")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="LoFT: full-space gradient clipping.")] = None,
    alternating: Annotated[bool | None, _switch("alternating", "update one factor per step")] = None,
    scale_gradients: Annotated[bool | None, _switch("scale-gradients", "scale the factor gradients")] = None,
    transport: Annotated[bool | None, _switch("transport", "transport the moments when the factors move")] = None,
    second_moment: Annotated[SecondMoment | None, typer.Option(help="LoFT: second-moment form (loft only).")] = None,
    projected_update: Annotated[bool | None, _switch("projected-update", "projected update")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Task option KEY=VALUE, repeatable.")]
    = None,
):
    """Fine-tune a built-in task one way with a probe attached, into a run directory.

    LoFT switches and --max-grad-norm are only valid with --method loft. Task options are the fields of the
    task's config (e.g. layers, n_train, n_eval for minilm-sentiment); numbers are parsed as int or float.

    Example: loft-probe run digits --method lora --rank 4 --steps 100 --out runs/digits-lora
    """
    switches = {"alternating": alternating, "scale_gradients": scale_gradients, "transport": transport,
                "second_moment": second_moment.value if second_moment else None,
                "projected_update": projected_update}
    config = RunConfig(task=task, method=method, out=out or Path("runs") / f"{task}-{method}", rank=rank,
                       alpha=alpha, lr=lr, steps=steps, every=every, evals=evals, shadow=shadow, seed=seed,
                       max_grad_norm=max_grad_norm, task_options=parse_options(option or []), name=name,
                       loft_options={k: v for k, v in switches.items() if v is not None})
    _check_new(config.out)
    with render.progress_bar(method, steps) as on_step:
        path = run(config, on_step=on_step)
    Console().print(render.table(_headlines([load_run(path)])))
    typer.echo(f"Run directory: {path}")


@app.command()
def report(
    runs: RunDirs,
    out: Annotated[Path, typer.Option(help="Folder for report.html, report.md and the figures.")] = Path("report"),
    reference: ReferenceName = None,
):
    """Write an HTML and a Markdown report of the runs, with figures.

    Example: loft-probe report runs/demo/full runs/demo/lora runs/demo/loft --out runs/demo/report
    """
    page = _write_report([load_run(path) for path in runs], out, reference)
    typer.echo(render.escape_controls(f"Report: {page} and {page.with_name('report.md')}"))


@app.command()
def compare(
    runs: RunDirs,
    reference: ReferenceName = None,
    force: Annotated[bool, typer.Option(help="Compare runs that differ in seed, data or base weights.")] = False,
    output: Annotated[Format, typer.Option("--format", "-f", help="table: a summary per run; csv, json: "
                                                                  "every row of the comparison.")] = Format.table,
):
    """Compare runs with a reference run: subspace angles, ΔW cosine, intruders, loss gap.

    The table shows, per run and metric, the median over layers and the worst layer at the last snapshot
    the run shares with the reference; csv and json print the whole long-form frame (step, layer, run,
    method, reference, metric, value).

    Example: loft-probe compare runs/demo/full runs/demo/lora runs/demo/loft --format csv
    """
    from loft_probe.comparison import compare as compare_runs
    from loft_probe.summary import comparison_table

    frame = compare_runs([load_run(path) for path in runs], reference=reference, force=force)
    if output is Format.csv:
        typer.echo(render.escape_controls(frame.to_csv(index=False)), nl=False)
    elif output is Format.json:
        typer.echo(render.escape_controls(frame.to_json(orient="records", indent=2)))
    else:
        console = Console()
        for (name, ref), rows in comparison_table(frame).groupby(["run", "reference"], sort=False):
            title = f"{name} against {ref}" if name != ref else f"{name} (the reference)"
            console.print(render.table(rows.drop(columns=["run", "method", "reference"]),
                                       title=render.escape_controls(title)))


@app.command("diagnose")
def diagnose_command(
    run_dir: RunDir,
    reference: Annotated[Path | None, typer.Option(help="Run directory of the full run to compare with.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
):
    """Plain-language findings about one run: did training go wrong (divergence, step size, too short, dead or
    frozen), where its gap to full fine-tuning comes from (rank, optimizer state), and, with --reference, the
    loss gap and intruder dimensions. How far to trust it: README, "The diagnosis, on runs whose cause is known".

    Example: loft-probe diagnose runs/demo/lora --reference runs/demo/full
    """
    findings = diagnose(load_run(run_dir), reference=load_run(reference) if reference is not None else None)
    typer.echo(render.escape_controls(findings_to_json(findings) if json else format_findings(findings)))


@app.command()
def inspect(run_dir: RunDir):
    """One screen about a run: method, hyperparameters, layers, recorded steps and metrics, closed or not.

    Example: loft-probe inspect runs/demo/loft
    """
    typer.echo(render.escape_controls(describe_run(load_run(run_dir))))


app.command("sweep")(sweeps.sweep_command)
app.command("study")(sweeps.study_command)


def parse_options(items: list[str]) -> dict[str, int | float | bool | str]:
    """``["layers=2", "lr=1e-3", "name=x"]`` → ``{"layers": 2, "lr": 0.001, "name": "x"}``: int, float,
    true/false, else the text."""
    options: dict[str, int | float | bool | str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = _value(text.strip())
    return options


def _value(text: str) -> int | float | bool | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _check_new(path: Path) -> None:
    """Refuse to train into a folder with files in it before the model loads (the probe would refuse it later)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; choose another --out or remove it")


def _write_report(runs: list[Run], out: Path, reference: str | None = None) -> Path:
    from loft_probe.reporting import report as write_report  # matplotlib and seaborn: only when reporting

    return write_report(runs, out, reference=reference)


def _headlines(runs) -> pd.DataFrame:
    return pd.DataFrame([run_headline(r) for r in runs])


if __name__ == "__main__":
    app()
