"""The shadow: what full fine-tuning with the run's own optimizer would do from the run's current point.

A shadow is one m×n weight's optimizer state, fed the layer's true gradient G at every optimizer step with the
run's hyperparameters of that step (schedulers change lr, betas, momentum). Its class is the run's optimizer at
full rank (:meth:`Layout.shadow_class`: AdamW for LoFT and AdamW runs, the user's class otherwise):

- :class:`ShadowAdamW` — AdamW's arithmetic written out (LoFT's functional core), so the moments may be stored
  in bfloat16 and the step is read off a zero weight;
- :class:`ShadowOptimizer` — any other class: a private instance of it stepping one private tensor, built from
  the class and the group's hyperparameters (never a copy of the user's optimizer, which holds the model).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from loft_probe.optim import functional as F
from loft_probe.probe.layouts import Layout, Moments


class ShadowAdamW:
    """AdamW's state for one m×n weight.

    Moments may be stored in bfloat16 to halve the memory (2·m·n numbers); arithmetic is float32 then, or
    float64 for float64 G. The step at a fed weight is AdamW's formula moving a zero weight, minus the decoupled
    decay ``lr·λ·W``, so no large weight cancels out of it.
    """

    needs_weight = False  # AdamW's moments never read the weight

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 storage_dtype: torch.dtype | None = None) -> None:
        storage = storage_dtype or dtype
        self.compute_dtype = torch.promote_types(dtype, storage)  # float64 storage computes in float64
        self.exp_avg = torch.zeros(shape, dtype=storage, device=device)  # (m, n)
        self.exp_avg_sq = torch.zeros(shape, dtype=storage, device=device)  # (m, n)
        self.step = 0
        self.last_update: Tensor | None = None

    def feed(self, grad: Tensor, group: dict[str, Any], weight: Callable[[], Tensor] | None) -> None:
        """One step's gradient G (m×n) into the moments; with ``weight`` (forms W before the step, m×n: called
        only for a decay term) the step AdamW takes from it is kept as :attr:`last_update`."""
        self.step += 1
        beta1, beta2 = group["betas"]
        m, v = self._compute_moments()
        F.adam_moments_(grad.to(self.compute_dtype), m, v, beta1, beta2)
        if m is not self.exp_avg:  # low-precision storage: computed in float32, stored back
            self.exp_avg.copy_(m)
            self.exp_avg_sq.copy_(v)
        self.last_update = None
        if weight is not None:
            step = F.adamw_move_(torch.zeros_like(m), m, v, self.step, group["lr"], beta1, beta2, group["eps"], 0.0)
            decay = group["lr"] * group.get("weight_decay", 0.0)
            self.last_update = step.sub_(weight().to(self.compute_dtype), alpha=decay) if decay else step

    def _compute_moments(self) -> tuple[Tensor, Tensor]:
        return self.exp_avg.to(self.compute_dtype), self.exp_avg_sq.to(self.compute_dtype)

    def moments(self) -> Moments:
        """The first and second moments (m×n each) in the compute dtype."""
        return Moments(*self._compute_moments())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])


class ShadowOptimizer:
    """A private instance of the run's optimizer class stepping one m×n tensor with the true gradient.

    When the class's step does not read the weight (:meth:`Layout.reads_weight`), the tensor is zeroed before
    each step and the update read off it exactly, plus the decoupled decay; otherwise it is set to the run's
    weight before every step (the probe then keeps W from before each step, one m×n copy).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layout: Layout, group: dict[str, Any],
                 shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.param = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)  # (m, n)
        # the run's group as this class takes it (Layout.shadow_hyperparameters), before every step
        self.hyperparameters = functools.partial(layout.shadow_hyperparameters, optimizer)
        hyper = self.hyperparameters(group)
        cls = layout.shadow_class(optimizer)
        accepted = inspect.signature(cls.__init__).parameters
        self.optimizer = cls([{"params": [self.param], **hyper}], **{k: v for k, v in hyper.items() if k in accepted})
        self.step = 0
        self.last_update: Tensor | None = None

    @property
    def group(self) -> dict[str, Any]:
        return self.optimizer.param_groups[0]

    @property
    def needs_weight(self) -> bool:
        return self.layout.reads_weight(self.group)

    def feed(self, grad: Tensor, group: dict[str, Any], weight: Callable[[], Tensor] | None) -> None:
        """One step with G (m×n) and the run's hyperparameters of this step; ``weight``: forms W before the step
        (m×n), required when :attr:`needs_weight`, and then or otherwise the step's update is kept as
        :attr:`last_update`."""
        self.group.update(self.hyperparameters(group))
        reads, decay = self.needs_weight, self.layout.decoupled_decay(self.group)
        if reads and weight is None:
            raise ValueError("this shadow's optimizer reads the weight: feed it W before every step")
        W = weight() if weight is not None and (reads or decay) else None  # formed only where it enters
        with torch.no_grad():
            if reads:
                self.param.copy_(W)
            else:
                self.param.zero_()
        # a step that overwrites p.grad must not overwrite the caller's G
        self.param.grad = grad.to(self.param.dtype, copy=self.layout.overwrites_grad)
        self.optimizer.step()
        self.param.grad = None
        self.step += 1
        self.last_update = None
        if weight is not None:
            update = self.param.detach() - W if reads else self.param.detach().clone()
            self.last_update = update if reads or not decay else update.sub_(W, alpha=self.group["lr"] * decay)

    def moments(self) -> Moments:
        return self.layout.moments(self.optimizer, self.group, self.param) or Moments(None, None)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])


Shadow = ShadowAdamW | ShadowOptimizer


def make_shadow(optimizer: torch.optim.Optimizer, layout: Layout, group: dict[str, Any], shape: tuple[int, int],
                dtype: torch.dtype, device: torch.device, storage_dtype: torch.dtype | None) -> Shadow:
    """The shadow of one m×n weight of a run with ``optimizer`` (its layer's ``group``); see the module docstring.
    ``storage_dtype`` (bfloat16 to halve the memory) stores AdamW's moments, or is the dtype another class
    steps in."""
    cls = layout.shadow_class(optimizer)
    if cls is torch.optim.AdamW and not group.get("amsgrad") and not group.get("maximize"):
        return ShadowAdamW(shape, dtype, device, storage_dtype)
    return ShadowOptimizer(optimizer, layout, group, shape, storage_dtype or dtype, device)
