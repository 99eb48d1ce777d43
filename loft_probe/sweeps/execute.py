"""`sweep`: train every cell of a grid into its own run directory, resumably, in parallel, surviving failures.

Layout of a sweep directory::

    DIR/sweep.json            the task and the settings every cell shares; a rerun must give the same
    DIR/runs/<cell>/          one run directory per cell (`loft_probe.load_run` reads it), named by the cell
    DIR/failed/<cell>.json    why a cell failed: one line, the traceback, the seconds it ran
    DIR/lr_selection.json     with select_lr: each method's candidate learning rates, scores and choice
    DIR/timings.jsonl         one line per ended cell: name, ok, wall and CPU seconds (what a rerun would cost)

A cell is finished when its run directory is closed (the probe marks meta.json closed at the end of the
run). A rerun skips finished cells and deletes and redoes the others, so a killed sweep loses only the cells
that were in flight. Cells of one seed share the starting model, LoRA initialisation and data order with
each other exactly as `loft-probe run --seed` does: each cell is a `RunConfig` of the same task and seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loft_probe.run import Run, RunDirError, load_run, read_meta
from loft_probe.run.files import atomic_write
from loft_probe.run.series import run_summary
from loft_probe.runner import RunConfig, check_config
from loft_probe.sweeps.grid import Cell, make_grid
from loft_probe.sweeps.pool import Outcome, run_cells
from loft_probe.sweeps.selection import SELECTION_METRIC, choose_lrs, selection_table
from loft_probe.tasks import TASKS

FORMAT = "loft-probe-sweep"
VERSION = 1
RUNS, FAILED = "runs", "failed"


@dataclass
class SweepEvent:
    """A progress event: ``kind`` is planned | skipped | started | done | failed, for the cell ``cell``; ended
    cells carry their wall and CPU seconds."""

    kind: str
    cell: str
    error: str = ""
    seconds: float = math.nan
    cpu_seconds: float = math.nan


@dataclass
class SweepResult:
    """What a sweep left: finished runs (grid order), failed cells with their error, cells skipped as done."""

    path: Path
    runs: list[Run] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    lr_choice: dict[str, float | None] | None = None


def sweep(task: str, out: str | os.PathLike, *, methods: Sequence[str] = ("full", "lora", "loft"),
          ranks: Sequence[int] = (), alphas: Sequence[str] = ("r",),
          lrs: Sequence[float] | Mapping[str, Sequence[float]] | None = None, seeds: Sequence[int] = (0,),
          steps: int | None = None, every: int = 10, evals: int = 5, shadow: bool = False,
          task_options: Mapping[str, Any] | None = None, jobs: int | None = None, select_lr: bool = False,
          on_event: Callable[[SweepEvent], None] | None = None) -> SweepResult:
    """Runs the grid ``methods × ranks × alphas × lrs × seeds`` of ``task`` into ``out`` (see the module doc).

    Args:
        task: a built-in task (loft_probe.tasks.TASKS).
        out: the sweep directory; created, or resumed when it holds the same sweep's settings.
        methods, ranks, alphas, lrs, seeds: the grid (`loft_probe.sweeps.grid.make_grid`); full fine-tuning
            runs once per lr and seed.
        steps, every, evals, shadow, task_options: as `RunConfig`, shared by every cell.
        jobs: worker processes (one BLAS thread each); default the number of cores.
        select_lr: run the first seed with every learning rate, choose each method's lr from it
            (`loft_probe.sweeps.selection`), then run the other seeds at that lr only.
        on_event: called with a `SweepEvent` as cells are planned, skipped, started and ended.

    Returns:
        A `SweepResult`; failures do not raise (their count is ``len(result.failed)``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    cells = make_grid(methods, ranks, alphas, lrs, seeds)
    settings = {"steps": steps, "every": every, "evals": evals, "shadow": shadow,
                "task_options": dict(task_options or {})}
    out = Path(out)
    notify = on_event or (lambda event: None)
    result = SweepResult(out)

    def config(cell: Cell) -> RunConfig:
        return RunConfig(task=task, method=cell.method, out=out / RUNS / cell.name, rank=cell.rank,
                         alpha=cell.alpha_value, lr=cell.lr, steps=steps, every=every, evals=evals, shadow=shadow,
                         seed=cell.seed, task_options=dict(settings["task_options"]), name=cell.name,
                         meta={"sweep_cell": cell.record()})

    check_config(config(cells[0]))  # the shared settings, before any directory is made
    _open(out, task, settings)

    def execute(batch: list[Cell]) -> None:
        todo = []
        for cell in batch:
            if is_finished(out / RUNS / cell.name):
                result.skipped += 1
                notify(SweepEvent("skipped", cell.name))
            else:
                todo.append(cell)
                notify(SweepEvent("planned", cell.name))
        for cell in todo:
            shutil.rmtree(out / RUNS / cell.name, ignore_errors=True)  # a killed or failed earlier attempt
        run_cells([(cell.name, config(cell)) for cell in todo], jobs,
                  on_start=lambda name: notify(SweepEvent("started", name)),
                  on_outcome=lambda outcome: _record(out, outcome, notify))

    first_seed = [cell for cell in cells if cell.seed == seeds[0]]
    if select_lr:
        execute(first_seed)
        scores = [(cell.method, cell.lr, final_metric(out / RUNS / cell.name)) for cell in first_seed]
        result.lr_choice = choose_lrs(scores)
        write_json(out / "lr_selection.json", {"metric": SELECTION_METRIC, "seed": seeds[0],
                                               "chosen": result.lr_choice,
                                               "candidates": selection_table(scores, result.lr_choice)})
        execute([cell for cell in cells if cell.seed != seeds[0] and cell.lr == result.lr_choice[cell.method]])
    else:
        execute(cells)
    for cell in cells:
        path = out / RUNS / cell.name
        if is_finished(path):
            result.runs.append(load_run(path))
        elif (out / FAILED / f"{cell.name}.json").exists():
            result.failed[cell.name] = json.loads((out / FAILED / f"{cell.name}.json").read_text())["error"]
    return result


def is_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` is a run directory whose probe closed it (the run reached its end)."""
    try:
        return read_meta(run_dir).get("closed") is True
    except RunDirError:
        return False


def final_metric(run_dir: Path, metric: str = SELECTION_METRIC) -> float | None:
    """The run's summary of ``metric`` (`loft_probe.run.series`: the held-out loss at its last evaluation; NaN
    when it lacks it); None when the run is unfinished."""
    if not is_finished(run_dir):
        return None
    return run_summary(load_run(run_dir), metric)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _open(out: Path, task: str, settings: dict) -> None:
    """Create the sweep directory, or check that the one there was made with the same task and settings."""
    header = json.loads(json.dumps({"format": FORMAT, "version": VERSION, "task": task, "settings": settings}))
    path = out / "sweep.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable ({exc}); choose another --out") from None
        if old != header:
            before = {"task": old.get("task"), **(old.get("settings") or {})} if isinstance(old, dict) else {}
            now = {"task": task, **header["settings"]}
            differ = [key for key in now if before.get(key) != now[key]]
            raise ValueError(f"{out} holds a sweep with other settings ({', '.join(differ) or 'format'} differ); "
                             "rerun it with the same ones or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a sweep directory; choose another --out")
    (out / RUNS).mkdir(parents=True, exist_ok=True)
    (out / FAILED).mkdir(exist_ok=True)
    if not path.exists():
        write_json(path, header)


def _record(out: Path, outcome: Outcome, notify: Callable[[SweepEvent], None]) -> None:
    if not outcome.ok and is_finished(out / RUNS / outcome.name):
        # its worker died after the run closed, before reporting: the run is whole, and a rerun would skip it
        outcome = replace(outcome, ok=True, error="", detail="")
    failure = out / FAILED / f"{outcome.name}.json"
    timing = {"cell": outcome.name, "ok": outcome.ok, "seconds": round(outcome.seconds, 3),
              "cpu_seconds": None if math.isnan(outcome.cpu_seconds) else round(outcome.cpu_seconds, 3)}
    with open(out / "timings.jsonl", "a", encoding="utf-8") as log:  # one short line: appended whole
        log.write(json.dumps(timing) + "\n")
    if outcome.ok:
        failure.unlink(missing_ok=True)
        notify(SweepEvent("done", outcome.name, seconds=outcome.seconds, cpu_seconds=outcome.cpu_seconds))
    else:
        write_json(failure, {"cell": outcome.name, "error": outcome.error, "traceback": outcome.detail,
                             "seconds": outcome.seconds})
        notify(SweepEvent("failed", outcome.name, outcome.error, outcome.seconds, outcome.cpu_seconds))
