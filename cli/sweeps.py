"""The ``sweep`` and ``study`` commands: parse the grid, call `loft_probe.sweep` / `loft_probe.study`, show progress.

Registered on the app in `cli/main.py`. Exit code of ``sweep``: the number of failed cells (0: all finished),
capped at MAX_EXIT; a bad argument is still one ``error:`` line with exit code 2 (`cli/errors.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loft_probe.runner import METHODS
from loft_probe.sweeps import SweepEvent
from loft_probe.sweeps import sweep as run_sweep
from loft_probe.tasks import TASKS

MAX_EXIT = 125  # exit codes above 125 mean "not executable" or "killed by a signal" to a shell


def split(text: str, what: str) -> list[str]:
    """"a,b, c" → ["a", "b", "c"], refusing empty items."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"--{what} expects comma-separated values, got {text!r}")
    return items


def numbers(text: str, what: str, kind: type) -> list:
    values = []
    for item in split(text, what):
        try:
            values.append(kind(item))
        except ValueError:
            raise ValueError(f"--{what}: {item!r} is not {'an integer' if kind is int else 'a number'}") from None
    return values


def parse_lrs(items: list[str]) -> list[float] | dict[str, list[float]] | None:
    """``["1e-3,1e-2"]`` (every method) or ``["full=1e-4,1e-3", "lora=1e-2"]`` (per method) → the lrs argument."""
    if not items:
        return None
    per_method = [item for item in items if "=" in item]
    if not per_method:
        if len(items) > 1:
            raise ValueError("give --lr once for every method, or once per method as METHOD=LR,LR")
        return numbers(items[0], "lr", float)
    if len(per_method) != len(items):
        raise ValueError("--lr: mix of per-method (METHOD=LR,...) and plain values; use one form")
    lrs = {}
    for item in items:
        method, _, values = item.partition("=")
        lrs[method.strip()] = numbers(values, "lr", float)
    return lrs


class SweepProgress:
    """A rich bar on stderr: cells finished (done or failed) of all, with done / failed / left and an ETA."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("sweep"), BarColumn(), TextColumn("{task.fields[counts]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "left": 0}
        self.cpu_seconds = 0.0  # CPU time of the cells run now (the cost on an idle machine: this / jobs)
        self.task = self.bar.add_task("sweep", total=0, counts="")

    def __call__(self, event: SweepEvent) -> None:
        if event.kind in ("planned", "skipped"):
            self.counts["left" if event.kind == "planned" else "skipped"] += 1
        elif event.kind in ("done", "failed"):
            self.counts[event.kind] += 1
            self.counts["left"] -= 1
            if not math.isnan(event.cpu_seconds):  # NaN: the worker died
                self.cpu_seconds += event.cpu_seconds
            if event.kind == "failed":
                self.console.print(f"failed: {event.cell}: {event.error}", markup=False, highlight=False,
                                   soft_wrap=True)
        if event.kind == "started" and not self.bar.live.is_started:
            self.bar.start()
        c = self.counts
        self.bar.update(self.task, total=c["done"] + c["failed"] + c["left"], completed=c["done"] + c["failed"],
                        counts=f"done {c['done']} · failed {c['failed']} · left {c['left']}"
                               + (f" · {c['skipped']} finished before" if c["skipped"] else ""))

    def stop(self) -> None:
        if self.bar.live.is_started:
            self.bar.stop()


def sweep_command(
    task: Annotated[str, typer.Argument(metavar="TASK", help=f"Task: {', '.join(TASKS)}.")],
    out: Annotated[Path, typer.Option(help="Sweep directory: created, or resumed when it holds this sweep.")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"Methods, comma-separated: {', '.join(METHODS)}.")]
    = ",".join(METHODS),
    rank: Annotated[str | None, typer.Option(help="Adapter ranks, comma-separated (lora and loft).")] = None,
    alpha: Annotated[str, typer.Option(help="α rules, comma-separated: a number (8), a multiple of the rank "
                                            "(r, 4r, r/4) or rsLoRA scale α/sqrt(r) (rs4).")] = "r",
    lr: Annotated[list[str] | None, typer.Option(help="Learning rates LR,LR for every method, or METHOD=LR,LR "
                                                      "once per method; default the task's.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated.")] = "0",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps of every cell; default the task's.")] = None,
    every: Annotated[int, typer.Option(help="Record every k steps.")] = 10,
    evals: Annotated[int, typer.Option(help="Held-out evaluations spread over each run.")] = 5,
    shadow: Annotated[bool, typer.Option(help="Shadow full fine-tuning (alignment metrics).")] = False,
    jobs: Annotated[int | None, typer.Option(help="Worker processes, one BLAS thread each; default the cores.")]
    = None,
    select_lr: Annotated[bool, typer.Option(help="Run the first seed at every lr, choose each method's lr by "
                                                 "held-out loss, run the other seeds at that lr only.")] = False,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Task option KEY=VALUE, repeatable.")]
    = None,
):
    """Run a grid of cells (methods × ranks × α × lr × seeds), one run directory each, resumably and in parallel.

    Full fine-tuning runs once per lr and seed. Rerunning the same command skips finished cells and redoes the
    others. A failing cell is recorded in OUT/failed/ and the sweep goes on; the exit code is the number of
    failed cells. Then: loft-probe study OUT --out REPORT.

    Example: loft-probe sweep digits --method full,lora,loft --rank 1,4,16 --alpha r,4r --seeds 0,1,2 --out runs/sw
    """
    from .main import parse_options  # main imports this module to register the commands

    progress = SweepProgress()
    try:
        result = run_sweep(task, out, methods=split(method, "method"),
                           ranks=numbers(rank, "rank", int) if rank else [], alphas=split(alpha, "alpha"),
                           lrs=parse_lrs(lr or []), seeds=numbers(seeds, "seeds", int), steps=steps, every=every,
                           evals=evals, shadow=shadow, task_options=parse_options(option or []), jobs=jobs,
                           select_lr=select_lr, on_event=progress)
    finally:
        progress.stop()
    c = progress.counts
    typer.echo(f"{len(result.runs)} cells finished ({c['done']} now, {result.skipped} before), "
               f"{len(result.failed)} failed. CPU time of the cells run now: {progress.cpu_seconds:.0f} s.")
    if result.lr_choice:
        typer.echo("Learning rates chosen on seed " + seeds.split(",")[0].strip() + ": "
                   + ", ".join(f"{m} {v}" for m, v in result.lr_choice.items()))
    if result.failed:
        typer.echo(f"Failed cells: {', '.join(result.failed)} (errors in {Path(out) / 'failed'}).")
    typer.echo(f"Sweep directory: {out}")
    raise typer.Exit(min(len(result.failed), MAX_EXIT))


def study_command(
    sweeps: Annotated[list[Path], typer.Argument(metavar="SWEEP...", help="Sweep directories (one per task).")],
    out: Annotated[Path, typer.Option(help="Folder for study.html, study.md, figures and results.")]
    = Path("study"),
):
    """Write the study of sweeps: metrics against α and rank with seed spread, gap to full fine-tuning, alignment.

    Writes OUT/study.html (self-contained), OUT/study.md with OUT/figures/*.png, and the results table as
    OUT/results.parquet and OUT/results.csv.

    Example: loft-probe study runs/sw --out runs/sw/study
    """
    from loft_probe.study import study

    page = study(sweeps, out)
    typer.echo(f"Study: {page} and {page.with_name('study.md')}")
