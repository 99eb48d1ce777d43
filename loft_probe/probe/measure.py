"""What a probe records about one layer at one step: pure functions from tensors to ``{metric: value}``.

Names and meanings are those of :data:`loft_probe.run.METRICS`; formulas come from
:mod:`loft_probe.metrics` (spec: docs/metrics-spec.md). A metric that is undefined at its input (a cosine with
a zero vector, the residual of G = 0, a ratio to lr = 0: NaN from `loft_probe.metrics`) is left out of the
returned dict, so it is a missing row in the record, never a number; NaN in a record means the training
itself went non-finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loft_probe import metrics
from loft_probe.probe.layouts import Moments, Side

ALL = (-3, -2, -1)  # the sides of a pair and both matrix dimensions: the sides as one vector


def _defined(values: dict[str, Tensor | float]) -> dict[str, float]:
    """The values as floats, without the undefined (NaN) ones; ±inf (an overflow) stays."""
    out = {name: float(value) for name, value in values.items()}
    return {name: value for name, value in out.items() if not math.isnan(value)}


def update_metrics(update: Tensor | metrics.LowRank, weight_norm: Tensor | float, grad: Tensor | None,
                   lr: float | None) -> dict[str, float]:
    """The step's effective-weight update ΔW against the norm of the weight it started from, the learning rate
    it was taken with (None: the optimizer sets its own per weight, as Adafactor's relative step), and the
    gradient G (m×n). ΔW is m×n, or a LoRA pair's rank ≤ 2r :class:`LowRank` when no G is compared (sizes
    from r×r products: no m×n work at all)."""
    norm = metrics.lowrank_norm(*update) if isinstance(update, metrics.LowRank) else update.norm()
    out = {"update_norm": norm, "update_weight_ratio": metrics.ratio(norm, torch.as_tensor(weight_norm))}
    if lr is not None:
        out["update_lr_ratio"] = metrics.update_lr_ratio(update, lr)
    if grad is not None:
        out["grad_norm"] = grad.norm()
        out["cos_update_grad"] = metrics.cosine(update, grad)
    return _defined(out)


def cumulative_metrics(delta_norm: Tensor | float) -> dict[str, float]:
    """The cumulative change ‖W_t − W_0‖ since attach (its norm computed by the recorder: from the factors for
    a LoRA pair, from W_0 for a dense weight)."""
    return _defined({"weight_change_norm": delta_norm})


def factor_metrics(initial: tuple[Tensor, Tensor], now: tuple[Tensor, Tensor],
                   grads: tuple[Tensor | None, Tensor | None]) -> dict[str, float]:
    """A LoRA pair's own factors: how far each has moved since attach, ‖B_t − B_0‖ (m×r) and ‖A_t − A_0‖ (r×n),
    which is 0 for a factor that never trains (frozen, or a dead gradient); and the factor gradients' joint
    norm. Cumulative, not per step: LoFT moves one factor per step, so a per-step norm recorded every k-th
    (even) step would show the same factor still at every record."""
    (B0, A0), (B1, A1) = initial, now
    out: dict[str, Tensor | float] = {"factor_b_change_norm": (B1 - B0).norm(),
                                      "factor_a_change_norm": (A1 - A0).norm()}
    g_B, g_A = grads
    if g_B is not None and g_A is not None:
        out["factor_grad_norm"] = (g_B.float().norm() ** 2 + g_A.float().norm() ** 2).sqrt()
    return _defined(out)


def residual_metrics(grad: Tensor, B: Tensor, A: Tensor) -> dict[str, float]:
    """How much of G (m×n) the adapter with factors B (m×r), A (r×n) can express."""
    left, right, tangent = metrics.projection_residuals(grad, B, A)
    return _defined({"residual_left": left, "residual_right": right, "residual_tangent": tangent})


def shadow_metrics(update: Tensor, shadow_update: Tensor) -> dict[str, float]:
    """The actual update against the shadow's update from the same point (both m×n)."""
    return _defined({"shadow_update_cosine": metrics.cosine(update, shadow_update),
                     "shadow_update_rel_norm": metrics.relative_norm(update, shadow_update)})


