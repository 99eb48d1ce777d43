"""LoFT: a pair's full-space moments are rebuilt from its factor-coordinate state (spec: docs/loft-spec.md);
every other parameter is stepped by AdamW and read like it. Its full-rank limit, and so its shadow, is AdamW."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from loft_probe.lora import LoraPair
from loft_probe.metrics import preconditioned_direction
from loft_probe.optim import LoFT
from loft_probe.probe.layouts.base import Moments
from loft_probe.probe.layouts.pairs import Side, Subspace
from loft_probe.probe.layouts.torch_optim import AdamLayout

if TYPE_CHECKING:
    from loft_probe.probe.measure import Scratch


class LoFTLayout(AdamLayout):
    def moments(self, optimizer: LoFT, group: dict[str, Any], param: torch.Tensor) -> Moments | None:
        """AdamW's moments for a parameter of an AdamW group; none for a factor of a pair group, whose state is
        in frame coordinates (not an EMA of its gradients): read the pair through :meth:`pair_sides`."""
        return None if group.get("lora_scale") is not None else super().moments(optimizer, group, param)

    def pair_sides(self, optimizer: LoFT, group: dict[str, Any], pair: LoraPair, dtype: torch.dtype,
                   factors: tuple[torch.Tensor, torch.Tensor] | None = None, scratch: Scratch | None = None
                   ) -> list[Side] | None:
        """The factor that moved at the last step: its reconstructed M and V (m×n) and the direction
        ``M/(sqrt(V) + ε)``, whose restriction to what that factor can express is the step LoFT applies; in
        ``scratch``'s buffers when given. Read from ``optimizer.state``: a sharded pair's is the state the probe
        gathered whole (``factors`` is not needed: LoFT's state holds its frames)."""
        B, A = group["params"]
        states = (optimizer.state.get(B, {}), optimizer.state.get(A, {}))
        if "exp_avg" not in states[0]:
            return None
        state_dtype, device = states[0]["exp_avg"].dtype, states[0]["exp_avg"].device
        out = None if scratch is None else tuple(scratch.get(role, torch.Size((B.shape[0], A.shape[1])), state_dtype,
                                                             device) for role in ("side first", "side second"))
        moments = optimizer.full_space_moments(group, states, out=out)
        if moments is None:
            return None
        first, second = moments.first.to(dtype), moments.second.to(dtype)
        direction = preconditioned_direction(first, second, group["eps"],
                                             out=None if scratch is None else scratch.like("direction", first))
        subspace = Subspace(None, moments.basis) if moments.side == "B" else Subspace(moments.basis, None)
        # the projected update's moments are written in the subspace's own basis; the factor-space ablation's
        # in the raw partner's, which may reach beyond the directions the cutoff keeps
        return [Side(moments.side.lower(), first, second, direction, subspace, within=group["projected_update"])]

    def steps_taken(self, optimizer: LoFT) -> int | None:
        """Its steps plus the non-finite ones it skipped: each is a step of the record."""
        return (super().steps_taken(optimizer) or 0) + int(optimizer.param_groups[0].get("skipped_steps", 0))

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return False

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        return group.get("weight_decay", 0.0)

    def shadow_class(self, optimizer: torch.optim.Optimizer) -> type[torch.optim.Optimizer]:
        return torch.optim.AdamW
