"""What a probe records at a recorded step and at a snapshot step, layer by layer.

Each recorded quantity is named, with its meaning, in :data:`loft_probe.run.METRICS`; its formula and the line
that names it are in :mod:`loft_probe.probe.measure`. This module only gathers the tensors those functions
take (the update, the gradient, the optimizer's and the shadow's moments) and returns their values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from loft_probe import metrics
from loft_probe.probe import measure
from loft_probe.probe.layers import ProbedLayer
from loft_probe.probe.layouts import Layout, Side
from loft_probe.run.layout import snapshot_key

INTRUDER_K = 10  # top singular vectors of the tuned weight checked for intruders (Shuttleworth et al.)
INTRUDER_MODES = ("last", "all", "none")  # intruder counts at the last step, at every snapshot, never


class Recorder:
    """Measures layers for a probe: ``step_values`` at recorded steps, ``snapshot`` and ``intruder_values``.

    ``initial_weight(layer)`` reads a dense layer's W_0 (m×n) back from the run directory.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layout: Layout, groups: dict[int, dict[str, Any]],
                 snapshot_k: int, intruders: str, initial_weight: Callable[[ProbedLayer], Tensor]) -> None:
        self.optimizer, self.layout, self.groups = optimizer, layout, groups
        self.snapshot_k, self.intruders = snapshot_k, intruders
        self.initial_weight = initial_weight

    def group(self, layer: ProbedLayer) -> dict[str, Any]:
        """The optimizer param group holding the layer's lr and betas."""
        return self.groups[id(layer.key_param)]

    def step_values(self, layer: ProbedLayer, scratch: measure.Scratch) -> dict[str, float]:
        """Every per-step metric of one layer after a recorded step (``layer.before``: its state before it).
        Each m×n quantity is formed once and each norm taken once (:class:`measure.Quantities`), temporaries
        in the recorded step's ``scratch``."""
        if layer.before is None:
            return {}
        group = self.group(layer)
        after = layer.state_now()
        if not finite(after):  # the optimizer diverged: say so, no spectra
            return {"update_norm": float("nan")}
        q = measure.Quantities(scratch)
        # without G or a shadow to compare it with, a pair's update is never formed (rank ≤ 2r: r×r work)
        if layer.pair is not None and layer.grad is None and layer.shadow is None:
            update = layer.update(layer.before, after, lowrank=True)
        else:
            start = layer.before[0]  # ΔW comes out in the saved state's dtype and device
            update = q(layer.update(layer.before, after,
                                    out=scratch.get("update", layer.shape, start.dtype, start.device)))
        grad = None if layer.grad is None else q(layer.grad)
        values = measure.update_metrics(q, update, layer.before_norm(), grad, group.get("lr"))
        values.update(measure.cumulative_metrics(self.cumulative_delta_norm(layer, after)))
        sides = None
        if layer.pair is None and layer.shadow is not None:
            sides = self.layout.weight_sides(self.optimizer, group, layer.param, layer.compute_dtype())
        if layer.pair is not None:
            values.update(measure.factor_metrics(layer.initial_factors, after, layer.factor_grads()))
            if layer.grad is not None:
                values.update(measure.residual_metrics(q, grad, *layer.before))
            if layer.grad is not None or layer.shadow is not None:  # the sides are m×n work: only when read
                sides = self.layout.pair_sides(self.optimizer, group, layer.pair, layer.compute_dtype(), after,
                                               scratch)
        eps = group.get("eps", 0.0)
        full = self._full_space_moments(q, layer, group, sides)
        if full is not None and full.first is not None and grad is not None:
            values.update(measure.moment_grad_metrics(q, full.first, grad))
        elif layer.pair is not None:
            values.update(self._factor_cosine(q, layer, group))
        if layer.pair is None:
            values.update(measure.layout_metrics(self.layout.extra_values(self.optimizer, group, layer.param,
                                                                          layer.grad, layer.layout_before)))
        shadow = layer.shadow
        if shadow is not None and shadow.last_update is not None:
            values.update(measure.shadow_metrics(q, update, q(shadow.last_update)))
            moments = shadow.moments(scratch)
            shadow_moments = measure.DenseMoments(q, "shadow direction", moments.first, moments.second, eps)
            if full is not None:
                values.update(measure.moment_metrics(q, full, shadow_moments))
            if sides is not None and shadow_moments.first is not None:
                values.update(measure.side_metrics(q, sides, shadow_moments))
        return values

    def _full_space_moments(self, q: measure.Quantities, layer: ProbedLayer, group: dict[str, Any],
                            sides: list[Side] | None) -> measure.DenseMoments | None:
        """The optimizer's moments in the weight's space (m×n): a dense weight's own, LoFT's reconstruction (with
        the direction its side formed); a LoRA pair's factor moments have no single full-space image (their
        lifts are per side)."""
        eps = group.get("eps", 0.0)
        if layer.pair is None and sides:  # a weight stepped in a subspace (GaLore): its one side, lifted once
            return measure.DenseMoments(q, "direction", sides[0].first, sides[0].second, eps)
        if layer.pair is None:
            moments = self.layout.moments(self.optimizer, group, layer.param)
            return None if moments is None else measure.DenseMoments(q, "direction", moments.first,
                                                                     moments.second, eps)
        if sides is not None and len(sides) == 1 and sides[0].second is not None:
            side = sides[0]
            return measure.DenseMoments(q, "direction", side.first, side.second, eps, direction=side.direction)
        return None

    def _factor_cosine(self, q: measure.Quantities, layer: ProbedLayer, group: dict[str, Any]
                       ) -> dict[str, float]:
        """``cos_moment_grad`` over both factors of a LoRA pair, in factor space; {} when not defined."""
        moments = [self.layout.moments(self.optimizer, group, p) for p in (layer.pair.B, layer.pair.A)]
        factor_grads = layer.factor_grads()
        if any(m is None or m.first is None for m in moments) or any(g is None for g in factor_grads):
            return {}
        first = torch.cat([m.first.float().flatten() for m in moments])
        grads = torch.cat([g.float().flatten() for g in factor_grads])
        return measure.moment_grad_metrics(q, q(first), q(grads))

    def cumulative_delta_norm(self, layer: ProbedLayer, state: tuple[Tensor, ...]) -> Tensor:
        """‖W_t − W_0‖ of a state: from the factors for a LoRA pair (no m×n product), from W_0 for a dense one."""
        if layer.pair is not None:
            delta = metrics.lowrank_update(*layer.initial_factors, *state, scale=layer.pair.scale)
            return metrics.lowrank_norm(*delta)
        return (state[0] - self.initial_weight(layer)).norm()

    def snapshot(self, layers: list[ProbedLayer]) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
        """(the snapshot file's tensors ``"<layer>::<what>.<part>"``, the spectrum metrics of each layer): the
        top-k SVD of each layer's cumulative ΔW, its adapter factors, its shadow's first moment."""
        tensors: dict[str, Tensor] = {}
        values: dict[str, dict[str, float]] = {}
        for layer in layers:
            state = layer.state_now()
            if not finite(state):
                continue  # a diverged layer has no spectrum: its NaN update norms already say so
            if layer.pair is not None:
                B, A = state
                delta_lr = metrics.lowrank_update(*layer.initial_factors, B, A, scale=layer.pair.scale)
                delta = truncate(metrics.lowrank_svd(*delta_lr), self.snapshot_k)
                tensors[snapshot_key(layer.name, "adapter", "B")] = B
                tensors[snapshot_key(layer.name, "adapter", "A")] = A
            else:
                W = state[0]
                delta = metrics.top_singular(W - self.initial_weight(layer), min(self.snapshot_k, *W.shape))
            tensors.update(svd_tensors(layer.name, "delta", delta))
            shadow_m = layer.shadow.moments().first if layer.shadow is not None and layer.shadow.step > 0 else None
            if shadow_m is not None:
                top = metrics.top_singular(shadow_m, min(self.snapshot_k, *shadow_m.shape))
                tensors.update(svd_tensors(layer.name, "shadow_m", top))
            values[layer.name] = measure.spectrum_metrics(delta, layer.base_norm)
        return tensors, values

    def intruder_values(self, layers: list[ProbedLayer]) -> dict[str, dict[str, float]]:
        """Intruder counts of every layer's current weight: an SVD of W_0 per layer, so by default only once,
        at the last step (``intruders="last"``)."""
        values = {}
        for layer in layers:
            state = layer.state_now()
            if not finite(state):
                continue
            if layer.pair is not None:
                scores = self._lora_intruder_scores(layer, *state)
            else:
                W = state[0]
                scores = metrics.intruder_scores(self.initial_weight(layer), W, k=min(INTRUDER_K, *W.shape))
            if scores is not None:
                values[layer.name] = measure.intruder_metrics(scores)
        return values

    def _lora_intruder_scores(self, layer: ProbedLayer, B: Tensor, A: Tensor) -> Tensor | None:
        """Intruder scores of W_0 + s·B·A from W_0's SVD (kept with ``intruders="all"``: about twice W_0's
        memory per layer) and the rank-r update: no m×n SVD of the tuned weight."""
        base_svd = layer.base_svd or metrics.SVD(*torch.linalg.svd(layer.base_weight().to(B.dtype),
                                                                   full_matrices=False))
        if self.intruders == "all":  # counted at every snapshot: keep it
            layer.base_svd = base_svd
        k = min(INTRUDER_K, base_svd.S.numel() - 1)  # the low-rank path needs k < min(m, n)
        if k < 1:
            return None
        return metrics.intruder_scores_lowrank(base_svd, metrics.LowRank(layer.pair.scale * B, A), k=k)


