"""Shadow AdamW: what full fine-tuning would do from the current point of a LoRA or LoFT run."""

from __future__ import annotations

import torch
from torch import Tensor

from loft_probe.optim import functional as F


class ShadowAdamW:
    """An AdamW state for one m×n weight, fed the layer's true gradient G at every optimizer step.

    ``update(W)`` is the step ``torch.optim.AdamW`` would take from ``W`` with these moments; the
    run's lr, betas, eps and weight decay are passed per step (schedulers change lr). Moments may be stored
    in bfloat16 to halve the memory (2·m·n numbers); arithmetic is float32 then, or float64 for float64 G.
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 storage_dtype: torch.dtype | None = None) -> None:
        storage = storage_dtype or dtype
        self.compute_dtype = torch.promote_types(dtype, storage)  # float64 storage computes in float64
        self.exp_avg = torch.zeros(shape, dtype=storage, device=device)  # (m, n)
        self.exp_avg_sq = torch.zeros(shape, dtype=storage, device=device)  # (m, n)
        self.step = 0

    def feed(self, grad: Tensor, beta1: float, beta2: float) -> None:
        """One step's gradient (m×n) into the moments."""
        self.step += 1
        m, v = self.moments()
        F.adam_moments_(grad.to(self.compute_dtype), m, v, beta1, beta2)
        if m is not self.exp_avg:  # low-precision storage: computed in float32, stored back
            self.exp_avg.copy_(m)
            self.exp_avg_sq.copy_(v)

    def moments(self) -> tuple[Tensor, Tensor]:
        """The first and second moments in the compute dtype (views when no conversion is needed)."""
        return self.exp_avg.to(self.compute_dtype), self.exp_avg_sq.to(self.compute_dtype)

    def update(self, weight: Tensor, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> Tensor:
        """AdamW's step from ``weight`` (m×n): ``−lr·m̂/(sqrt(v̂) + ε) − lr·λ·weight``, a new tensor.

        The moment part is AdamW's own formula moving a zero weight, so no large weight cancels out of it.
        """
        m, v = self.moments()
        step = F.adamw_move_(torch.zeros_like(m), m, v, max(self.step, 1), lr, beta1, beta2, eps, 0.0)
        return step.sub_(weight.to(self.compute_dtype), alpha=lr * weight_decay)
