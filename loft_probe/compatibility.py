"""Whether runs compare: the same base weights, layer names and shapes, seed and data order
(docs/metrics-spec.md, "Cross-run comparison"), against a reference chosen by one rule (`default_reference`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

from loft_probe.run import Run, load_run

_SHOWN = 3  # layer names a message lists before "and N more"


class IncompatibleRunsError(ValueError):
    """Runs that differ in base weights, layers, seed or data order; the message names each field."""


class IncompatibleRunsWarning(UserWarning):
    """``force=True``: the runs differ as `IncompatibleRunsError` would say, and are compared anyway."""


class RunSelectionError(ValueError):
    """No usable reference run (none or several full runs, an unknown name), or two runs with one name."""


def check_compatible(runs: Iterable[Run | str | os.PathLike], force: bool = False, *,
                     reference: Run | None = None) -> None:
    """Refuse runs that cannot be compared with the reference, naming every field that differs.

    Args:
        runs: `Run` objects or run directories.
        force: warn (`IncompatibleRunsWarning`, one warning naming the same differences) instead of raising.
        reference: the run the others are checked against; default `default_reference` of the runs.

    Each run is checked against the reference on:
        - seed and data_order (meta), equal values (None only equals None);
        - layers: one run's layer names must all be in the other's (an adapter run usually probes a subset
          of a full run's layers; layers only in one run are not compared), with equal shapes;
        - fingerprint: the sha256 of the probed base weights. It covers the probed layer set, so it is only
          comparable between runs probing the same layers; otherwise per-layer fingerprints
          (``layers[i]["fingerprint"]``) are compared when both runs record them, and the base weights are
          reported as unverifiable when they do not.

    Raises:
        IncompatibleRunsError: one line, ``"runs do not compare: seed: lora has 1, full has 0; ..."``.
        RunSelectionError: no reference given and no default one (see `default_reference`).
    """
    runs = [as_run(run) for run in runs]
    if reference is None:
        reference = default_reference(runs)
    found = [d for run in runs if run is not reference for d in _differences(run, reference)]
    if not found:
        return
    message = "runs do not compare: " + "; ".join(found)
    if not force:
        raise IncompatibleRunsError(message)
    warnings.warn(message + " (force=True: compared anyway)", IncompatibleRunsWarning, stacklevel=2)


def _differences(run: Run, ref: Run) -> list[str]:
    """One phrase per field in which `run` differs from the reference `ref`."""
    found = [f"{key}: {run.name} has {run.meta.get(key)!r}, {ref.name} has {ref.meta.get(key)!r}"
             for key in ("seed", "data_order") if run.meta.get(key) != ref.meta.get(key)]
    mine, theirs = layer_table(run), layer_table(ref)
    # The run with fewer layers must have them all in the other (a LoRA run probes a subset of a full run's).
    small, large = (run, ref) if len(mine) <= len(theirs) else (ref, run)
    missing = [name for name in layer_table(small) if name not in layer_table(large)]
    if missing:
        found.append(f"layers: {small.name} has {_names(missing)} not in {large.name}")
    common = [name for name in mine if name in theirs]
    shapes = [name for name in common if mine[name]["shape"] != theirs[name]["shape"]]
    if shapes:
        first = shapes[0]
        found.append(f"shape: layer {first!r} is {mine[first]['shape']} in {run.name}, "
                     f"{theirs[first]['shape']} in {ref.name}" + _more(shapes, 1))
    if mine.keys() == theirs.keys():
        if run.meta.get("fingerprint") != ref.meta.get("fingerprint"):
            found.append(f"fingerprint: {run.name} has {_short(run.meta.get('fingerprint'))}, "
                         f"{ref.name} has {_short(ref.meta.get('fingerprint'))}")
    elif all("fingerprint" in mine[name] and "fingerprint" in theirs[name] for name in common):
        differ = [name for name in common if mine[name]["fingerprint"] != theirs[name]["fingerprint"]]
        if differ:
            first = differ[0]
            a, b = _short(mine[first]["fingerprint"]), _short(theirs[first]["fingerprint"])
            found.append(f"fingerprint: layer {first!r} is {a} in {run.name}, {b} in {ref.name}"
                         + _more(differ, 1))
    else:
        found.append(f"fingerprint: covers {len(mine)} layers in {run.name}, {len(theirs)} in {ref.name}, "
                     "so the base weights cannot be checked (no per-layer fingerprints)")
    return found


def layer_table(run: Run) -> dict[str, dict]:
    return {str(layer["name"]): layer for layer in run.meta["layers"]}


def _names(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names[:_SHOWN]) + _more(names, _SHOWN)


def _more(items: list, shown: int) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""


def _short(fingerprint: object) -> str:
    """A fingerprint for a message: sha256 digests differ within their first 12 hex digits."""
    long = isinstance(fingerprint, str) and len(fingerprint) > 12
    return repr(f"{fingerprint[:12]}…" if long else fingerprint)


def default_reference(runs: list[Run]) -> Run:
    """The reference when none is named: the one run whose method is "full"; RunSelectionError when there is
    none or more than one (the choice is the user's then)."""
    full = [run for run in runs if run.method == "full"]
    if len(full) != 1:
        raise RunSelectionError(f"need exactly one run with method 'full' as the default reference, got "
                                f"{[run.name for run in full]}; choose the reference (--reference on the command line, "
                                f"reference= in Python) among {[run.name for run in runs]}")
    return full[0]


def as_run(run: Run | str | os.PathLike) -> Run:
    """A Run as given, or read from its directory."""
    return run if isinstance(run, Run) else load_run(run)
