"""When to measure: a schedule is a predicate on the optimizer step (1-based), with a readable description."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Record at step t (t = 1, 2, ... counts optimizer steps) when ``self(t)`` is true.

    A predicate on the step and its description (written into meta.json). ``period`` is k for "every k steps"
    (the default snapshots take every 4th of its steps), None for any other schedule. Build with
    :func:`every`, :func:`log_spaced`, :func:`at` or :func:`dense_then_every`.
    """

    predicate: Callable[[int], bool]
    description: str
    period: int | None = None

    def __call__(self, step: int) -> bool:
        return self.predicate(step)

    def describe(self) -> str:
        return self.description


def _log_bin(step: int, per_decade: int) -> int:
    return math.floor(per_decade * math.log10(step))


def every(k: int) -> Schedule:
    """Steps k, 2k, 3k, ..."""
    _positive("every", k)
    return Schedule(lambda step: step % k == 0, f"every {k}", period=k)


def dense_then_every(n: int, k: int) -> Schedule:
    """Every step up to n, then every k-th."""
    _positive("dense steps", n)
    _positive("every", k)
    return Schedule(lambda step: step <= n or step % k == 0, f"every {k} after the first {n}")


def log_spaced(per_decade: int = 10) -> Schedule:
    """About ``per_decade`` steps per factor of ten: dense early, sparse late (1, 2, ..., 10, 12, 15, ...)."""
    _positive("per_decade", per_decade)
    # the steps where round(per_decade·log10 t) changes, so roughly per_decade per decade
    return Schedule(lambda step: step == 1 or _log_bin(step, per_decade) != _log_bin(step - 1, per_decade),
                    f"log-spaced, {per_decade} per decade")


def at(steps: Iterable[int]) -> Schedule:
    """Exactly the given steps."""
    if isinstance(steps, (str, bytes)):  # iterable, but "12" is not the steps 1 and 2
        raise ValueError(f"at(steps) needs a list of integer steps, got the string {steps!r}")
    steps = list(steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not steps or bad:
        raise ValueError(f"at(steps) needs a non-empty list of integer steps >= 1, got {steps[:10]!r}")
    chosen = frozenset(steps)
    return Schedule(chosen.__contains__, "at " + ",".join(map(str, sorted(chosen))))


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
