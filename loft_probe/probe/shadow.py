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
from loft_probe.probe.measure import Scratch


class ShadowAdamW:
    """AdamW's state for one m×n weight.

    Moments in the compute dtype are stored divided by a scale, the product of their betas since the last fold
    (``m = scale·exp_avg``, :func:`~loft_probe.optim.functional.scaled_ema_`): a step adds the new gradient term,
    one pass per moment, and decays nothing. :meth:`moments` and :meth:`state_dict` fold the scales back in
    first, so what they hand out are the moments themselves. Moments may be stored in bfloat16 to halve the
    memory (2·m·n numbers); they are then stored as themselves, updated in float32 (float64 for float64 G) and
    rounded once per step: a scaled moment only grows, and its increment, ~(1 − β2) of it, is under bfloat16's
    half ulp (2⁻⁹), so rounding would drop it at every step and the moment would decay away. The step at a fed
    weight is AdamW's formula moving a zero weight, minus the decoupled decay ``lr·λ·W``, so no large weight
    cancels out of it.
    """

    needs_weight = False  # AdamW's moments never read the weight

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 storage_dtype: torch.dtype | None = None) -> None:
        storage = storage_dtype or dtype
        self.compute_dtype = torch.promote_types(dtype, storage)  # float64 storage computes in float64
        self.exp_avg = torch.zeros(shape, dtype=storage, device=device)  # (m, n): the first moment / scales[0]
        self.exp_avg_sq = torch.zeros(shape, dtype=storage, device=device)  # (m, n): the second / scales[1]
        self.scales = (1.0, 1.0)  # stay 1 for a lower-precision storage
        self.step = 0
        self.last_update: Tensor | None = None

    def feed(self, grad: Tensor, group: dict[str, Any], weight: Callable[[], Tensor] | None,
             scratch: Scratch | None = None) -> None:
        """One step's gradient G (m×n) into the moments; with ``weight`` (forms W before the step, m×n: called
        only for a decay term) the step AdamW takes from it is kept as :attr:`last_update`, in ``scratch``'s
        buffers when given (valid until the next layer uses them)."""
        self.step += 1
        beta1, beta2 = group["betas"]
        grad = grad.to(self.compute_dtype)
        if self.exp_avg.dtype == self.compute_dtype:
            self.scales = (F.scaled_ema_(self.exp_avg, self.scales[0], beta1, grad),
                           F.scaled_ema_(self.exp_avg_sq, self.scales[1], beta2, grad, grad))
            moments = self.moments() if weight is not None else None
        else:  # lower precision: computed in float32 work buffers, rounded into the storage
            moments = self.moments(scratch)
            F.adam_moments_(grad, moments.first, moments.second, beta1, beta2)
            self.exp_avg.copy_(moments.first)
            self.exp_avg_sq.copy_(moments.second)
        self.last_update = None if weight is None else self._update(moments, group, weight, scratch)

    def _update(self, moments: Moments, group: dict[str, Any], weight: Callable[[], Tensor],
                scratch: Scratch | None) -> Tensor:
        """AdamW's step (m×n) from these moments at this step: its move of a zero weight, minus ``lr·λ·W``."""
        m, v = moments.first, moments.second
        step = F.adamw_move_(_buffer(scratch, "shadow update", m).zero_(), m, v, self.step, group["lr"],
                             *group["betas"], group["eps"], 0.0, denominator=_buffer(scratch, "shadow denominator", v))
        decay = group["lr"] * group.get("weight_decay", 0.0)
        return step.sub_(weight().to(self.compute_dtype), alpha=decay) if decay else step

    def _fold(self) -> None:
        """The scales folded into the stored moments (one pass each, where a scale is not 1)."""
        for state, scale in zip((self.exp_avg, self.exp_avg_sq), self.scales, strict=True):
            if scale != 1.0:
                state.mul_(scale)
        self.scales = (1.0, 1.0)

    def moments(self, scratch: Scratch | None = None) -> Moments:
        """The first and second moments (m×n each) in the compute dtype: the stored ones, or (bfloat16 storage)
        their float32 copies, in ``scratch``'s buffers when given."""
        self._fold()
        return Moments(*(x if x.dtype == self.compute_dtype else
                         _buffer(scratch, role, x, self.compute_dtype).copy_(x)
                         for x, role in ((self.exp_avg, "shadow m"), (self.exp_avg_sq, "shadow v"))))

    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {"step": self.step, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.scales = (1.0, 1.0)


def _buffer(scratch: Scratch | None, role: str, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised tensor of x's shape (and ``dtype``, default x's): ``scratch``'s buffer of ``role``, or
    new memory without one."""
    if scratch is None:
        return torch.empty_like(x, dtype=dtype)
    return scratch.get(role, x.shape, dtype or x.dtype, x.device)


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

    def feed(self, grad: Tensor, group: dict[str, Any], weight: Callable[[], Tensor] | None,
             scratch: Scratch | None = None) -> None:
        """One step with G (m×n) and the run's hyperparameters of this step; ``weight``: forms W before the step
        (m×n), required when :attr:`needs_weight`, and then or otherwise the step's update is kept as
        :attr:`last_update` (in ``scratch``'s buffer when given)."""
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
            param = self.param.detach()
            if reads:
                self.last_update = torch.sub(param, W, out=_buffer(scratch, "shadow update", param,
                                                                   torch.result_type(param, W)))
            else:
                update = _buffer(scratch, "shadow update", param).copy_(param)
                self.last_update = update.sub_(W, alpha=self.group["lr"] * decay) if decay else update

    def moments(self, scratch: Scratch | None = None) -> Moments:
        """The optimizer's own moments (read in place: ``scratch`` is not needed)."""
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
