"""Lion (``lion_pytorch.Lion``, Chen et al. 2023): one state entry, ``exp_avg``.

Its step, for gradient g (param-shaped) and state m::

    W ← W·(1 − lr·λ)                          decoupled decay, before the step
    W ← W − lr·sign(β1·m + (1 − β1)·g)        the update: an interpolation, not m itself
    m ← β2·m + (1 − β2)·g                     the state, updated after the step with β2

so ``exp_avg`` is a running first moment of the gradients (linear in them: a LoRA factor's lifts like Adam's),
and there is no second moment: the sign is the whole preconditioner. The step reads the weight only through
its decay. With ``decoupled_weight_decay=True`` Lion divides λ by the lr it was built with; that λ is what the
shadow, a plain Lion, is given.
"""

from __future__ import annotations

from typing import Any

import torch
from lion_pytorch import Lion

from loft_probe.probe.layouts.base import Layout


class LionLayout(Layout):
    first_key = "exp_avg"

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return False

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        return group["weight_decay"]

    def shadow_hyperparameters(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any]:
        hyper = super().shadow_hyperparameters(optimizer, group)
        # lion-pytorch keeps the switch and the lr it was built with on the optimizer, not in the group
        if getattr(optimizer, "decoupled_wd", False):  # λ = weight_decay / (the lr Lion was built with)
            hyper["weight_decay"] = group["weight_decay"] / optimizer._init_lr
        return hyper


LAYOUTS = {Lion: LionLayout()}
