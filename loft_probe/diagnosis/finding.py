"""A finding, and the helpers every check uses to name layers and numbers in its text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from loft_probe.diagnosis import thresholds as T

Severity = Literal["info", "warning"]


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about a run, with the numbers behind it and what to try.

    evidence: the thresholds and counts the finding was decided on, then up to `WORST_SHOWN` layers by
    name (worst first) with their values.
    """

    code: str  # stable identifier, e.g. "rank_too_low"
    severity: Severity  # "warning": likely hurts the run; "info": worth knowing
    title: str  # one sentence with the key numbers
    evidence: dict[str, float | str]
    suggestion: str  # what to try, or what to turn on


def worst_layers(values: pd.Series, lowest: bool) -> dict[str, float]:
    """Up to WORST_SHOWN layers, worst first, as {layer: value}."""
    ordered = values.sort_values(ascending=lowest, kind="stable")
    return {str(layer): float(value) for layer, value in ordered.head(T.WORST_SHOWN).items()}


def layer_listing(worst: dict[str, float], total: int) -> str:
    """ "fc1 (0.41), fc2 (0.47) and 3 more" for a title."""
    text = ", ".join(f"{layer} ({number(value)})" for layer, value in worst.items())
    return text + (f" and {total - len(worst)} more" if total > len(worst) else "")


def name_list(layers: list[str]) -> str:
    shown = ", ".join(layers[:T.WORST_SHOWN])
    return shown + (f" and {len(layers) - T.WORST_SHOWN} more" if len(layers) > T.WORST_SHOWN else "")


def number(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
