"""The report's figures: each a function from tidy frames to a matplotlib Figure.

Inputs are the frames of `loft_probe.reporting.frames` (run = the run's name, method = its meta method). A figure
draws what its frame holds: medians and bands over layers are seaborn's estimators, nothing is measured
here. When a frame lacks what a figure shows, the function raises `MissingData` with a one-line reason,
which the page prints in the figure's place.

Figures are `matplotlib.figure.Figure` objects, never pyplot's: nothing is registered globally, nothing
needs closing, no window can open.
"""

from __future__ import annotations

import math
import sys

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    # Headless: seaborn imports pyplot, which must not look for a display. A session that already chose a
    # backend (a notebook) keeps it: switching would close its open figures, and ours do not use it.
    matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from loft_probe.run import RUN_LAYER  # noqa: E402

DPI = 100
# within the adapter's subspaces first: the panels LoRA and LoFT share (full fine-tuning is 1 on the others)
MOMENTS = ("shadow_m_proj_cosine", "shadow_precond_proj_cosine", "shadow_m_cosine", "shadow_v_cosine")
RESIDUALS = ("residual_left", "residual_right", "residual_tangent")
CURVES = ("loss", "eval_loss", "eval_accuracy")
ANNOTATE_COLUMNS, ANNOTATE_ROWS = 10, 24  # heat maps at most this size print their values; larger ones crowd
MAX_PANEL_WIDTH = 6.0  # inches of one heat map panel
BAND = ("pi", 50)  # the band around a median over layers: the middle half of the layers (25th–75th pct)
MAX_TICK = 40  # characters of a layer name on an axis


class MissingData(ValueError):
    """The frame lacks what the figure shows (a run without shadow, no comparison); the message says what."""


def label(text: object) -> str:
    """A run string made safe for matplotlib text: "$" would start mathtext, and a bad formula fails to draw."""
    return str(text).replace("$", r"\$")


def tick(text: object) -> str:
    """A layer name for an axis: `label`, its last MAX_TICK characters (the end of a dotted path tells layers
    apart; the page's text holds the whole name)."""
    text = label(text)
    return text if len(text) <= MAX_TICK else "…" + text[-(MAX_TICK - 1):]