def svd_tensors(layer: str, what: str, svd: metrics.SVD) -> dict[str, Tensor]:
    """A snapshot's U (m×k), S (k,), Vh (k×n) of one layer under their file names."""
    return {snapshot_key(layer, what, part): tensor for part, tensor in zip(("U", "S", "Vh"), svd, strict=True)}


def finite(state: tuple[Tensor, ...]) -> bool:
    return all(all_finite(x) for x in state)


def all_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite. A NaN or ±inf entry makes the sum NaN or ±inf, so a finite sum (one
    fast reduction, 15× cheaper than ``isfinite(x).all()`` at 1024², 2.4 ms against 0.16) settles it; a
    non-finite sum may be an overflow of finite entries, and only then is every entry checked."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def truncate(svd: metrics.SVD, k: int) -> metrics.SVD:
    return metrics.SVD(svd.U[:, :k], svd.S[:k], svd.Vh[:k])


def schedule_values(group: dict[str, Any]) -> dict[str, float]:
    """The lr and betas a step was taken with (a scheduler changes them after ``optimizer.step``): the group of
    the first probed layer, recorded as run-level rows; each layer's ``update_lr_ratio`` uses its own group."""
    values = {} if group.get("lr") is None else {"lr": float(group["lr"])}  # Adafactor's relative step: none
    if isinstance(group.get("betas"), (tuple, list)) and len(group["betas"]) == 2:
        values["beta1"], values["beta2"] = map(float, group["betas"])
    return values
