"""`study`: sweep directories in, study.html (self-contained), study.md with figures/*.png, results.parquet and
results.csv out."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from loft_probe.reporting.figures import DPI, MissingData
from loft_probe.reporting.page import Section, html_page, markdown_page
from loft_probe.study import figures
from loft_probe.study.frames import (
    CORRELATION_COLUMNS,
    SPREAD_COLUMNS,
    alpha_spread,
    correlations,
    results_summary_table,
    summary,
)
from loft_probe.study.table import RESULT_COLUMNS, read_sweeps, reference_curves

FIGURE_DIR = "figures"
TITLE = "loft-probe study"
ALIGNMENT_METRICS = ["shadow_update_cosine", "shadow_m_cosine", "angle_deg"]


def study(sweeps: Sequence[str | Path], out: str | Path) -> Path:
    """Writes the study of one or more sweep directories (one per task) into ``out``; returns study.html.

    Tables: each method's learning-rate choice, the spread of the held-out loss across α, the correlation of
    alignment with the gap to full fine-tuning, and every grid cell's mean [95% bootstrap interval] over
    seeds. Figures per task: held-out loss against α and against rank, the gap against rank, alignment
    against rank, gap against alignment, and full fine-tuning's held-out loss over steps.
    """
    sweeps = list(sweeps)
    if not sweeps:
        raise ValueError("study needs at least one sweep directory, got none")
    results, failures, choices = read_sweeps(sweeps)
    stats = summary(results)
    spread, corr = alpha_spread(results), correlations(results)
    curves = reference_curves(sweeps, results)
    out = Path(out)
    (out / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
    results.to_parquet(out / "results.parquet", index=False)
    results.to_csv(out / "results.csv", index=False)

    sections = []
    for index, task in enumerate(dict.fromkeys(results["task"])):
        sections += _task_sections(f"t{index}", task, *(frame[frame["task"] == task]
                                                          for frame in (stats, results, corr, curves)))
    for stale in (out / FIGURE_DIR).glob("*.png"):
        stale.unlink()  # figures of an earlier study of other sweeps
    for section in sections:
        if section.png is not None:
            (out / FIGURE_DIR / f"{section.key}.png").write_bytes(section.png)

    cells = len(results)
    intro = [f"Sweeps: {', '.join(str(s) for s in sweeps)}. Tasks: {', '.join(dict.fromkeys(results['task']))}. "
             f"{cells} finished cells, {len(failures)} failed.",
             "Each method's learning rate is chosen on the first seed by the median held-out loss over its cells; "
             "only cells at the chosen learning rate enter the means, intervals, spreads and correlations. "
             "Intervals: 95% percentile bootstrap of the mean over seeds (exact enumeration up to 5 seeds)."]
    tables = [("Learning-rate choice", choices[["task", "seed", "method", "lr", "median_eval_loss",
                                                "finished_cells", "chosen"]], {}),
              ("Spread of the held-out loss across α", spread, SPREAD_COLUMNS),
              ("Alignment against the gap to full fine-tuning", corr, CORRELATION_COLUMNS),
              ("Results: mean [95% interval] over seeds", results_summary_table(stats),
               {k: v for k, v in RESULT_COLUMNS.items() if k in ("eval_loss", "eval_accuracy", "gap_eval_loss",
                                                                  "shadow_update_cosine", "shadow_m_cosine",
                                                                  "angle_deg")})]
    if len(failures):
        tables.append(("Failed cells", failures, {}))
    footer = "Every cell's numbers: results.csv / results.parquet next to this page."
    (out / "study.md").write_text(markdown_page(intro, tables, sections, footer, FIGURE_DIR, heading=TITLE),
                                  encoding="utf-8")
    page = out / "study.html"
    page.write_text(html_page(intro, tables, sections, footer, heading=TITLE), encoding="utf-8")
    return page


def _task_sections(key: str, task: str, stats: pd.DataFrame, results: pd.DataFrame, corr: pd.DataFrame,
                   curves: pd.DataFrame) -> list[Section]:
    """The figure sections of one task; a figure without data becomes a note."""
    interval = " Error bars: mean over seeds and its 95% bootstrap interval; small points: the seeds."
    specs = [
        ("alpha", "held-out loss against α", "Held-out loss at the last step, one panel per rank." + interval,
         lambda: figures.metric_grid(stats, results, ["eval_loss"], x="alpha", panel="rank")),
        ("rank", "held-out loss against rank", "One panel per α rule; dashed line and grey band: full "
         "fine-tuning's mean and interval." + interval,
         lambda: figures.metric_grid(stats, results, ["eval_loss", "eval_accuracy"], x="rank", panel="alpha",
                                     reference=True)),
        ("gap", "gap to full fine-tuning against rank", "Held-out loss minus full fine-tuning's, same seed; "
         "below 0 is better than full fine-tuning." + interval,
         lambda: figures.metric_grid(stats, results, ["gap_eval_loss"], x="rank", panel="alpha", zero_line=True)),
        ("alignment", "alignment against rank", "Shadow update cosine, moment alignment (LoFT only) and the "
         "angle to full fine-tuning's subspace, by rank; one column per α rule." + interval,
         lambda: figures.metric_grid(stats, results, ALIGNMENT_METRICS, x="rank", panel="alpha")),
        ("correlation", "gap against alignment", "One point per cell (every seed); ρ: Spearman's, with its 95% "
         "bootstrap interval over cells.", lambda: figures.alignment_scatter(results, corr)),
        ("reference", "full fine-tuning's held-out loss over steps", "Has the reference converged? One line "
         "per seed, at full fine-tuning's chosen learning rate.", lambda: figures.reference_convergence(curves)),
    ]
    sections = []
    for name, title, caption, draw in specs:
        section = Section(f"{key}_{name}", f"{task}: {title}", caption)
        try:
            section.png = _png(draw)
        except MissingData as exc:
            section.note = f"Not drawn: {exc}."
        sections.append(section)
    return sections


def _png(draw: Callable[[], Figure]) -> bytes:
    buffer = io.BytesIO()
    draw().savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
