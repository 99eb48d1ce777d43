"""GaLore AdamW (``galore_torch.GaLoreAdamW``, Zhao et al. 2024): Adam in a projector's r-dimensional space.

A weight in a group with a ``rank`` key has a ``GaLoreProjector`` in its state, ``state["projector"]``. At its
step number t (``state["step"]`` before the step) it projects G (m×n) with P = ``projector.ortho_matrix``::

    right (m ≥ n for proj_type "std"): P (r×n), g = G·Pᵀ (m×r), and back X ↦ X·P
    left  (m < n):                     P (m×r), g = Pᵀ·G (r×n), and back X ↦ P·X

and refreshes P (the top-r singular vectors of that G, an SVD in float32) when t is a multiple of
``update_proj_gap`` (so at steps 1, gap + 1, ... counted from 1). Adam's ``exp_avg``, ``exp_avg_sq`` are r-space;
the step is ``W ← W − lr_t·scale·back(m / (sqrt(v) + ε))``, then ``W ← W·(1 − lr·λ)`` (decay after the step).

Moments read: first = back(m) (m×n), the optimizer's own map back (``project_back``) without ``scale``; while
P stands still it is EMA(G) projected onto P's subspace. At a refresh the r coordinates of m are *not*
transported: they are read through the new P, which is where GaLore's moments go stale. The r-space elementwise
``v`` has no full-space image (as a LoRA factor's): no second moment. A weight without ``rank`` is plain AdamW
(this class's arithmetic: ε added to sqrt(v) before the bias correction) and is read as such.

Against the shadow (its first moment M projected onto P's subspace, ``M·Pᵀ·P`` or ``P·Pᵀ·M``): a projected
weight's ``shadow_m_proj_cosine`` and ``shadow_m_proj_rel_error``, as a LoRA factor's side. Until the first
refresh the two are equal (cosine 1); a refresh reads the old coordinates through the new P, which pulls the
moment off the shadow's, and it returns towards it as β1^(steps since the refresh) decays.

Refreshes (metrics, dense weights in a ``rank`` group): ``galore_refresh_age`` at every recorded step, and at
a recorded refresh step the alignment of the moment with that step's G just before the refresh
(``galore_cos_before_refresh``: the moment of the previous step read through the outgoing P) and just after
(``galore_cos_after_refresh``). To see every refresh, record the steps ``k·update_proj_gap + 1``.

The shadow is this class at full rank: the group without GaLore's keys, i.e. the AdamW GaLore applies to every
weight it does not project. (torch's AdamW would differ from it: ε enters after the bias correction there.)
"""

from __future__ import annotations

from typing import Any

import torch
from galore_torch import GaLoreAdamW
from torch import Tensor

from loft_probe import metrics
from loft_probe.probe.layouts.base import Moments
from loft_probe.probe.layouts.pairs import Side, Subspace
from loft_probe.probe.layouts.torch_optim import AdamLayout

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


class GaLoreLayout(AdamLayout):
    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        state = optimizer.state.get(param) or {}
        if "exp_avg" not in state:
            return None
        if "projector" not in state:
            return Moments(state["exp_avg"], state["exp_avg_sq"])
        return Moments(lift(state["projector"], state["exp_avg"]), None)

    def weight_sides(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor,
                     dtype: torch.dtype) -> list[Side] | None:
        """A projected weight's lifted first moment, against the shadow's projected onto P's subspace."""
        state = optimizer.state.get(param) or {}
        projector = state.get("projector")
        if projector is None or "exp_avg" not in state:
            return None
        return [Side(None, lift(projector, state["exp_avg"]).to(dtype), None, None,
                     subspace(projector.ortho_matrix, param.shape), within=False)]  # P is float32: formed

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return False  # decay after the step is λ·lr·(W − step): a zero weight's step carries the −step part

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        return group["weight_decay"] if group["weight_decay"] > 0 else 0.0  # it decays only for λ > 0

    def shadow_hyperparameters(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any]:
        hyper = super().shadow_hyperparameters(optimizer, group)
        hyper = {key: value for key, value in hyper.items() if key not in GALORE_KEYS}
        return {**hyper, "no_deprecation_warning": True}  # a constructor switch; the step ignores it

    def before_step(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Tensor | None:
        """Before a step that refreshes P: the moment read through the outgoing P (m×n); else None."""
        state = optimizer.state.get(param) or {}
        projector = state.get("projector")
        if projector is None or "exp_avg" not in state or state["step"] % projector.update_proj_gap != 0:
            return None
        return lift(projector, state["exp_avg"])

    def extra_values(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor,
                     grad: Tensor | None, before: Tensor | None) -> dict[str, Tensor | float]:
        state = optimizer.state.get(param) or {}
        projector = state.get("projector")
        if projector is None or "exp_avg" not in state:
            return {}
        age = (state["step"] - 1) % projector.update_proj_gap  # the step just taken projected at step − 1
        out: dict[str, Tensor | float] = {"galore_refresh_age": float(age)}
        if age == 0 and grad is not None:
            out["galore_cos_after_refresh"] = metrics.cosine(lift(projector, state["exp_avg"]), grad)
            if before is not None:
                out["galore_cos_before_refresh"] = metrics.cosine(before, grad)
        return out


def lift(projector: Any, X: Tensor) -> Tensor:
    """An r-space tensor (m×r or r×n) in the weight's space (m×n), through the projector's current P: its
    own ``project_back`` without the ``scale`` that multiplies the step."""
    return projector.project_back(X) / projector.scale


def subspace(P: Tensor | list[Tensor], shape: torch.Size) -> Subspace:
    """The subspace GaLore steps an m×n weight in (``shape``): ``X·Pᵀ·P`` for a right projector P (r×n), ``P·Pᵀ·X``
    for a left one (m×r), both for proj_type "full" ([left, right]). (A square P is orthogonal: either is X.)"""
    if isinstance(P, (list, tuple)):
        return Subspace(P[0], P[1].mT)
    if P.shape[1] == shape[1] and P.shape[0] != shape[0]:
        return Subspace(None, P.mT)
    return Subspace(P, None)


LAYOUTS = {GaLoreAdamW: GaLoreLayout()}
