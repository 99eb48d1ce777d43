"""When to measure: a schedule is a predicate on the optimizer step (1-based), with a readable description."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Record at step t (t = 1, 2, ... counts optimizer steps) when ``self(t)`` is true.

    Build with :func:`every`, :func:`log_spaced`, :func:`at` or :func:`dense_then_every`.
    """

    kind: str
    k: int = 1
    dense: int = 0
    steps: frozenset[int] = frozenset()
    per_decade: int = 0

    def __call__(self, step: int) -> bool:
        if self.kind == "every":
            return step <= self.dense or step % self.k == 0
        if self.kind == "at":
            return step in self.steps
        # log-spaced: steps where round(per_decade·log10 t) changes, so roughly per_decade per decade
        return step == 1 or _log_bin(step, self.per_decade) != _log_bin(step - 1, self.per_decade)

    def describe(self) -> str:
        if self.kind == "every":
            return f"every {self.k}" + (f" after the first {self.dense}" if self.dense else "")
        if self.kind == "at":
            return "at " + ",".join(map(str, sorted(self.steps)))
        return f"log-spaced, {self.per_decade} per decade"


def _log_bin(step: int, per_decade: int) -> int:
    return math.floor(per_decade * math.log10(step))


def every(k: int) -> Schedule:
    """Steps k, 2k, 3k, ..."""
    _positive("every", k)
    return Schedule("every", k=k)


def dense_then_every(n: int, k: int) -> Schedule:
    """Every step up to n, then every k-th."""
    _positive("dense steps", n)
    _positive("every", k)
    return Schedule("every", k=k, dense=n)


def log_spaced(per_decade: int = 10) -> Schedule:
    """About ``per_decade`` steps per factor of ten: dense early, sparse late (1, 2, ..., 10, 12, 15, ...)."""
    _positive("per_decade", per_decade)
    return Schedule("log", per_decade=per_decade)


def at(steps: Iterable[int]) -> Schedule:
    """Exactly the given steps."""
    if isinstance(steps, (str, bytes)):  # iterable, but "12" is not the steps 1 and 2
        raise ValueError(f"at(steps) needs a list of integer steps, got the string {steps!r}")
    steps = list(steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not steps or bad:
        raise ValueError(f"at(steps) needs a non-empty list of integer steps >= 1, got {steps[:10]!r}")
    return Schedule("at", steps=frozenset(steps))


def as_schedule(value: int | Iterable[int] | Schedule) -> Schedule:
    """An int k means every k steps, a list means exactly those steps; a Schedule is kept."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"a schedule is an int, a list of steps or a Schedule, got {value!r}")
    if isinstance(value, int):
        return every(value)
    try:
        return at(value)
    except TypeError:
        raise ValueError(f"a schedule is an int, a list of steps or a Schedule, got {value!r}") from None


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