def palette(names: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per run name, fixed for the whole report."""
    colours = sns.color_palette("colorblind" if len(names) <= 10 else "husl", len(names))  # colorblind has 10
    return dict(zip(names, colours, strict=True))


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _labelled(rows: pd.DataFrame, colours: dict[str, tuple] | None) -> tuple[pd.DataFrame, dict[str, tuple]]:
    """Rows with matplotlib-safe run and layer labels, and the palette (default: one for these runs) keyed by them."""
    colours = colours or palette(list(dict.fromkeys(rows["run"])))
    rows = rows.assign(**{column: rows[column].map(label) for column in ("run", "layer") if column in rows})
    return rows, {label(name): colour for name, colour in colours.items()}


def _lines(rows: pd.DataFrame, metrics: list[str], colours: dict | None, *, log_positive: bool = False,
           band: bool = False) -> Figure:
    """One panel per metric, one line per run over steps; with `band`, the median over layers and BAND."""
    rows, colours = _labelled(rows, colours)
    fig = _figure(4.2 * len(metrics), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        data = rows[rows["metric"] == metric]
        sns.lineplot(data=data, x="step", y="value", hue="run", palette=colours, ax=ax, legend=False,
                     estimator="median" if band else None, errorbar=BAND if band else None,
                     marker="o" if data["step"].nunique() <= 12 else None)
        if log_positive and metric.endswith("loss") and (data["value"] > 0).all():
            ax.set_yscale("log")
        ax.set(title=metric, ylabel=metric, xlabel="step")
    # One legend for the figure: a run may be missing from some panels (only LoFT has projected moments).
    present = list(dict.fromkeys(rows["run"]))
    fig.legend([Line2D([], [], color=colours[name]) for name in present], present, title="run",
               loc="outside right upper")
    return fig


def loss_curves(metrics: pd.DataFrame, colours: dict | None = None) -> Figure:
    """Training loss, held-out loss and accuracy per run over steps (losses on a log axis when positive)."""
    rows = metrics[(metrics["layer"] == RUN_LAYER) & metrics["metric"].isin(CURVES)]
    shown = [metric for metric in CURVES if metric in set(rows["metric"])]
    if not shown:
        raise MissingData(f"no run recorded any of {', '.join(CURVES)}")
    return _lines(rows, shown, colours, log_positive=True)


def moment_alignment(metrics: pd.DataFrame, colours: dict | None = None) -> Figure:
    """The optimizer's moments against the shadow's, median over layers with the middle half as a band."""
    rows = metrics[metrics["metric"].isin(MOMENTS)]
    shown = [metric for metric in MOMENTS if metric in set(rows["metric"])]
    if not shown:
        raise MissingData(f"no run recorded {', '.join(MOMENTS)} (it needs a shadow and an optimizer whose "
                          "state has a first moment, such as AdamW or LoFT)")
    return _lines(rows, shown, colours, band=True)


def projection_residuals(metrics: pd.DataFrame, colours: dict | None = None) -> Figure:
    """The share of each gradient no LoRA step can express, median over layers with the middle half as a band."""
    rows = metrics[metrics["metric"].isin(RESIDUALS)]
    shown = [metric for metric in RESIDUALS if metric in set(rows["metric"])]
    if not shown:
        raise MissingData(f"no run recorded {', '.join(RESIDUALS)} (adapter runs with captured gradients do)")
    return _lines(rows, shown, colours, band=True)


def _heatmaps(tables: dict[str, pd.DataFrame], *, vmin: float, vmax: float, cmap: str, fmt: str,
              colorbar: str, xlabel: str, ylabel: str, title: str = "", cell: float = 0.42) -> Figure:
    """One heat map per table (index: rows, columns: x), on one colour scale with one colour bar.

    Panels grow with their cells (`cell` inches wide, 0.32 high) up to MAX_PANEL_WIDTH; past it seaborn
    thins the tick labels.
    """
    rows = max(len(table.index) for table in tables.values())
    cols = max(len(table.columns) for table in tables.values())
    panel = min(MAX_PANEL_WIDTH, max(3.2, 1.6 + cell * cols))
    fig = _figure(panel * len(tables) + 0.8, max(2.6, 1.3 + 0.32 * rows))
    annotate = cols <= ANNOTATE_COLUMNS and rows <= ANNOTATE_ROWS
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for n, (ax, (name, table)) in enumerate(zip(axes, tables.items(), strict=True)):
        last = n == len(tables) - 1
        sns.heatmap(table, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=annotate, fmt=fmt,
                    annot_kws={"fontsize": 7}, cbar=last, cbar_kws={"label": colorbar} if last else None,
                    yticklabels=[tick(index) for index in table.index] if n == 0 else False)
        ax.set(title=tick(name), xlabel=xlabel, ylabel=ylabel if n == 0 else "")
    if title:
        fig.suptitle(tick(title))
    return fig


def _pivot(rows: pd.DataFrame, index: str, columns: str) -> pd.DataFrame:
    """rows → index × columns table, rows in the order they first appear (the probe's layer order)."""
    order = list(dict.fromkeys(rows[index]))
    return rows.pivot(index=index, columns=columns, values="value").reindex(order)


def angle_heatmaps(frame: pd.DataFrame | None) -> Figure:
    """Per compared run: layers × snapshot steps of the largest left principal angle to the reference, in degrees."""
    if frame is None:
        raise MissingData("no comparison with a reference run")
    rows = frame[(frame["metric"] == "angle_left_max") & (frame["run"] != frame["reference"])]
    if rows.empty:
        raise MissingData("no snapshot shared with the reference holds a nonzero change")
    rows = rows.assign(value=rows["value"].map(math.degrees))  # radians in the frame, degrees on the page
    tables = {name: _pivot(group, "layer", "step") for name, group in rows.groupby("run", sort=False)}
    return _heatmaps(tables, vmin=0.0, vmax=90.0, cmap="rocket_r", fmt=".0f", xlabel="step", ylabel="layer",
                     colorbar="largest angle (°)", title=f"against {rows['reference'].iloc[0]}")


def shadow_heatmaps(metrics: pd.DataFrame) -> Figure:
    """Per run with a shadow: layers × recorded steps of cos(ΔW, shadow update)."""
    rows = metrics[metrics["metric"] == "shadow_update_cosine"]
    if rows.empty:
        raise MissingData("no run recorded shadow_update_cosine (runs without a shadow do not)")
    tables = {name: _pivot(group, "layer", "step") for name, group in rows.groupby("run", sort=False)}
    return _heatmaps(tables, vmin=-1.0, vmax=1.0, cmap="vlag_r", fmt=".2f", xlabel="step", ylabel="layer",
                     colorbar="cos(ΔW, shadow update)")


def phi_heatmaps(phi: pd.DataFrame, layer: str, step: int) -> Figure:
    """Per run: φ(i, j) of its top-i left singular vectors against the reference's top-j, at one layer and step."""
    if phi.empty:
        raise MissingData(f"no φ grid for layer {layer!r} at step {step}")
    tables = {name: group.pivot(index="i", columns="j", values="value")
              for name, group in phi.groupby("run", sort=False)}
    return _heatmaps(tables, vmin=0.0, vmax=1.0, cmap="mako", fmt=".1f", colorbar="φ(i, j)", cell=0.22,
                     xlabel="j: reference's top-j", ylabel="i: run's top-i", title=f"layer {layer}, step {step}")


def intruder_bars(metrics: pd.DataFrame, colours: dict | None = None) -> Figure:
    """Intruder dimensions per layer at each run's last snapshot, one bar per run (layers down the side)."""
    rows = metrics[metrics["metric"] == "intruders"]
    if rows.empty:
        raise MissingData("no run recorded intruders (they are counted at snapshots)")
    last = rows.groupby("run", sort=False)["step"].transform("max")
    rows = rows[rows["step"] == last]
    order = list(dict.fromkeys(rows["layer"]))
    fig = _figure(8.0, max(2.6, 1.2 + 0.14 * len(order) * rows["run"].nunique()))
    ax = fig.subplots()
    rows, colours = _labelled(rows, colours)
    sns.barplot(data=rows, y="layer", x="value", hue="run", palette=colours, ax=ax, orient="h",
                order=[label(layer) for layer in order])
    ax.set_yticks(range(len(order)), labels=[tick(layer) for layer in order])
    ax.set(ylabel="layer", xlabel="intruder dimensions", title="at each run's last snapshot")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="run")  # beside the bars, not over them
    return fig
