"""The study's results: one row per cell of one or more sweep directories, read from the runs; nothing trained.

Per cell: its parameters, the late training loss and the final held-out metrics (`loft_probe.run.series`),
the alignment metrics (shadow update cosine, moment alignment, angle to full fine-tuning's subspace) and the
gap to full fine-tuning. The reference of a cell is the full fine-tuning run of the same task and seed at full
fine-tuning's chosen learning rate; every method's learning rate is chosen on the first seed (the one a
``--select-lr`` sweep used, else the smallest) by held-out loss (`loft_probe.sweeps.selection`), and the
`selected` column marks the cells at their method's choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from loft_probe.reporting.frames import comparison
from loft_probe.run import Run, load_run
from loft_probe.run.series import run_summary
from loft_probe.summary import run_table
from loft_probe.sweeps.execute import FAILED, RUNS, is_finished
from loft_probe.sweeps.selection import choose_lrs, selection_table

# The results' columns and what each holds (the page prints them as the table's legend).
RESULT_COLUMNS = {
    "task": "the sweep's task",
    "cell": "the cell's name (its run directory under runs/)",
    "method": "full, lora (AdamW on the factors) or loft",
    "rank": "adapter rank (none for full fine-tuning)",
    "alpha": "the α rule: k·r as kr, a number, or rsLoRA rsK (scale K/sqrt(r))",
    "scale": "the adapter's scale α/r",
    "lr": "learning rate",
    "seed": "seed of the model, the LoRA initialisation and the data order",
    "selected": "the lr is its method's choice (first seed, held-out loss)",
    "train_loss": "late value (median over the last third of the recorded steps) of the training loss",
    "eval_loss": "held-out loss at the last step",
    "eval_accuracy": "held-out accuracy at the last step",
    "gap_eval_loss": "eval_loss minus full fine-tuning's (same seed, its chosen lr)",
    "gap_eval_accuracy": "eval_accuracy minus full fine-tuning's",
    "shadow_update_cosine": "median over layers of each layer's late value of cos(ΔW, shadow update)",
    "shadow_m_cosine": "median over layers of each layer's late value of cos(full-space first moment, shadow's); "
                       "LoFT and full fine-tuning only (LoRA has no full-space moment)",
    "angle_deg": "median over layers of the largest principal angle to full fine-tuning's top-r left subspace "
                 "of ΔW at the last shared snapshot, degrees",
}
FAILURE_COLUMNS = ("task", "cell", "error")


def read_sweeps(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The results (RESULT_COLUMNS, one row per finished cell), the failed cells and the lr choice of each task.

    Raises ValueError when a path is not a sweep directory or holds no finished cell.
    """
    results, failures, choices = [], [], []
    tasks = [_task(Path(path)) for path in paths]
    twice = sorted({task for task in tasks if tasks.count(task) > 1})
    if twice:
        raise ValueError(f"one sweep directory per task, got several of {', '.join(twice)}")
    for path in map(Path, paths):
        task = _task(path)
        runs = [load_run(d) for d in sorted((path / RUNS).iterdir()) if is_finished(d)]
        runs = [run for run in runs if isinstance(run.meta.get("sweep_cell"), dict)]
        if not runs:
            raise ValueError(f"{path}: no finished cell to study yet")
        frame, choice = _task_results(task, runs, _selection_seed(path))
        results.append(frame)
        choices.append(choice)
        for failed in sorted((path / FAILED).glob("*.json")):
            record = json.loads(failed.read_text())
            failures.append({"task": task, "cell": failed.stem, "error": str(record.get("error", ""))})
    return (pd.concat(results, ignore_index=True), pd.DataFrame(failures, columns=list(FAILURE_COLUMNS)),
            pd.concat(choices, ignore_index=True))


def _task(path: Path) -> str:
    try:
        header = json.loads((path / "sweep.json").read_text())
        return str(header["task"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a sweep directory (no readable sweep.json)") from None


def _lr(run: Run) -> float:
    return float(run.meta["hyperparameters"]["lr"])


def _selection_seed(path: Path) -> int | None:
    """The seed a ``--select-lr`` sweep chose its learning rates on (lr_selection.json), None without one."""
    try:
        return int(json.loads((path / "lr_selection.json").read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _task_results(task: str, runs: list[Run], first_seed: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The task's rows and its lr choice, made on ``first_seed`` (default the smallest seed)."""
    if first_seed is None:
        first_seed = min(run.meta["sweep_cell"]["seed"] for run in runs)
    scores = [(run.method, _lr(run), run_summary(run, "eval_loss")) for run in runs
              if run.meta["sweep_cell"]["seed"] == first_seed]
    chosen = choose_lrs(scores)
    choice = pd.DataFrame(selection_table(scores, chosen)).assign(task=task, seed=first_seed)
    rows = []
    for seed in sorted({run.meta["sweep_cell"]["seed"] for run in runs}):
        cells = [run for run in runs if run.meta["sweep_cell"]["seed"] == seed]
        refs = [run for run in cells if run.method == "full" and _lr(run) == chosen.get("full")]
        rows += _seed_rows(task, cells, refs[0] if refs else None, chosen)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS)), choice


def _seed_rows(task: str, cells: list[Run], ref: Run | None, chosen: dict) -> list[dict]:
    """Rows of one seed's cells, compared with the seed's full fine-tuning reference when there is one."""
    frame = comparison([ref, *[c for c in cells if c is not ref]], reference=ref.name)[0] if ref else None
    summary = run_table(cells, frame).set_index("run")
    ref_metrics = {name: run_summary(ref, name) if ref else math.nan for name in ("eval_loss", "eval_accuracy")}
    rows = []
    for run in cells:
        cell = run.meta["sweep_cell"]
        rank = cell["rank"]
        eval_loss, eval_accuracy = run_summary(run, "eval_loss"), run_summary(run, "eval_accuracy")
        rows.append({
            "task": task, "cell": run.name, "method": run.method, "rank": rank, "alpha": cell["alpha"],
            "scale": cell["alpha_value"] / rank if rank else math.nan, "lr": _lr(run), "seed": cell["seed"],
            "selected": chosen.get(run.method) == _lr(run), "train_loss": run_summary(run, "loss"),
            "eval_loss": eval_loss, "eval_accuracy": eval_accuracy,
            "gap_eval_loss": eval_loss - ref_metrics["eval_loss"],
            "gap_eval_accuracy": eval_accuracy - ref_metrics["eval_accuracy"],
            "shadow_update_cosine": summary.at[run.name, "shadow_update_cosine"],
            "shadow_m_cosine": run_summary(run, "shadow_m_cosine"),
            "angle_deg": summary.at[run.name, "angle_left_max_deg"] if run is not ref else 0.0,
        })
    return rows


def reference_curves(paths: Sequence[str | Path], results: pd.DataFrame) -> pd.DataFrame:
    """Held-out loss over steps of every selected full fine-tuning run: (task, seed, step, value)."""
    pieces = []
    for path in map(Path, paths):
        task = _task(path)
        refs = results[(results["task"] == task) & (results["method"] == "full") & results["selected"]]
        for cell, seed in zip(refs["cell"], refs["seed"], strict=True):
            rows = load_run(path / RUNS / cell).rows("eval_loss", [""])
            pieces.append(pd.DataFrame({"task": task, "seed": seed, "step": rows["step"].to_numpy(),
                                        "value": rows["value"].to_numpy()}))
    return pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=["task", "seed", "step", "value"])
