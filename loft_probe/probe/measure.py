"""What a probe records about one layer at one step: pure functions from tensors to ``{metric: value}``.

Names and meanings are those of :data:`loft_probe.probe.rundir.METRICS`; formulas come from
:mod:`loft_probe.metrics` (spec: docs/metrics-spec.md).
"""

from __future__ import annotations

from torch import Tensor

from loft_probe import metrics as M


def _f(x: Tensor) -> float:
    return float(x)


def update_metrics(update: Tensor, weight_before: Tensor, grad: Tensor | None) -> dict[str, float]:
    """The step's effective-weight update ΔW (m×n) against the weight it started from and the gradient."""
    out = {"update_norm": _f(update.norm()), "update_weight_ratio": _f(M.relative_norm(update, weight_before))}
    if grad is not None:
        out["grad_norm"] = _f(grad.norm())
        out["cos_update_grad"] = _f(M.cosine(update, grad))
    return out


def residual_metrics(grad: Tensor, B: Tensor, A: Tensor) -> dict[str, float]:
    """How much of G (m×n) the adapter with factors B (m×r), A (r×n) can express."""
    left, right, tangent = M.projection_residuals(grad, B, A)
    return {"residual_left": _f(left), "residual_right": _f(right), "residual_tangent": _f(tangent)}


def shadow_metrics(update: Tensor, shadow_update: Tensor) -> dict[str, float]:
    """The actual update against the shadow AdamW's update from the same point (both m×n)."""
    return {"shadow_update_cosine": _f(M.cosine(update, shadow_update)),
            "shadow_update_rel_norm": _f(M.relative_norm(update, shadow_update))}


def moment_metrics(first: Tensor, second: Tensor | None, shadow_first: Tensor, shadow_second: Tensor,
                   projected_shadow_first: Tensor | None, eps: float) -> dict[str, float]:
    """An optimizer's full-space moments (m×n) against the shadow's: errors, cosines, and against the shadow's
    first moment projected onto the adapter (which isolates transport and alternation from the subspace)."""
    out = {"shadow_m_rel_error": _f(M.relative_error(first, shadow_first)),
           "shadow_m_cosine": _f(M.cosine(first, shadow_first))}
    if second is not None:
        out["shadow_v_rel_error"] = _f(M.relative_error(second, shadow_second))
        out["shadow_v_cosine"] = _f(M.cosine(second, shadow_second))
        out["shadow_precond_cosine"] = _f(M.preconditioned_cosine(first, second, shadow_first, shadow_second,
                                                                  eps=eps))
    if projected_shadow_first is not None:
        out["shadow_m_proj_rel_error"] = _f(M.relative_error(first, projected_shadow_first))
        out["shadow_m_proj_cosine"] = _f(M.cosine(first, projected_shadow_first))
    return out


def spectrum_metrics(delta: M.SVD, base_norm: float) -> dict[str, float]:
    """The cumulative ΔW from its (top-k) singular values."""
    S = delta.S
    return {"delta_rel_size": _f(S.norm()) / base_norm if base_norm > 0 else 0.0,
            "delta_stable_rank": _f(M.stable_rank(S)), "delta_r90": _f(M.r90(S))}


def intruder_metrics(scores: Tensor) -> dict[str, float]:
    """Intruder dimensions at ε = 0.5 (Shuttleworth et al.'s default) from the tuned weight's scores."""
    return {"intruders": _f(M.intruder_counts(scores, 0.5))}
