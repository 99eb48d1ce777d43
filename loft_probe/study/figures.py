"""The study's figures: functions from the study's frames to matplotlib Figures; nothing is computed here.

Means and intervals come from `loft_probe.study.frames.summary` (bootstrap over seeds); the seeds are drawn as
points next to them. Figures are `matplotlib.figure.Figure` objects (no pyplot state), as in the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from loft_probe.reporting.figures import DPI, MissingData, label, palette

METHOD_ORDER = ("full", "lora", "loft")
PANEL_W, PANEL_H = 3.0, 2.6  # inches per panel
JITTER = 0.06  # horizontal spread of the seed points around their method's position


def _figure(rows: int, columns: int, sharex: bool = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(0.6 + PANEL_W * columns, 0.6 + PANEL_H * rows), dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=False, sharex=sharex)


def _order(values) -> list:
    """Axis categories in a stable order: numbers ascending, α rules by their scale then rsLoRA last."""
    values = list(dict.fromkeys(values))
    if all(isinstance(v, (int, np.integer)) for v in values):
        return sorted(values)
    return sorted(values, key=_alpha_key)


def _alpha_key(rule: str) -> tuple:
    if rule.startswith("rs"):
        return (2, float(rule[2:]))
    if rule.endswith("r"):
        return (1, float(rule[:-1] or 1))
    return (0, float(rule))


def metric_grid(summary: pd.DataFrame, results: pd.DataFrame, metrics: list[str], x: str, panel: str,
                methods=("lora", "loft"), reference: bool = False, zero_line: bool = False) -> Figure:
    """Rows: `metrics`; columns: the values of `panel` ("rank" or "alpha"); x: the values of `x` (the other one).

    Each method is a line of its mean over seeds with the 95% bootstrap interval as error bars, its seeds as
    points. With `reference`, full fine-tuning's mean and interval are a grey line and band in every panel.
    """
    stats = summary[summary["method"].isin(methods) & summary["metric"].isin(metrics)]
    stats = stats[np.isfinite(stats["mean"])]
    if stats.empty:
        raise MissingData(f"no finished {'/'.join(methods)} cell has {', '.join(metrics)}")
    panels, xs = _order(stats[panel]), _order(stats[x])
    fig, axes = _figure(len(metrics), len(panels), sharex=True)  # the same categories in every panel
    colours = palette(list(METHOD_ORDER))
    cells = results[results["selected"] & results["method"].isin(methods)]
    for row, metric in enumerate(metrics):
        for column, value in enumerate(panels):
            ax = axes[row, column]
            if reference:
                _reference_band(ax, summary, metric)
            for k, method in enumerate(m for m in METHOD_ORDER if m in methods):
                offset = (k - (len(methods) - 1) / 2) * 0.15
                part = stats[(stats["method"] == method) & (stats["metric"] == metric) & (stats[panel] == value)]
                part = part.set_index(x).reindex(xs)
                positions = np.arange(len(xs)) + offset
                ax.errorbar(positions, part["mean"], yerr=[part["mean"] - part["low"], part["high"] - part["mean"]],
                            color=colours[method], marker="o", ms=4, capsize=2, lw=1.2, label=method)
                seeds = cells[(cells["method"] == method) & (cells[panel] == value)]
                where = {v: i for i, v in enumerate(xs)}
                jitter = np.linspace(-JITTER, JITTER, max(seeds["seed"].nunique(), 1))
                seed_index = {s: i for i, s in enumerate(sorted(seeds["seed"].unique()))}
                ax.scatter([where[v] + offset + jitter[seed_index[s]] for v, s in zip(seeds[x], seeds["seed"],
                                                                                        strict=True)],
                           seeds[metric], s=8, color=colours[method], alpha=0.45, linewidths=0)
            if zero_line:
                ax.axhline(0.0, color="black", lw=0.6)
            ax.set_xticks(range(len(xs)), [label(v) for v in xs])
            ax.set_title(f"{panel} = {label(value)}", fontsize=9)
            if column == 0:
                ax.set_ylabel(metric)
            if row == len(metrics) - 1:
                ax.set_xlabel(x)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels) + 1, fontsize=8)
    return fig


def _reference_band(ax, summary: pd.DataFrame, metric: str) -> None:
    full = summary[(summary["method"] == "full") & (summary["metric"] == metric)]
    if full.empty or not np.isfinite(full["mean"].iloc[0]):
        return
    row = full.iloc[0]
    ax.axhline(row["mean"], color="0.4", lw=1, ls="--", label="full")
    ax.axhspan(row["low"], row["high"], color="0.85", zorder=0)


def alignment_scatter(results: pd.DataFrame, correlations: pd.DataFrame, gap: str = "gap_eval_loss") -> Figure:
    """One panel per alignment metric: the gap to full fine-tuning against it, one point per cell, with ρ."""
    if correlations.empty:
        raise MissingData("no alignment metric to correlate")
    cells = results[results["selected"] & (results["method"] != "full")]
    fig, axes = _figure(1, len(correlations))
    colours = palette(list(METHOD_ORDER))
    for ax, row in zip(axes[0], correlations.itertuples(index=False), strict=True):
        for method in row.methods.split(", "):
            part = cells[cells["method"] == method]
            ax.scatter(part[row.alignment], part[gap], s=10, color=colours[method], label=method, alpha=0.7)
        ax.set(xlabel=row.alignment, ylabel=gap)
        ax.set_title(f"ρ = {row.rho:.2f} [{row.low:.2f}, {row.high:.2f}], n = {row.cells}", fontsize=9)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=len(handles), fontsize=8)
    return fig


def reference_convergence(curves: pd.DataFrame) -> Figure:
    """Full fine-tuning's held-out loss over steps, one line per seed: has the reference converged?"""
    if curves.empty:
        raise MissingData("no full fine-tuning run at its chosen lr")
    fig, axes = _figure(1, 1)
    ax = axes[0, 0]
    for seed, part in curves.groupby("seed", sort=True):
        ax.plot(part["step"], part["value"], marker="o", ms=3, label=f"seed {seed}")
    if (curves["value"] > 0).all():
        ax.set_yscale("log")  # the start is often far above the end: on a linear axis the tail looks flat anyway
    ax.set(xlabel="step", ylabel="eval_loss", title="full fine-tuning (reference)")
    ax.legend(fontsize=8)
    return fig
