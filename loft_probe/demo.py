"""The demo recipe: MiniLM movie-review sentiment fine-tuned three ways (full, LoRA, LoFT) from one seed, a
report of the three runs, and the diagnosis of the adapter runs against full fine-tuning.

``loft-probe demo`` prints what :func:`run_demo` returns; the recipe lives here so that a test covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from loft_probe.diagnosis import Finding, diagnose
from loft_probe.run import Run, load_run
from loft_probe.runner import METHODS, RunConfig, run

DEMO_TASK = "minilm-sentiment"
# The task's default. The whole demo (3 runs, report, diagnosis) measured 138 s on an idle 2-core CPU with
# OMP_NUM_THREADS unset (281 s while other jobs shared the CPU): within 5 minutes with room to spare.
DEMO_STEPS = 200
DEMO_EVERY = 10  # record every 10 steps: enough points for the report's curves, cheap next to training
DIAGNOSED = ("loft", "lora")  # the runs diagnosed against full fine-tuning, in this order

# A progress display for one run: a context manager that yields on_step(step, loss), or None.
Progress = Callable[[RunConfig], AbstractContextManager[Callable[[int, float], None] | None]]


@dataclass
class DemoResult:
    runs: dict[str, Run]  # by method: full, lora, loft
    report: Path  # report.html
    findings: dict[str, list[Finding]]  # by method (DIAGNOSED): the diagnosis against the full run


def demo_configs(out: Path, *, steps: int = DEMO_STEPS, rank: int | None = None, layers: int = 2, seed: int = 0,
                 every: int = DEMO_EVERY, n_train: int | None = None, n_eval: int | None = None) -> list[RunConfig]:
    """The three runs of the demo, into ``out/full``, ``out/lora``, ``out/loft``: one seed, so that they start
    from the same model and see the same batches. ``rank``: LoRA rank (default the task's); ``layers``: MiniLM
    encoder layers kept; ``n_train``, ``n_eval``: task options (default the task's)."""
    options = {"layers": layers} | {k: v for k, v in (("n_train", n_train), ("n_eval", n_eval)) if v is not None}
    return [RunConfig(task=DEMO_TASK, method=method, out=Path(out) / method, rank=rank, steps=steps, every=every,
                      seed=seed, task_options=options) for method in METHODS]


def run_demo(configs: list[RunConfig], report_dir: Path, progress: Progress | None = None) -> DemoResult:
    """Trains the configs (one per method), writes the report into ``report_dir`` and diagnoses the adapter
    runs against the full one. ``progress(config)`` shows a run's progress (default: nothing)."""
    from loft_probe.reporting import report  # matplotlib and seaborn: only when reporting

    paths = []
    for config in configs:
        with (progress or (lambda _: nullcontext(None)))(config) as on_step:
            paths.append(run(config, on_step=on_step))
    runs = {r.method: r for r in map(load_run, paths)}
    page = report(list(runs.values()), report_dir)
    findings = {method: diagnose(runs[method], reference=runs["full"]) for method in DIAGNOSED}
    return DemoResult(runs, page, findings)
