"""LoFT: a pair's full-space moments are rebuilt from its factor-coordinate state (spec: docs/loft-spec.md);
every other parameter is stepped by AdamW and read like it. Its full-rank limit, and so its shadow, is AdamW."""

from __future__ import annotations

from typing import Any

import torch

from loft_probe.lora import LoraPair
from loft_probe.optim import LoFT
from loft_probe.probe.layouts.pairs import Side
from loft_probe.probe.layouts.torch_optim import AdamLayout


class LoFTLayout(AdamLayout):
    def pair_sides(self, optimizer: LoFT, group: dict[str, Any], pair: LoraPair,
                   dtype: torch.dtype) -> list[Side] | None:
        """The factor that moved at the last step: its reconstructed M and V (m×n), and the direction
        ``M/(sqrt(V) + ε)`` restricted to what that factor can express (the step LoFT applies)."""
        moments = optimizer.full_space_moments(group)
        if moments is None:
            return None
        first, second = moments.first.to(dtype), moments.second.to(dtype)
        direction = moments.project(first / (second.sqrt() + group["eps"]))
        return [Side(moments.side.lower(), first, second, direction, moments.project)]

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return False

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        return group.get("weight_decay", 0.0)

    def shadow_class(self, optimizer: torch.optim.Optimizer) -> type[torch.optim.Optimizer]:
        return torch.optim.AdamW
