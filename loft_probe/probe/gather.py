"""FSDP2 (``fully_shard``, 1-D mesh): what the probe gathers so that rank 0 measures a sharded LoRA pair as one
process measures the unsharded one.

Rank 0 alone measures and writes; it measures plain tensors only, never a DTensor (a DTensor's reduction is a
collective that the other ranks, not measuring, would never join). So every rank gathers, in the hooks and
outside rank 0's guarded measuring, at the same steps (the schedule is the same on every rank), and rank 0
keeps what it measures:

- at attach: the frozen W_0 (m×n, once; rank 0 keeps it, the others drop it after ‖W_0‖) and the factors;
- before a recorded step (and every step when the shadow's optimizer reads the weight): B (m×r) and A (r×n);
- after a recorded or snapshot step: the factors again; after a recorded one also their gradients and the
  optimizer's state of B and A (LoFT's factor-coordinate state: (m+n)·(2r + width) numbers, width = r(r+1)/2
  for its full second moment; AdamW's: 2·(m+n)·r), from which rank 0 rebuilds the full-space moments;
- at close: the factors, for the last snapshot.

Per pair and recorded step that is O((m+n)·r) numbers (O((m+n)·r²) for LoFT's full second moment), never an
m×n matrix gathered after attach. G is not gathered: each rank captures it from its own batch and the probe
all-reduces it (the mean: one m×n all-reduce per step it is needed, as under DDP). Rank 0 holds each probed
pair's W_0 (m·n numbers) and, with ``shadow=True``, its shadow (2·m·n for AdamW): the probed layers unsharded,
which must fit rank 0. That is the price of the simple choice (one process measures, the single-process
metrics code unchanged); a shadow sharded like the weights would need every metric as sums of per-rank partial
products, and an SVD of a sharded matrix for snapshots.

Refused, with one line: DeepSpeed ZeRO-3 partitioned parameters, dense sharded weights (full fine-tuning under
FSDP2: their m×n weights, gradients and moments would all cross ranks), FSDP1 flat parameters, pair layouts LoFT
does not step (:func:`pair_shards`), and optimizers whose step overwrites ``p.grad`` (schedule-free AdamW).
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from loft_probe.optim.loft import is_sharded
from loft_probe.optim.sharding import is_dtensor, pair_shards, whole

if TYPE_CHECKING:
    from loft_probe.probe.layers import ProbedLayer
    from loft_probe.probe.layouts import Layout


@dataclass
class Whole:
    """A sharded pair's tensors gathered whole (plain tensors), as rank 0 measures them."""

    base: Tensor | None  # W_0 (m, n) in the model's dtype; rank 0 only, kept from attach on
    factors: tuple[Tensor, Tensor] | None = None  # (B (m, r), A (r, n)) of the last gather of this step
    grads: tuple[Tensor | None, Tensor | None] | None = None  # (B.grad, A.grad) after a recorded step
    state: dict[Tensor, dict[str, Any]] | None = None  # {B: its state, A: its state} after a recorded step

    def clear(self) -> None:
        """Drops this step's gathers (W_0 stays)."""
        self.factors = self.grads = self.state = None


def check(layers: list[ProbedLayer], layout: Layout) -> None:
    """``ValueError`` (one line, what is supported) for sharded layers the probe cannot measure."""
    for layer in layers:
        if any(hasattr(p, "ds_id") for p in layer.params):  # ZeRO-3 empties a partitioned parameter and tags it
            raise ValueError(f"layer {layer.name!r}: DeepSpeed ZeRO partitioned parameters are not supported; the "
                             "probe supports one process, DDP and FSDP2 (fully_shard) LoRA pairs")
        sharded = [p for p in layer.params if is_sharded(p)]
        if not sharded:
            continue
        if not all(is_dtensor(p) for p in sharded):
            raise ValueError(f"layer {layer.name!r}: the probe supports FSDP2 (fully_shard) DTensors, not FSDP1's "
                             "flat parameters; use fully_shard or DDP")
        if layer.pair is None:
            raise ValueError(f"layer {layer.name!r}: the probe measures FSDP2-sharded LoRA pairs, not sharded dense "
                             "weights (full fine-tuning); probe it under DDP or in one process")
        pair_shards(layer.pair.B, layer.pair.A, layer.name)
        if layout.overwrites_grad:
            raise ValueError(f"layer {layer.name!r}: the probe cannot read FSDP2-sharded factor gradients of an "
                             "optimizer that overwrites them (schedule-free AdamW)")


def attach(layers: list[ProbedLayer]) -> None:
    """Every rank, at attach: marks each sharded pair (``layer.whole``), gathers its W_0 and its factors. Rank 0
    keeps W_0; the others drop it once ‖W_0‖ is taken (:func:`drop_base`)."""
    with torch.no_grad():
        for layer in layers:
            if layer.pair is not None and is_dtensor(layer.pair.B):
                # whole W_0 as stored, then LoraPair's own view of it ((n, m) under fan_in_fan_out)
                layer.whole = Whole(replace(layer.pair, base=whole(layer.pair.base.detach())).base_weight())
    gather_factors(layers)


def drop_base(layers: list[ProbedLayer], rank: int) -> None:
    """W_0 stays on rank 0 alone, which measures."""
    for layer in layers:
        if layer.whole is not None and rank != 0:
            layer.whole.base = None


def gather_factors(layers: list[ProbedLayer]) -> None:
    """Every rank: the current (B, A) of each sharded pair among ``layers``, whole. Without a process group
    (destroyed before a late close) nothing is gathered, and rank 0's measuring of them fails with one warning."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for layer in layers:
            if layer.whole is not None:
                layer.whole.factors = (whole(layer.pair.B.detach()), whole(layer.pair.A.detach()))


def gather_step(layers: list[ProbedLayer], optimizer: torch.optim.Optimizer) -> None:
    """Every rank, after a recorded step: each sharded pair's factors, their gradients and the optimizer's state
    of both factors, whole."""
    gather_factors(layers)
    with torch.no_grad():
        for layer in layers:
            if layer.whole is not None:
                params = layer.params
                layer.whole.grads = tuple(None if p.grad is None else whole(p.grad) for p in params)
                layer.whole.state = {p: {key: whole(value) if torch.is_tensor(value) else value
                                         for key, value in optimizer.state.get(p, {}).items()} for p in params}


class WholeStateOptimizer:
    """The run's optimizer as rank 0's recorder reads it: ``state`` answers a sharded pair's factors with the
    state gathered at this step (:func:`gather_step`), every other parameter with the optimizer's own; every
    other attribute is the optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer, layers: list[ProbedLayer]) -> None:
        self._optimizer, self._layers = optimizer, layers

    @property
    def state(self) -> ChainMap:
        gathered = [layer.whole.state for layer in self._layers if layer.whole is not None and layer.whole.state]
        return ChainMap(*gathered, self._optimizer.state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


def optimizer_view(optimizer: torch.optim.Optimizer, layers: list[ProbedLayer]) -> Any:
    """What the recorder reads the optimizer's state through: :class:`WholeStateOptimizer` when a probed pair is
    sharded, else the optimizer itself."""
    if any(layer.whole is not None for layer in layers):
        return WholeStateOptimizer(optimizer, layers)
    return optimizer
