"""How a probe reads an optimizer's moments: one small adapter per state layout.

- :class:`AdamLayout` — Adam, AdamW and any optimizer keeping ``exp_avg``/``exp_avg_sq`` per parameter.
  A dense weight's moments are full-space (m×n); a LoRA pair's live on the factors.
- :class:`LoFTLayout` — a pair's full-space moments are rebuilt from LoFT's factor-coordinate state
  (spec: docs/loft-spec.md); LoFT's other parameters follow the Adam layout.

An optimizer whose state has neither layout is probed for gradients and updates only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loft_probe.optim import LoFT
from loft_probe.probe import measure


@dataclass
class FullSpaceMoments:
    first: Tensor  # (m, n) first moment, in the weight's space
    second: Tensor  # (m, n) second moment
    project: Callable[[Tensor], Tensor] | None  # (m, n) → what the factor that moved can express; None: dense


class AdamLayout:
    """``state[p]["exp_avg"]``, ``state[p]["exp_avg_sq"]`` per parameter."""

    def known(self, optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
        state = optimizer.state.get(param, {})
        return "exp_avg" in state and "exp_avg_sq" in state

    def full_space(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], layer) -> FullSpaceMoments | None:
        """A dense layer's moments (m×n); a LoRA pair has none under Adam."""
        if layer.pair is not None or not self.known(optimizer, layer.param):
            return None
        state, dtype = optimizer.state[layer.param], layer.compute_dtype()
        return FullSpaceMoments(state["exp_avg"].to(dtype), state["exp_avg_sq"].to(dtype), None)

    def factor_cosine(self, optimizer: torch.optim.Optimizer, layer) -> dict[str, float]:
        """``cos_moment_grad`` over both factors of a LoRA pair, in factor space; {} when not defined."""
        factors = (layer.pair.B, layer.pair.A)
        if not all(self.known(optimizer, p) and p.grad is not None for p in factors):
            return {}
        moments = torch.cat([optimizer.state[p]["exp_avg"].float().flatten() for p in factors])
        grads = torch.cat([p.grad.float().flatten() for p in factors])
        return measure.moment_grad_metrics(moments, grads)


class LoFTLayout(AdamLayout):
    """LoFT's pair state, read through :meth:`LoFT.full_space_moments`; AdamW for the rest."""

    def known(self, optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
        return "exp_avg" in optimizer.state.get(param, {})

    def full_space(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], layer) -> FullSpaceMoments | None:
        """The moved factor's reconstructed moments after the step and the projection onto what it can express."""
        if layer.pair is None:
            return super().full_space(optimizer, group, layer)
        moments = optimizer.full_space_moments(group)
        if moments is None:
            return None
        return FullSpaceMoments(moments.first, moments.second, moments.project)

    def factor_cosine(self, optimizer: torch.optim.Optimizer, layer) -> dict[str, float]:
        return {}  # LoFT's factor-coordinate moments are not gradients' EMAs: use the full-space cosine


def layout_of(optimizer: torch.optim.Optimizer) -> AdamLayout:
    return LoFTLayout() if isinstance(optimizer, LoFT) else AdamLayout()
