"""The study's derived tables, from the results (`loft_probe.study.table`): means with bootstrap intervals over
seeds, the spread across α, and correlations of alignment with the gap to full fine-tuning.

Only cells at their method's chosen learning rate (``selected``) enter these tables.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from loft_probe.study.stats import bootstrap_mean, bootstrap_spearman

GROUP = ["task", "method", "rank", "alpha"]
SUMMARY_METRICS = ("eval_loss", "eval_accuracy", "train_loss", "gap_eval_loss", "gap_eval_accuracy",
                   "shadow_update_cosine", "shadow_m_cosine", "angle_deg")
ALIGNMENT = {  # alignment metric → the methods it is compared over (LoRA has no full-space moment)
    "shadow_m_cosine": ("loft",),
    "shadow_update_cosine": ("lora", "loft"),
    "angle_deg": ("lora", "loft"),
}
SPREAD_COLUMNS = {
    "task": "the task",
    "method": "lora or loft",
    "rank": "adapter rank",
    "alphas": "α rules compared",
    "spread_of_means": "max − min over α of the seed-mean held-out loss",
    "seed_spread_median": "median over seeds of (max − min over α of that seed's held-out loss): α's effect "
                          "with the seed held fixed",
    "seed_spread_relative": "seed_spread_median / mean held-out loss",
    "seed_noise": "median over α of the standard deviation over seeds (for scale)",
}
CORRELATION_COLUMNS = {
    "task": "the task",
    "alignment": "the alignment metric (x)",
    "methods": "cells of these methods (at their chosen lr, every rank and α, every seed)",
    "rho": "Spearman's ρ between the alignment metric and gap_eval_loss over those cells",
    "low": "95% bootstrap interval (cells resampled), low end",
    "high": "high end",
    "cells": "cells with both values finite",
}


def selected(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["selected"]]


def summary(results: pd.DataFrame) -> pd.DataFrame:
    """Long form (task, method, rank, alpha, metric, mean, low, high, n): each metric's mean over seeds and its
    95% bootstrap interval, per cell of the grid without the seed. Full fine-tuning has rank and alpha NaN/None."""
    rows = []
    cells = selected(results).assign(rank=lambda f: f["rank"].fillna(0).astype(int),
                                     alpha=lambda f: f["alpha"].fillna(""))
    for key, group in cells.groupby(GROUP, sort=False):
        for metric in SUMMARY_METRICS:
            values = group[metric].to_numpy(dtype=np.float64)
            values = values[~np.isnan(values)]
            interval = bootstrap_mean(values)
            rows.append({**dict(zip(GROUP, key, strict=True)), "metric": metric, "mean": interval.estimate,
                         "low": interval.low, "high": interval.high, "n": interval.n})
    return pd.DataFrame(rows, columns=[*GROUP, "metric", "mean", "low", "high", "n"])


def results_summary_table(frame: pd.DataFrame, metrics=("eval_loss", "eval_accuracy", "gap_eval_loss",
                                                        "shadow_update_cosine", "shadow_m_cosine",
                                                        "angle_deg")) -> pd.DataFrame:
    """`summary` as one row per grid cell, each metric as "mean [low, high]" text, and the seeds counted."""
    wide = frame[frame["metric"].isin(metrics)].copy()
    wide["text"] = [_interval_text(m, lo, hi) for m, lo, hi in zip(wide["mean"], wide["low"], wide["high"],
                                                                     strict=True)]
    table = wide.pivot_table(index=GROUP, columns="metric", values="text", aggfunc="first", sort=False)
    seeds = frame[frame["metric"] == "eval_loss"].set_index(GROUP)["n"].rename("seeds")
    table = table.join(seeds).reset_index()
    table["rank"] = table["rank"].map(lambda r: r if r else "—")
    table["alpha"] = table["alpha"].map(lambda a: a or "—")
    return table[[*GROUP, "seeds", *[m for m in metrics if m in table.columns]]]


def _interval_text(mean: float, low: float, high: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def alpha_spread(results: pd.DataFrame, metric: str = "eval_loss") -> pd.DataFrame:
    """Per task, adapter method and rank: how much the held-out metric moves across α (SPREAD_COLUMNS)."""
    rows = []
    cells = selected(results)
    cells = cells[cells["method"] != "full"]
    for (task, method, rank), group in cells.groupby(["task", "method", "rank"], sort=True):
        if group["alpha"].nunique() < 2:
            continue
        by_alpha = group.groupby("alpha", sort=False)[metric]
        per_seed = group.pivot_table(index="seed", columns="alpha", values=metric, aggfunc="first").dropna()
        seed_spread = float((per_seed.max(axis=1) - per_seed.min(axis=1)).median()) if len(per_seed) else math.nan
        rows.append({"task": task, "method": method, "rank": int(rank), "alphas": ", ".join(by_alpha.groups),
                     "spread_of_means": float(by_alpha.mean().max() - by_alpha.mean().min()),
                     "seed_spread_median": seed_spread,
                     "seed_spread_relative": seed_spread / float(group[metric].mean()),
                     "seed_noise": float(by_alpha.std(ddof=1).median())})
    return pd.DataFrame(rows, columns=list(SPREAD_COLUMNS))


def correlations(results: pd.DataFrame, gap: str = "gap_eval_loss") -> pd.DataFrame:
    """Per task and alignment metric: Spearman's ρ with the gap over cells, and its interval (CORRELATION_COLUMNS)."""
    rows = []
    for task, cells in selected(results).groupby("task", sort=False):
        for metric, methods in ALIGNMENT.items():
            group = cells[cells["method"].isin(methods)]
            interval = bootstrap_spearman(group[metric].to_numpy(dtype=np.float64),
                                          group[gap].to_numpy(dtype=np.float64))
            rows.append({"task": task, "alignment": metric, "methods": ", ".join(methods), "rho": interval.estimate,
                         "low": interval.low, "high": interval.high, "cells": interval.n})
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
