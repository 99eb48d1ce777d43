"""The learning-rate protocol of a sweep: each method's lr chosen on the first seed by held-out loss.

For every method, the candidate learning rates are scored by the median, over that method's cells of the
first seed (every rank and α), of the final held-out loss; the lowest score wins (the first listed on a
tie). A finished cell whose loss is not finite (diverged) scores +inf; a cell that failed (no run: a bad
configuration, a crash) has no score and is left out, and a learning rate none of whose cells finished
scores +inf. The median, not the mean, so that one diverging α does not veto a learning rate that suits
the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

SELECTION_METRIC = "eval_loss"


Score = tuple[str, float | None, float | None]  # (method, lr, final held-out loss or None for a failed cell)


def lr_scores(scores: Iterable[Score]) -> dict[str, dict[float | None, tuple[float, int]]]:
    """``{method: {lr: (median score, finished cells)}}`` in order of first appearance (see the module doc)."""
    losses: dict[str, dict[float | None, list[float]]] = {}
    for method, lr, loss in scores:
        cell_losses = losses.setdefault(method, {}).setdefault(lr, [])
        if loss is not None:
            cell_losses.append(loss if math.isfinite(loss) else math.inf)
    return {method: {lr: (float(np.median(values)) if values else math.inf, len(values))
                     for lr, values in by_lr.items()} for method, by_lr in losses.items()}


def choose_lrs(scores: Iterable[Score]) -> dict[str, float | None]:
    """``(method, lr, final held-out loss)`` of the first seed's cells → ``{method: chosen lr}``."""
    return {method: min(by_lr, key=lambda lr: by_lr[lr][0]) for method, by_lr in lr_scores(scores).items()}


def selection_table(scores: Iterable[Score], chosen: Mapping[str, float | None]) -> list[dict]:
    """One row per (method, lr): the median score (None when not finite), its cells, whether it was chosen."""
    return [{"method": method, "lr": lr, "median_eval_loss": score if math.isfinite(score) else None,
             "finished_cells": cells, "chosen": chosen.get(method) == lr}
            for method, by_lr in lr_scores(scores).items() for lr, (score, cells) in by_lr.items()]
