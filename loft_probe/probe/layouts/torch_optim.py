"""torch.optim's optimizers: which state entry is which moment.

=============  ==========================  =======================================
optimizer      first moment                second moment
=============  ==========================  =======================================
SGD            ``momentum_buffer``         —
Adam, AdamW    ``exp_avg``                 ``exp_avg_sq`` (AMSGrad: ``max_exp_avg_sq``)
NAdam, RAdam   ``exp_avg``                 ``exp_avg_sq``
Adamax         ``exp_avg``                 ``exp_inf²`` (it divides by ``exp_inf``)
Adagrad        —                           ``sum``
RMSprop        ``grad_avg`` (centered)     ``square_avg`` (centered: ``− grad_avg²``)
=============  ==========================  =======================================

SGD's buffer is ``μ·buf + (1 − dampening)·g``: a (damped) sum of gradients, so a LoRA factor's lifts like
Adam's. RMSprop's momentum buffer sums *preconditioned* gradients and is not a gradient moment; uncentered
RMSprop keeps no first moment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loft_probe.probe.layouts.base import Layout, Moments


class SGDLayout(Layout):
    first_key = "momentum_buffer"

    def steps_taken(self, optimizer: torch.optim.Optimizer) -> int | None:
        return None  # no step count, and plain SGD keeps no state at all: a fresh one looks like a resumed one


class AdamLayout(Layout):
    """Adam, AdamW (torch's AdamW is Adam with ``decoupled_weight_decay=True``), NAdam, RAdam."""

    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        state = optimizer.state.get(param) or {}
        if "exp_avg" not in state:
            return None
        return Moments(state["exp_avg"], state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"])

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return group.get("weight_decay", 0.0) != 0.0 and not group.get("decoupled_weight_decay", False)

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        return group.get("weight_decay", 0.0) if group.get("decoupled_weight_decay", False) else 0.0


class AdamaxLayout(Layout):
    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        state = optimizer.state.get(param) or {}
        if "exp_avg" not in state:
            return None
        return Moments(state["exp_avg"], state["exp_inf"].square())


class AdagradLayout(Layout):
    second_key = "sum"


class RMSpropLayout(Layout):
    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        state = optimizer.state.get(param) or {}
        if "square_avg" not in state:
            return None
        if group.get("centered"):
            return Moments(state["grad_avg"], state["square_avg"] - state["grad_avg"].square())
        return Moments(None, state["square_avg"])


TORCH_LAYOUTS: dict[type, Layout] = {
    torch.optim.SGD: SGDLayout(), torch.optim.Adam: AdamLayout(), torch.optim.AdamW: AdamLayout(),
    torch.optim.NAdam: AdamLayout(), torch.optim.RAdam: AdamLayout(),
    torch.optim.Adamax: AdamaxLayout(), torch.optim.Adagrad: AdagradLayout(), torch.optim.RMSprop: RMSpropLayout(),
}
