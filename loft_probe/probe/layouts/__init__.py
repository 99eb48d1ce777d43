"""How a probe reads an optimizer's state: one small layout per optimizer class.

A layout names the state entries that are the first and second moments (:mod:`.torch_optim` for torch.optim,
:mod:`.loft` for LoFT), lifts a LoRA pair's factor moments into the weight's space (:mod:`.pairs`), and says
what a shadow of that optimizer needs (whether its step reads the weight, its decoupled weight decay, its class
at full rank). An optimizer without a layout is probed for gradients and updates only, with one warning;
:func:`register_layout` adds one.
"""

from loft_probe.optim import LoFT
from loft_probe.probe.layouts.base import Layout, Moments, NoLayout, layout_of, register_layout
from loft_probe.probe.layouts.loft import LoFTLayout
from loft_probe.probe.layouts.pairs import PairSubspaces, Side
from loft_probe.probe.layouts.torch_optim import TORCH_LAYOUTS

for _cls, _layout in {**TORCH_LAYOUTS, LoFT: LoFTLayout()}.items():
    register_layout(_cls, _layout)

__all__ = ["Layout", "Moments", "NoLayout", "PairSubspaces", "Side", "layout_of", "register_layout"]
