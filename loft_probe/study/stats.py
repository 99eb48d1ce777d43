"""Spread over seeds and correlation over cells, each with a percentile bootstrap interval.

The mean's interval resamples the values with replacement. With few values (n^n ≤ `resamples`, i.e. up to
5 seeds) every one of the n^n equally likely resamples is enumerated, so the interval is the bootstrap's
exact percentile interval and needs no random numbers; with more it draws `resamples` resamples from a
seeded generator. The correlation is Spearman's ρ (Pearson's on ranks: a monotone relation counts, a few
outlying cells do not dominate), its interval from resampling the cells as (x, y) pairs.

References:
    B. Efron and R. Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13 (percentile intervals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0  # the generator of drawn resamples: a study reproduces to the bit


@dataclass(frozen=True)
class Interval:
    """An estimate and its bootstrap interval [low, high]; ``n`` values went in."""

    estimate: float
    low: float
    high: float
    n: int


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(k, n) row indices of bootstrap resamples: all n^n when n^n ≤ resamples, else `resamples` drawn ones."""
    if n ** n <= resamples:
        return np.indices((n,) * n).reshape(n, -1).T  # (n^n, n): every tuple of n indices
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (resamples, n)


def bootstrap_mean(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of `values` (n,) and its percentile bootstrap interval; NaN everywhere for no values.

    A non-finite value (a diverged run) is kept: the mean and interval then say so instead of hiding it.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)  # (n,)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if values.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    means = values[resample_indices(values.size, resamples, seed)].mean(axis=1)  # (k,)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(values.mean()), float(low), float(high), int(values.size))


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of paired samples along the last axis: x, y (..., n) → (...,); NaN where one is constant."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)  # (..., n), ties share their mean rank
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=-1) / denominator


def bootstrap_spearman(x, y, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Spearman's ρ over the finite (x, y) pairs and its percentile interval (resamples where ρ is undefined,
    all ties, are left out); NaN for fewer than 3 pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return Interval(math.nan, math.nan, math.nan, int(x.size))
    rows = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))  # (resamples, n)
    rhos = spearman(x[rows], y[rows])  # (resamples,)
    rhos = rhos[np.isfinite(rhos)]
    tail = (1 - level) / 2
    low, high = np.quantile(rhos, [tail, 1 - tail]) if rhos.size else (math.nan, math.nan)
    return Interval(float(spearman(x, y)), float(low), float(high), int(x.size))
