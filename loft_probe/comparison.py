"""Cross-run comparison: adapter runs (LoRA, LoFT, ...) against a reference run, snapshot by snapshot.

Runs compare only when they share base weights, layer names and shapes, seed and data order
(docs/metrics-spec.md, "Cross-run comparison"): `loft_probe.compatibility.check_compatible` refuses them
otherwise. `compare` reads the
runs' snapshots (top-k singular triplets of the cumulative ΔW = W_t − W_0, and the adapter factors B, A)
and returns one tidy long-form frame; `loft_probe.summary.comparison_table` reduces it to one row per (run,
metric). Every number comes from `loft_probe.metrics`; no m×n matrix is formed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pandas as pd
import torch
from torch import Tensor

from loft_probe.compatibility import (
    IncompatibleRunsError,
    IncompatibleRunsWarning,
    RunSelectionError,
    as_run,
    check_compatible,
    default_reference,
    layer_table,
)
from loft_probe.metrics import (
    SVD,
    grassmann_distance,
    lowrank_svd,
    orth,
    principal_angles,
    relative_norm,
    subspace_similarity,
    update_cosine,
)
from loft_probe.run import RUN_LAYER, Run, RunDirError

# The frame's columns: step (int64); layer ("" for run-level rows); run: the run's name (two LoRA runs of
# different rank stay apart); method: its meta "method" (full, lora, loft, other); reference: the reference
# run's name; metric: a key of COMPARE_METRICS; value (float64).
COLUMNS = ("step", "layer", "run", "method", "reference", "metric", "value")

COMPARE_METRICS = {
    "angle_left_max": "largest principal angle (rad) between span(B) and the reference's top-r left subspace",
    "angle_left_mean": "mean principal angle (rad) on the left",
    "angle_right_max": "largest principal angle (rad) between span(Aᵀ) and the reference's top-r right one",
    "angle_right_mean": "mean principal angle (rad) on the right",
    "grassmann_left": "Grassmann distance sqrt(Σθ²) on the left (rad)",
    "grassmann_right": "Grassmann distance on the right (rad)",
    "phi_left": "φ(r, r) on the left: mean cos²θ, 1 = same subspace, 0 = orthogonal",
    "phi_right": "φ(r, r) on the right",
    "delta_cosine": "cos(ΔW_run, ΔW_ref) of the cumulative changes, from their top-k SVDs",
    "delta_rel_norm": "‖ΔW_run‖ / ‖ΔW_ref‖, from the top-k singular values",
    "intruders": "the run's own intruder count, copied from its metrics (the reference's too)",
    "loss_gap": "loss_run − loss_ref at a step where both recorded a loss (layer \"\")",
}

# Which end of each metric is worse, for `loft_probe.summary.comparison_table`'s worst layer. None: no
# direction (a norm ratio is off both ways), so no worst layer is named.
WORSE_IS_HIGHER: dict[str, bool | None] = {
    "angle_left_max": True,
    "angle_left_mean": True,
    "angle_right_max": True,
    "angle_right_mean": True,
    "grassmann_left": True,
    "grassmann_right": True,
    "phi_left": False,
    "phi_right": False,
    "delta_cosine": False,
    "delta_rel_norm": None,
    "intruders": True,
    "loss_gap": True,
}

# The snapshot metrics describe the runs' state at a step: their summary is at the last step; the loss gap is
# a per-step metric, summarized by its late value (loft_probe.run.series).
END_STATE = frozenset(COMPARE_METRICS) - {"loss_gap"}

_SNAPSHOT_EPS = torch.finfo(torch.float32).eps  # snapshots are stored in float32


# ---------------------------------------------------------------------------------------------- comparison
def compare(runs: Iterable[Run | str | os.PathLike], reference: Run | str | None = None,
            force: bool = False) -> pd.DataFrame:
    """Every run against the reference run: subspaces, cumulative ΔW, intruders and loss, as one long frame.

    Args:
        runs: `Run` objects or run directories, with unique names.
        reference: a run name or `Run`; default the single run whose method is "full".
        force: compare incompatible runs anyway, with a warning (see `check_compatible`).

    Returns:
        DataFrame with columns `COLUMNS` = (step, layer, run, method, reference, metric, value): run is
        the run's name, method its meta method. For each other run, at each snapshot step it shares with the
        reference, for each layer both probe with the same shape:

        - angle_{left,right}_{max,mean}, grassmann_{left,right}, phi_{left,right}: principal angles (rad),
          Grassmann distance and φ(r, r) = mean cos²θ between the adapter's column space span(B) and the
          reference's top-r left singular subspace span(U_ref[:, :r]), and on the right between span(Aᵀ)
          and span(Vh_refᵀ[:, :r]). r is the adapter's rank (numerical: of B, resp. A), capped at the
          number of nonzero singular values of ΔW_ref; a run without adapter factors uses its own ΔW's
          singular vectors (those with nonzero singular values) instead of B and Aᵀ.
        - delta_cosine: cos(ΔW_run, ΔW_ref) from the two top-k SVDs held as `LowRank(U·S, Vh)`. Exact when
          k ≥ rank ΔW: true for a rank-r LoRA ΔW with k ≥ 2r (B_0 ≠ 0), while a full run's ΔW is its top-k
          truncation.
        - delta_rel_norm: ‖ΔW_run‖ / ‖ΔW_ref‖ from the top-k singular values (same truncation caveat).

        Rows whose quantity is undefined are left out: angles when a subspace is empty (B = 0 at
        initialisation, ΔW_ref = 0 at step 0), delta_cosine when either ΔW is zero, delta_rel_norm when
        ΔW_ref is zero. Besides, at the steps compared:

        - intruders: each run's own recorded count, copied, for the adapter runs and for the reference
          itself (run = reference = the reference's name), so that the frame keeps one shape;
        - loss_gap (layer ""): loss_run − loss_ref at every step where both recorded "loss".

    Raises:
        RunSelectionError: no reference can be chosen, or two runs share a name.
        IncompatibleRunsError: the runs differ (see `check_compatible`), unless ``force=True``.
    """
    runs, ref = _select(runs, reference)
    check_compatible(runs, force, reference=ref)
    others = [run for run in runs if run is not ref]
    layers = {run.name: _common_layers(run, ref) for run in others}
    steps = {run.name: sorted(set(run.snapshot_steps) & set(ref.snapshot_steps)) for run in others}

    compared = sorted({step for run_steps in steps.values() for step in run_steps})
    rows = []
    for step in compared:
        ref_snapshot = ref.snapshot(step)  # loaded once per step: it holds every layer of the reference
        for run in others:
            if step not in steps[run.name]:
                continue
            snapshot = run.snapshot(step)
            for layer in layers[run.name]:
                if layer in snapshot and layer in ref_snapshot:
                    metrics = _layer_metrics(_tensors(run, step, layer, snapshot),
                                             _tensors(ref, step, layer, ref_snapshot))
                    rows += [(step, layer, run.name, run.method, ref.name, metric, value)
                             for metric, value in metrics.items()]

    pieces = [pd.DataFrame(rows, columns=list(COLUMNS))]
    for run in others:
        pieces.append(_labelled(_recorded(run, "intruders", layers[run.name], steps[run.name]),
                                run, ref, "intruders"))
        pieces.append(_labelled(_loss_gap(run, ref), run, ref, "loss_gap"))
    ref_layers = list(dict.fromkeys(layer for run_layers in layers.values() for layer in run_layers))
    pieces.append(_labelled(_recorded(ref, "intruders", ref_layers, compared), ref, ref, "intruders"))
    # Empty pieces are dropped: pandas is deprecating their effect on the concatenated dtypes.
    frame = pd.concat([piece for piece in pieces if len(piece)] or pieces[:1], ignore_index=True)
    return frame.astype({"step": "int64", "layer": "string", "run": "string", "method": "string",
                         "reference": "string", "metric": "string", "value": "float64"})


def _select(runs: Iterable[Run | str | os.PathLike], reference: Run | str | None) -> tuple[list[Run], Run]:
    """The runs (a `Run` reference not among them joins them) and the reference run."""
    runs = [as_run(run) for run in runs]
    if isinstance(reference, Run) and not any(run is reference for run in runs):
        runs.insert(0, reference)
    names = [run.name for run in runs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise RunSelectionError(f"run names must be unique to label the frame, got {twice} more than once")
    if len(runs) < 2:
        raise RunSelectionError(f"compare needs at least two runs, got {names}")
    if isinstance(reference, Run):
        return runs, reference
    if reference is not None:
        match = [run for run in runs if run.name == reference]
        if not match:
            raise RunSelectionError(f"reference {reference!r} is not one of the runs {names}")
        return runs, match[0]
    return runs, default_reference(runs)


def _common_layers(run: Run, ref: Run) -> list[str]:
    """Layers both runs probe with the same shape, in the reference's order (force may let others through)."""
    mine = layer_table(run)
    return [name for name, layer in layer_table(ref).items()
            if name in mine and mine[name]["shape"] == layer["shape"]]


def _tensors(run: Run, step: int, layer: str, snapshot: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """One layer's snapshot tensors in float64 (the metrics then run in float64 on float32-stored data)."""
    tensors = snapshot[layer]
    for what in ("delta.U", "delta.S", "delta.Vh"):
        if what not in tensors:
            raise RunDirError(f"{run.path}: snapshot at step {step} has no {what!r} for layer {layer!r}")
    return {what: tensor.double() for what, tensor in tensors.items()}


def _delta(tensors: dict[str, Tensor]) -> SVD:
    return SVD(tensors["delta.U"], tensors["delta.S"], tensors["delta.Vh"])  # (m, k), (k,), (k, n)


def _rank(svd: SVD) -> int:
    """Numerical rank of a stored top-k SVD: σ > max(m, n)·eps(float32)·σ_max (numpy's matrix_rank rule).

    A LoRA run's snapshot pads its rank-r ΔW to k = 2r with zero singular values; those directions are
    an arbitrary completion and must not count as part of its subspace.
    """
    if svd.S.numel() == 0:
        return 0
    tol = max(svd.U.shape[0], svd.Vh.shape[1]) * _SNAPSHOT_EPS * svd.S.max()
    return int((svd.S > tol).sum())


def _spans(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Spanning sets of the run's column space (m, p) and row space (n, p): B and Aᵀ, else ΔW's vectors."""
    if "adapter.B" in tensors and "adapter.A" in tensors:
        return tensors["adapter.B"], tensors["adapter.A"].mT
    delta = _delta(tensors)
    r = _rank(delta)
    return delta.U[:, :r], delta.Vh[:r].mT


def _side(span: Tensor, ref_vectors: Tensor) -> dict[str, float]:
    """Angles, Grassmann distance and φ(r, r) between span(span) and the top-r reference vectors.

    Args:
        span: (d, p) the run's spanning set; r = its numerical rank.
        ref_vectors: (d, k) the reference's singular vectors with nonzero singular values, descending.

    Returns {"max", "mean", "grassmann", "phi"}, or {} when either subspace is empty.
    """
    Q = orth(span)  # (d, r)
    P = orth(ref_vectors[:, : Q.shape[1]])  # (d, min(r, k)); stored in float32: orthonormal to 1e-7 only
    if Q.shape[1] == 0 or P.shape[1] == 0:
        return {}
    theta = principal_angles(Q, P, orthonormal=True)  # (min(r, k),) ascending
    return {"max": theta[-1].item(), "mean": theta.mean().item(),
            "grassmann": grassmann_distance(Q, P, orthonormal=True).item(),
            "phi": subspace_similarity(Q, P)[-1, -1].item()}  # φ over all columns: basis order is irrelevant


def _layer_metrics(run: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """The snapshot metrics of one layer of a run against the reference at one step (see `compare`)."""
    mine, theirs = _delta(run), _delta(ref)
    r_ref = _rank(theirs)
    left, right = _spans(run)
    out = {}
    # The right side is the left side of the transposes (ΔWᵀ = Vh ᵀ·S·Uᵀ): one function, two calls.
    for side, span, ref_vectors in (("left", left, theirs.U[:, :r_ref]),
                                    ("right", right, theirs.Vh[:r_ref].mT)):
        values = _side(span, ref_vectors)
        out |= {f"angle_{side}_{key}": values[key] for key in ("max", "mean") if key in values}
        out |= {f"{key}_{side}": values[key] for key in ("grassmann", "phi") if key in values}
    if mine.S.any() and theirs.S.any():
        out["delta_cosine"] = update_cosine(mine.lowrank(), theirs.lowrank()).item()
    if theirs.S.any():
        out["delta_rel_norm"] = relative_norm(mine.S, theirs.S, dim=(-1,)).item()
    return out


def _recorded(run: Run, metric: str, layers: list[str], steps: list[int] | None = None) -> pd.DataFrame:
    """(step, layer, value) of a recorded metric at these layers, and these steps unless None."""
    rows = run.rows(metric, layers)
    if steps is not None:
        rows = rows[rows["step"].isin(steps)]
    return rows[["step", "layer", "value"]]


def _loss_gap(run: Run, ref: Run) -> pd.DataFrame:
    """(step, layer "", loss_run − loss_ref) at every step where both runs recorded a loss."""
    mine, theirs = _recorded(run, "loss", [RUN_LAYER]), _recorded(ref, "loss", [RUN_LAYER])
    both = mine.merge(theirs, on=["step", "layer"], suffixes=("", "_ref"))
    return both.assign(value=both["value"] - both["value_ref"])[["step", "layer", "value"]]


def _labelled(table: pd.DataFrame, run: Run, ref: Run, metric: str) -> pd.DataFrame:
    """A (step, layer, value) table as frame rows of `run` against `ref`."""
    return table.assign(run=run.name, method=run.method, reference=ref.name, metric=metric)[list(COLUMNS)]


def phi_grid(run: Run, ref: Run, step: int, layer: str, side: str = "left",
             size: int | None = None) -> Tensor:
    """The φ grid of one layer at one step (for a heat map): run's vs reference's top singular vectors.

    Args:
        run, ref: the compared run and the reference, both with a snapshot at `step` holding `layer`.
        side: "left" (column spaces, U) or "right" (row spaces, Vhᵀ).
        size: cap on both grid dimensions; default none.

    Returns:
        (i, j) float64 grid, entry [a-1, b-1] = φ(a, b) = ‖U_run[:, :a]ᵀ·U_ref[:, :b]‖² / min(a, b)
        (`subspace_similarity`). The run's vectors are the singular vectors of its adapter's B·A (from
        its factors, `lowrank_svd`), else of its ΔW; the reference's those of its ΔW; both only those
        with nonzero singular values, so i ≤ rank, j ≤ min(k, rank ΔW_ref). With an adapter of full rank
        r, entry [r-1, r-1] is the frame's phi_left / phi_right.

    References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, §7.2.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None, got {size}")
    mine = _tensors(run, step, layer, _snapshot_layer(run, step, layer))
    theirs = _delta(_tensors(ref, step, layer, _snapshot_layer(ref, step, layer)))
    if "adapter.B" in mine and "adapter.A" in mine:
        vectors = lowrank_svd(mine["adapter.B"], mine["adapter.A"])
    else:
        vectors = _delta(mine)
    i, j = _rank(vectors), _rank(theirs)
    if i == 0 or j == 0:
        raise ValueError(f"layer {layer!r} at step {step}: ΔW of {run.name if i == 0 else ref.name} is zero, "
                         "no singular vectors to compare")
    if size is not None:
        i, j = min(i, size), min(j, size)
    if side == "left":
        return subspace_similarity(vectors.U[:, :i], theirs.U[:, :j])
    return subspace_similarity(vectors.Vh[:i].mT, theirs.Vh[:j].mT)


def _snapshot_layer(run: Run, step: int, layer: str) -> dict[str, dict[str, Tensor]]:
    snapshot = run.snapshot(step)
    if layer not in snapshot:
        raise RunDirError(f"{run.path}: snapshot at step {step} has no layer {layer!r}; "
                          f"it has {list(snapshot)}")
    return snapshot


__all__ = ["COLUMNS", "COMPARE_METRICS", "END_STATE", "WORSE_IS_HIGHER", "IncompatibleRunsError",
           "IncompatibleRunsWarning", "RunSelectionError", "check_compatible", "compare", "default_reference",
           "phi_grid"]
