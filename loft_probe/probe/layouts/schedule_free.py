"""Schedule-free AdamW (``schedulefree.AdamWScheduleFree`` and its ``…Reference``, Defazio et al. 2024).

Three sequences per weight, step k (from 0), c = w_k / Σ_{i≤k} w_i the averaging weight kept in the group
(``k``, ``weight_sum``, ``lr_max``)::

    v ← β2·v + (1 − β2)·g²                                     ``exp_avg_sq``
    ĝ = g / (sqrt(v / (1 − β2^(k+1))) + ε) + λ·y               the decay is taken at y
    z ← z − lr·ĝ                                               ``z``, the base (SGD-like) sequence
    x ← (1 − c)·x + c·z                                        the average, evaluated at ``eval()``
    y = (1 − β1)·z + β1·x                                      where the gradient is taken

In train mode the parameter holds y (``AdamWScheduleFree`` keeps z and derives x; ``…Reference`` keeps x, y, z),
so the probe's updates, weights and spectra are those of y, the point the gradients are taken at; the shadow
too steps y (its own z and x from its first step). Moments: second = ``exp_avg_sq`` (not bias-corrected, like
torch Adam's); no first moment: β1 interpolates the sequences, no EMA of gradients exists, and x − z sums
preconditioned steps. The step reads the weight (y moves towards z), so the shadow steps from the run's y.

``AdamWScheduleFree`` normalises ``p.grad`` in place (ĝ replaces g): the probe keeps the gradients from before
the step (one copy of each probed G per step) and feeds the shadow a copy.
"""

from __future__ import annotations

from typing import Any

import torch
from schedulefree import AdamWScheduleFree, AdamWScheduleFreeReference

from loft_probe.probe.layouts.base import Layout

RUN_STATE = ("k", "weight_sum", "lr_max", "scheduled_lr")  # the run's step counter and averaging weights


class ScheduleFreeLayout(Layout):
    second_key = "exp_avg_sq"

    def __init__(self, overwrites_grad: bool) -> None:
        self.overwrites_grad = overwrites_grad

    def steps_taken(self, optimizer: torch.optim.Optimizer) -> int | None:
        return int(optimizer.param_groups[0]["k"])  # its step counter lives in the group, not the state

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return True

    def shadow_hyperparameters(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any]:
        """The group less the run's averaging state: the shadow, stepped once per run step, keeps its own
        (fed after the run's step, the run's ``k`` is already the next one's)."""
        hyper = super().shadow_hyperparameters(optimizer, group)
        return {key: value for key, value in hyper.items() if key not in RUN_STATE}


LAYOUTS = {AdamWScheduleFree: ScheduleFreeLayout(overwrites_grad=True),
           AdamWScheduleFreeReference: ScheduleFreeLayout(overwrites_grad=False)}
