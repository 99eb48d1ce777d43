"""How a probe reads an optimizer's state: one small layout per optimizer class.

A layout names the state entries that are the first and second moments (:mod:`.torch_optim` for torch.optim,
:mod:`.loft` for LoFT), lifts a LoRA pair's factor moments into the weight's space (:mod:`.pairs`), and says
what a shadow of that optimizer needs (whether its step reads the weight, its decoupled weight decay, its class
at full rank). An optimizer without a layout is probed for gradients and updates only, with one warning;
:func:`register_layout` adds one.

Third-party optimizers (the ``optimizers`` extra) have one module each, imported on the first lookup of their
class (:func:`defer_layout`): transformers' Adafactor (:mod:`.adafactor`), schedule-free AdamW
(:mod:`.schedule_free`), GaLore AdamW (:mod:`.galore`), Lion (:mod:`.lion`). Importing loft_probe imports none
of those packages: a run that uses one has imported it already.

Beyond moments, a layout may map the run's group to its shadow's (:meth:`Layout.shadow_hyperparameters`: a
step counter kept in the group, GaLore's projection keys), say that its step overwrites ``p.grad``
(:attr:`Layout.overwrites_grad`), and record metrics of its own for a dense weight from before and after a
recorded step (:meth:`Layout.before_step`, :meth:`Layout.extra_values`: GaLore's refreshes).
"""

from loft_probe.optim import LoFT
from loft_probe.probe.layouts.base import Layout, Moments, NoLayout, defer_layout, layout_of, register_layout
from loft_probe.probe.layouts.loft import LoFTLayout
from loft_probe.probe.layouts.pairs import PairSubspaces, Side
from loft_probe.probe.layouts.torch_optim import TORCH_LAYOUTS

for _cls, _layout in {**TORCH_LAYOUTS, LoFT: LoFTLayout()}.items():
    register_layout(_cls, _layout)

for _class_path, _module in {
    "transformers.optimization.Adafactor": "adafactor",
    "schedulefree.adamw_schedulefree.AdamWScheduleFree": "schedule_free",
    "schedulefree.adamw_schedulefree_reference.AdamWScheduleFreeReference": "schedule_free",
    "galore_torch.adamw.AdamW": "galore",
    "lion_pytorch.lion_pytorch.Lion": "lion",
}.items():
    defer_layout(_class_path, f"loft_probe.probe.layouts.{_module}")

__all__ = ["Layout", "Moments", "NoLayout", "PairSubspaces", "Side", "defer_layout", "layout_of", "register_layout"]
