"""transformers' ``Adafactor`` (Shazeer & Stern 2018): a factored second moment, no gradient first moment.

Its step, for G (m×n), step t and ``eps = (ε1, ε2)``::

    β2_t = 1 − t^decay_rate
    R ← β2_t·R + (1 − β2_t)·rowmean(G² + ε1)        ``exp_avg_sq_row`` (m,)
    C ← β2_t·C + (1 − β2_t)·colmean(G² + ε1)        ``exp_avg_sq_col`` (n,)
    V̂ = R·Cᵀ / mean(R)                               (m×n) the rank-1 second moment it divides by
    U = G / sqrt(V̂);  U ← U / max(1, RMS(U)/clip_threshold)        update clipping
    ρ = lr, or with ``relative_step`` min(10⁻², 1/sqrt(t)) (``warmup_init``: min(10⁻⁶·t, 1/sqrt(t)))
    ρ ← ρ·max(ε2, RMS(W)) with ``scale_parameter``
    with β1: m ← β1·m + (1 − β1)·ρ·U, and the step is m (``exp_avg``)
    W ← W − ρ·λ·W − (ρ·U or m)

A weight that is not a matrix (1-D) keeps an unfactored ``exp_avg_sq`` = EMA(G² + ε1) instead of R, C.

Moments read: second = V̂ (or ``exp_avg_sq``), what the step takes the square root of and divides by. First:
none. ``exp_avg`` averages the clipped, lr-scaled, preconditioned *updates*, not the gradients: like
RMSprop's momentum buffer it is no gradient moment and has no lift through a LoRA partner.

Relative step, parameter scaling and update clipping change the update, not the moments. The shadow is an
Adafactor too and applies them itself; but ``scale_parameter`` makes ρ depend on RMS(W), and the decay of a
relative step is ``ρ·λ`` with no lr in the group, so then the shadow steps from the run's weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.optimization import Adafactor

from loft_probe.probe.layouts.base import Layout, Moments


class AdafactorLayout(Layout):
    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        state = optimizer.state.get(param) or {}
        if "exp_avg_sq_row" in state:
            return Moments(None, factored_second_moment(state["exp_avg_sq_row"], state["exp_avg_sq_col"]))
        if "exp_avg_sq" in state:
            return Moments(None, state["exp_avg_sq"])
        return None

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return bool(group["scale_parameter"]) or (bool(group["relative_step"]) and group["weight_decay"] != 0)

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        return group["weight_decay"]


def factored_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """``V̂ = R·Cᵀ / mean(R)`` (..., m, n) from R (..., m) and C (..., n): the reciprocal of what Adafactor's
    ``_approx_sq_grad`` multiplies G by, squared."""
    return row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(dim=-1, keepdim=True).unsqueeze(-1)


LAYOUTS = {Adafactor: AdafactorLayout()}
