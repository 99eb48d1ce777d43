"""A sweep's grid: the cells (one run each) of a cartesian product of methods, ranks, α, learning rates and seeds.

Full fine-tuning has no adapter, so it takes no rank or α: it runs once per learning rate and seed. α is given
per cell as a rule of the rank, so one grid can hold "α = 4r" at every rank:

    "8"      α = 8 at every rank (scale 8 / r)
    "r", "4r", "r/4", "0.5r"   α = k·r (scale k)
    "rs4"    rsLoRA scaling: scale 4 / sqrt(r), i.e. α = 4·sqrt(r)

A cell's name spells its parameters (``lora-r4-a4r-lr0.01-s0``, ``full-lr0.001-s0``): the name is the run
directory, which is how a rerun knows which cells are finished.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from loft_probe.runner import METHODS

ADAPTER_METHODS = ("lora", "loft")
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RELATIVE = re.compile(rf"({_NUMBER})?r(?:/({_NUMBER}))?")
_RSLORA = re.compile(rf"rs({_NUMBER})")
_ABSOLUTE = re.compile(_NUMBER)


@dataclass(frozen=True)
class Alpha:
    """An α rule: ``kind`` "abs" (α = value), "rel" (α = value·r) or "rs" (rsLoRA: α = value·sqrt(r))."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """The rule as written in names and tables: "8", "4r", "0.25r", "r", "rs4"."""
        number = _short(self.value)
        if self.kind == "rel":
            return "r" if self.value == 1 else f"{number}r"
        return f"rs{number}" if self.kind == "rs" else number

    def at(self, rank: int) -> float:
        """α for an adapter of this rank."""
        if self.kind == "abs":
            return self.value
        return self.value * (rank if self.kind == "rel" else math.sqrt(rank))


def parse_alpha(text: str) -> Alpha:
    """"8" | "r" | "4r" | "r/4" | "0.5r" | "rs4" → an `Alpha` rule (see the module docstring)."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        value = float(match.group(1) or 1) / float(match.group(2) or 1)
        kind = "rel"
    elif match := _RSLORA.fullmatch(text):
        value, kind = float(match.group(1)), "rs"
    elif _ABSOLUTE.fullmatch(text):
        value, kind = float(text), "abs"
    else:
        raise ValueError(f"alpha {text!r} is not a number, a multiple of r (r, 4r, r/4) or rsLoRA (rs4)")
    if not 0 < value < math.inf:
        raise ValueError(f"alpha {text!r} must be > 0")
    return Alpha(kind, value)


@dataclass(frozen=True)
class Cell:
    """One run of a sweep. ``rank`` and ``alpha`` are None for full fine-tuning; ``lr`` None is the task's."""

    method: str
    rank: int | None
    alpha: Alpha | None
    lr: float | None
    seed: int

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.rank is not None:
            parts += [f"r{self.rank}", f"a{self.alpha.label}"]
        if self.lr is not None:
            parts.append(f"lr{_short(self.lr)}")
        return "-".join([*parts, f"s{self.seed}"])

    @property
    def alpha_value(self) -> float | None:
        """α of the adapter (None for full fine-tuning)."""
        return self.alpha.at(self.rank) if self.alpha is not None else None

    def record(self) -> dict:
        """The cell as JSON-ready fields, for the run's meta and the results table."""
        fields = asdict(self)
        fields["alpha"] = self.alpha.label if self.alpha is not None else None
        return {"name": self.name, **fields, "alpha_value": self.alpha_value}


def make_grid(methods: Sequence[str], ranks: Sequence[int], alphas: Sequence[str | Alpha],
              lrs: Sequence[float] | Mapping[str, Sequence[float]] | None, seeds: Sequence[int]) -> list[Cell]:
    """Every cell of the product, in a fixed order (seed slowest, so a sweep's first cells span the grid).

    Args:
        methods: subset of ("full", "lora", "loft").
        ranks, alphas: adapter ranks and α rules (ignored by "full"; needed when a method is lora or loft).
        lrs: one list for every method, a {method: list} per method, or None for the task's defaults.
        seeds: model initialisation, LoRA initialisation and data order, as `loft-probe run --seed`.
    """
    methods = _unique("method", methods)
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    alphas = _unique("alpha", [a if isinstance(a, Alpha) else parse_alpha(a) for a in alphas])
    ranks, seeds = _unique("rank", ranks), _unique("seed", seeds)
    _positive_ints("rank", ranks)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or not seeds:
        raise ValueError(f"seeds must be one or more integers >= 0, got {list(seeds)}")
    if any(m in ADAPTER_METHODS for m in methods) and not (ranks and alphas):
        raise ValueError("lora and loft need at least one rank and one alpha")
    per_method = _lrs_per_method(lrs, methods)
    cells = []
    for seed, method in itertools.product(seeds, methods):
        shapes = [(None, None)] if method == "full" else list(itertools.product(ranks, alphas))
        cells += [Cell(method, rank, alpha, lr, seed) for lr in per_method[method] for rank, alpha in shapes]
    return cells


def _lrs_per_method(lrs, methods: Sequence[str]) -> dict[str, list[float | None]]:
    if lrs is None:
        return {m: [None] for m in methods}
    if not isinstance(lrs, Mapping):
        lrs = {m: lrs for m in methods}
    missing = [m for m in methods if m not in lrs]
    unknown = sorted(set(lrs) - set(methods))
    if missing or unknown:
        raise ValueError(f"per-method learning rates must name exactly the methods {list(methods)}; "
                         f"missing {missing}, not in the sweep {unknown}")
    out = {}
    for method in methods:
        values = _unique(f"lr of {method}", lrs[method])
        if not values or any(isinstance(v, bool) or not 0 < v < math.inf for v in values):
            raise ValueError(f"learning rates of {method} must be one or more numbers > 0, got {list(values)}")
        out[method] = [float(v) for v in values]
    return out


def _unique(what: str, values: Iterable) -> list:
    values = list(values)
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise ValueError(f"{what} values must be distinct, got {twice[0]!r} twice")
    return values


def _positive_ints(what: str, values: Sequence) -> None:
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"{what} must be integers >= 1, got {bad[0]!r}")


def _short(value: float) -> str:
    """The shortest text that reads back as the same float: 0.01, 1e-05, 4 (not 4.0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
