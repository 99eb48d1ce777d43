"""What every state layout answers, and the registry that picks one per optimizer class."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from loft_probe.lora import LoraPair
from loft_probe.probe.layouts.pairs import Side, lift_factor_state

if TYPE_CHECKING:
    from loft_probe.probe.measure import Scratch


@dataclass(frozen=True)
class Moments:
    """An optimizer's state for one tensor, in that tensor's own shape (m×n for a weight, m×r / r×n for a
    LoRA factor). Either may be None: the optimizer keeps no such moment.

    first: the gradient's running first moment (Adam's ``exp_avg``, SGD's momentum buffer): linear in the
        gradients, so a LoRA factor's can be lifted to the weight's space.
    second: what the optimizer takes the square root of and divides by (Adam's ``exp_avg_sq``, Adagrad's sum).
    """

    first: Tensor | None
    second: Tensor | None


class Layout:
    """How one optimizer class keeps its per-parameter state; subclasses name the state keys and say what their
    optimizer's step does with them. Register one for another optimizer with :func:`register_layout`."""

    first_key: str | None = None
    second_key: str | None = None
    # The step overwrites p.grad (schedule-free AdamW normalises it in place): the probe then keeps the
    # gradients from before the step, and a shadow steps a copy of G.
    overwrites_grad: bool = False

    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        """The parameter's moments, param-shaped; None before the optimizer holds any state for it."""
        state = optimizer.state.get(param) or {}
        first = state.get(self.first_key) if self.first_key else None
        second = state.get(self.second_key) if self.second_key else None
        if first is None and second is None:
            return None
        return Moments(first, second)

    def steps_taken(self, optimizer: torch.optim.Optimizer) -> int | None:
        """How many steps the optimizer has taken, read from its state (0 before the first); None when its state
        keeps no step count (SGD's momentum buffer, Lion's ``exp_avg``): a resumed probe cannot tell then."""
        steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
        return max(steps) if steps else (0 if not optimizer.state else None)

    def pair_sides(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], pair: LoraPair,
                   dtype: torch.dtype, factors: tuple[Tensor, Tensor] | None = None,
                   scratch: Scratch | None = None) -> list[Side] | None:
        """A LoRA pair's state in the weight's space, one :class:`Side` per factor the optimizer holds a first
        moment for (a frozen factor has none): the factor's own moments lifted through its partner; None
        when neither has one. ``factors``: (B (m×r), A (r×n)) to lift through, default the pair's own (an
        FSDP2-sharded pair's are given gathered whole). ``scratch``: work buffers of the recorded step, for a
        layout that forms m×n temporaries (LoFT's); a lift keeps its own, alive together."""
        moments = [self.moments(optimizer, group, p) for p in (pair.B, pair.A)]
        first = [m.first.to(dtype) if m is not None and m.first is not None else None for m in moments]
        second = [m.second.to(dtype) if m is not None and m.second is not None and "eps" in group else None
                  for m in moments]
        if first == [None, None]:
            return None
        B, A = factors or (pair.B.detach(), pair.A.detach())
        return lift_factor_state(B.to(dtype), A.to(dtype), pair.scale, first, second, group.get("eps", 0.0))

    def weight_sides(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor,
                     dtype: torch.dtype) -> list[Side] | None:
        """A dense weight stepped within a subspace (GaLore's projector): its state there as one unnamed
        :class:`Side`, compared with the shadow projected onto the same subspace; None (default): it steps in
        the whole space."""
        return None

    def reads_weight(self, group: dict[str, Any]) -> bool:
        """Whether a step's update (not only its weight decay) depends on the weight itself. When it does not,
        a shadow can step a zero weight and read the update off without a large weight cancelling out of it."""
        return group.get("weight_decay", 0.0) != 0.0

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        """λ of a decoupled weight decay ``W ← W − lr·λ·W`` (AdamW's), which a shadow adds to its zero-weight
        step; 0 when decay, if any, enters through the gradient (and :meth:`reads_weight` says so)."""
        return 0.0

    def shadow_class(self, optimizer: torch.optim.Optimizer) -> type[torch.optim.Optimizer]:
        """The optimizer that, stepping the full weight with the true gradient, is what full fine-tuning with
        this run's optimizer would do: the same class, unless the optimizer is a low-rank method (LoFT: AdamW)."""
        return type(optimizer)

    def shadow_hyperparameters(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any]:
        """The run's group as the shadow's private optimizer of :meth:`shadow_class` takes it, at construction
        and before each step: every entry but the parameters. A layout drops what is the run's own state rather
        than a hyperparameter (a step counter kept in the group) or what makes its class low-rank."""
        return {key: value for key, value in group.items() if key != "params"}

    def before_step(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Any:
        """What :meth:`extra_values` needs from before a recorded step of a dense weight (default: nothing)."""
        return None

    def extra_values(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor,
                     grad: Tensor | None, before: Any) -> dict[str, Tensor | float]:
        """Metrics of this optimizer alone for a dense weight after a recorded step (names in
        :data:`loft_probe.run.METRICS`; NaN: undefined, left out): ``grad`` is the step's G (m×n, None when not
        captured), ``before`` what :meth:`before_step` returned at this step (None: not called). Default: none."""
        return {}


class NoLayout(Layout):
    """An optimizer without a registered layout: gradients and updates are probed, moments are not."""

    def moments(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> Moments | None:
        return None

    def reads_weight(self, group: dict[str, Any]) -> bool:
        return True  # unknown arithmetic: a shadow steps from the weight itself


_REGISTRY: dict[type, Layout] = {}
_DEFERRED: dict[str, str] = {}  # "module.QualName" of an optimizer class → the module holding its layout


def defer_layout(class_path: str, module: str) -> None:
    """Names the module whose ``LAYOUTS`` ({optimizer class: layout}) describe a class called ``class_path``
    ("package.module.QualName"): it is imported the first time :func:`layout_of` meets that class, so a
    third-party optimizer's package is imported only by a run that already uses it, and loft_probe needs none.
    A layout given to :func:`register_layout` first is kept."""
    _DEFERRED[class_path] = module


def register_layout(optimizer_type: type, layout: Layout) -> None:
    """Tells the probe how ``optimizer_type`` (and its subclasses without a layout of their own) keeps its state."""
    if not (isinstance(optimizer_type, type) and issubclass(optimizer_type, torch.optim.Optimizer)):
        raise ValueError(f"register_layout needs a torch.optim.Optimizer subclass, got {optimizer_type!r}")
    if not isinstance(layout, Layout):
        raise ValueError(f"register_layout needs a loft_probe.probe.Layout, got {type(layout).__name__}")
    _REGISTRY[optimizer_type] = layout


def layout_of(optimizer: torch.optim.Optimizer | type) -> Layout:
    """The layout registered for the optimizer's class or its nearest registered base class; :class:`NoLayout`
    for an unknown optimizer."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for base in cls.__mro__:
        module = _DEFERRED.pop(f"{base.__module__}.{base.__qualname__}", None)
        if module is not None:
            for deferred_type, layout in importlib.import_module(module).LAYOUTS.items():
                _REGISTRY.setdefault(deferred_type, layout)
        if base in _REGISTRY:
            return _REGISTRY[base]
    return NoLayout()