def moment_metrics(own: Moments, shadow: Moments, eps: float) -> dict[str, float]:
    """An optimizer's full-space moments (m×n: a dense weight's, LoFT's reconstruction) against the shadow's:
    errors and cosines of each moment both have, and of the preconditioned directions ``M/(sqrt(V) + ε)``."""
    out = {}
    if own.first is not None and shadow.first is not None:
        out["shadow_m_rel_error"] = metrics.relative_error(own.first, shadow.first)
        out["shadow_m_cosine"] = metrics.cosine(own.first, shadow.first)
    if own.second is not None and shadow.second is not None:
        out["shadow_v_rel_error"] = metrics.relative_error(own.second, shadow.second)
        out["shadow_v_cosine"] = metrics.cosine(own.second, shadow.second)
        if own.first is not None and shadow.first is not None:
            out["shadow_precond_cosine"] = metrics.preconditioned_cosine(own.first, own.second, shadow.first,
                                                                         shadow.second, eps=eps)
    return _defined(out)


def side_metrics(sides: list[Side], shadow: Moments, eps: float) -> dict[str, float]:
    """A pair's per-factor first moments and preconditioned directions (m×n each, in the subspace that factor
    expresses) against the shadow's projected onto the same subspaces; both sides of a LoRA pair together
    (as one vector), and each named side's cosine on its own (GaLore's one side has no name)."""
    own = torch.stack([side.first for side in sides])  # (sides, m, n)
    shadow_first = shadow.first.to(own.dtype)
    target = torch.stack([side.project(shadow_first) for side in sides])
    out = {"shadow_m_proj_rel_error": metrics.relative_error(own, target, dim=ALL),
           "shadow_m_proj_cosine": metrics.cosine(own, target, dim=ALL)}
    for side, own_side, target_side in zip(sides, own, target, strict=True):
        if side.name is not None:
            out[f"shadow_m_proj_cosine_{side.name}"] = metrics.cosine(own_side, target_side)
    if shadow.second is not None and all(side.direction is not None for side in sides):
        shadow_direction = metrics.preconditioned_direction(shadow_first, shadow.second.to(own.dtype), eps)
        directions = torch.stack([side.direction for side in sides])
        projected = torch.stack([side.project(shadow_direction) for side in sides])
        out["shadow_precond_proj_cosine"] = metrics.cosine(directions, projected, dim=ALL)
    return _defined(out)


def moment_grad_metrics(first: Tensor, grad: Tensor) -> dict[str, float]:
    """The optimizer's first moment against this step's gradient: (m, n) each, or flat vectors (factor space)."""
    return _defined({"cos_moment_grad": metrics.cosine(first, grad, dim=tuple(range(-first.dim(), 0)))})


def layout_metrics(values: dict[str, Tensor | float]) -> dict[str, float]:
    """An optimizer's own metrics (:meth:`Layout.extra_values`: GaLore's refreshes), the undefined left out."""
    return _defined(values)


def spectrum_metrics(delta: metrics.SVD, base_norm: float) -> dict[str, float]:
    """The cumulative ΔW from its (top-k) singular values; its size relative to a zero W_0 is undefined."""
    S = delta.S
    return _defined({"delta_rel_size": S.norm() / base_norm if base_norm > 0 else math.nan,
                     "delta_stable_rank": metrics.stable_rank(S), "delta_r90": metrics.r90(S)})


def intruder_metrics(scores: Tensor) -> dict[str, float]:
    """Intruder dimensions at ε = 0.5 (Shuttleworth et al.'s default) from the tuned weight's scores."""
    return _defined({"intruders": metrics.intruder_counts(scores, 0.5)})
