"""What a probe records about one layer at one step: pure functions from tensors to ``{metric: value}``.

Names and meanings are those of :data:`loft_probe.run.METRICS`; formulas come from
:mod:`loft_probe.metrics` (spec: docs/metrics-spec.md). A metric that is undefined at its input (a cosine with
a zero vector, the residual of G = 0, a ratio to lr = 0: NaN from `loft_probe.metrics`) is left out of the
returned dict, so it is a missing row in the record, never a number; NaN in a record means the training
itself went non-finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loft_probe import metrics
from loft_probe.probe.layouts import Side


def _defined(values: dict[str, Tensor | float]) -> dict[str, float]:
    """The values as floats, without the undefined (NaN) ones; ±inf (an overflow) stays."""
    out = {name: float(value) for name, value in values.items()}
    return {name: value for name, value in out.items() if not math.isnan(value)}


class Dense:
    """One m×n quantity of a recorded step (or a flat vector: factor space) and its Frobenius norm, taken on
    first use and then reused: a recorded step compares each quantity with several others."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self._norm: Tensor | None = None

    @property
    def norm(self) -> Tensor:
        if self._norm is None:
            self._norm = torch.linalg.vector_norm(self.x)
        return self._norm


class Scratch:
    """The m×n buffers a recorded step works in, one per role and shape, reused from layer to layer and dropped
    after the step. Why: on a CPU a fresh m×n allocation is returned to the system when freed and faults its
    pages in again next time, about 3 ms at 1024² (1 024 faults), several times the arithmetic of the pass
    that fills it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, role: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The buffer of this role (contiguous, uninitialised): a layer's quantities of different roles are
        alive together; the next layer's overwrite them."""
        key = (role, tuple(shape), dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]

    def like(self, role: str, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The buffer of this role for x's shape and the dtype of x (with y: of an operation on x and y)."""
        dtype = x.dtype if y is None else torch.result_type(x, y)
        return self.get(role, x.shape, dtype, x.device)


class Quantities:
    """The m×n tensors one layer's recorded step compares, each wrapped once (by identity) so that its norm and
    its inner products are computed once, however many metrics read them: LoFT's reconstructed first moment is
    both its full-space moment and its side's, the shadow's moments and direction enter two families of
    metrics, ‖G‖ four. Temporaries go to ``scratch``."""

    def __init__(self, scratch: Scratch) -> None:
        self.scratch = scratch
        # by id, with the tensor itself kept alive beside it: a freed temporary's id could name another tensor
        self._dense: dict[int, tuple[Tensor, Dense]] = {}
        self._inner: dict[tuple[int, int], Tensor] = {}

    def __call__(self, x: Tensor) -> Dense:
        """x as a :class:`Dense`, the same one for the same tensor; 16-bit state upcast to float32 (no metric is
        computed in 16-bit arithmetic)."""
        if id(x) not in self._dense:
            self._dense[id(x)] = (x, Dense(x if x.dtype in (torch.float32, torch.float64) else x.float()))
        return self._dense[id(x)][1]

    def inner(self, a: Dense, b: Dense) -> Tensor:
        """⟨a, b⟩ over every dim: a dot product (no m×n temporary) where both are contiguous in one dtype."""
        key = (id(a), id(b))
        if key not in self._inner:
            x, y = a.x, b.x
            flat = x.dtype == y.dtype and x.is_contiguous() and y.is_contiguous()
            self._inner[key] = torch.dot(x.view(-1), y.view(-1)) if flat else (x * y).sum()
        return self._inner[key]

    def cosine(self, a: list[Dense], b: list[Dense]) -> Tensor:
        """The cosine of a and b, each the concatenation of its parts (one part: a matrix; two: a pair's sides
        as one vector); NaN (undefined) when either is zero. :func:`loft_probe.metrics.cosine`'s formula."""
        inner = sum(self.inner(x, y) for x, y in zip(a, b, strict=True))
        return metrics.ratio(inner, joint_norm(a) * joint_norm(b)).clamp(-1.0, 1.0)

    def relative_error(self, a: list[Dense], b: list[Dense]) -> Tensor:
        """‖a − b‖ / ‖b‖ over the concatenated parts; NaN (undefined) when b is zero.
        :func:`loft_probe.metrics.relative_error`'s formula: the difference is formed, never a difference of
        squares."""
        diff_norms = [torch.linalg.vector_norm(torch.sub(x.x, y.x, out=self.scratch.like("diff", x.x, y.x)))
                      for x, y in zip(a, b, strict=True)]
        return metrics.ratio(torch.linalg.vector_norm(torch.stack(diff_norms)), joint_norm(b))


def joint_norm(parts: list[Dense]) -> Tensor:
    """‖(x_1, x_2, ...)‖ of parts taken together, from their norms."""
    return torch.linalg.vector_norm(torch.stack([part.norm for part in parts]))


class DenseMoments:
    """An optimizer's full-space first and second moments (m×n each, either None) as :class:`Dense`
    quantities, with the preconditioned direction ``M/(sqrt(V) + ε)``: ``direction`` where the caller formed it
    already, else formed once, on first use, in the scratch buffer of ``role``."""

    def __init__(self, quantities: Quantities, role: str, first: Tensor | None, second: Tensor | None,
                 eps: float, direction: Tensor | None = None) -> None:
        self.quantities, self.role, self.eps = quantities, role, eps
        self.first = None if first is None else quantities(first)
        self.second = None if second is None else quantities(second)
        self._direction = None if direction is None else quantities(direction)

    @property
    def direction(self) -> Dense:
        if self._direction is None:
            first, second = self.first.x, self.second.x
            out = self.quantities.scratch.like(self.role, first, second)
            self._direction = self.quantities(metrics.preconditioned_direction(first, second, self.eps, out=out))
        return self._direction


def update_metrics(q: Quantities, update: Dense | metrics.LowRank, weight_norm: Tensor | float,
                   grad: Dense | None, lr: float | None) -> dict[str, float]:
    """The step's effective-weight update ΔW against the norm of the weight it started from, the learning rate
    it was taken with (None: the optimizer sets its own per weight, as Adafactor's relative step), and the
    gradient G (m×n). ΔW is m×n, or a LoRA pair's rank ≤ 2r :class:`LowRank` when no G is compared (sizes
    from r×r products: no m×n work at all)."""
    lowrank = isinstance(update, metrics.LowRank)
    norm = metrics.lowrank_norm(*update) if lowrank else update.norm
    out = {"update_norm": norm, "update_weight_ratio": metrics.ratio(norm, torch.as_tensor(weight_norm))}
    if lr is not None:
        out["update_lr_ratio"] = metrics.update_lr_ratio(update if lowrank else update.x, lr, norm=norm)
    if grad is not None:
        out["grad_norm"] = grad.norm
        out["cos_update_grad"] = q.cosine([update], [grad])
    return _defined(out)


def cumulative_metrics(delta_norm: Tensor | float) -> dict[str, float]:
    """The cumulative change ‖W_t − W_0‖ since attach (its norm computed by the recorder: from the factors for
    a LoRA pair, from W_0 for a dense weight)."""
    return _defined({"weight_change_norm": delta_norm})


def factor_metrics(initial: tuple[Tensor, Tensor], now: tuple[Tensor, Tensor],
                   grads: tuple[Tensor | None, Tensor | None]) -> dict[str, float]:
    """A LoRA pair's own factors: how far each has moved since attach, ‖B_t − B_0‖ (m×r) and ‖A_t − A_0‖ (r×n),
    which is 0 for a factor that never trains (frozen, or a dead gradient); and the factor gradients' joint
    norm. Cumulative, not per step: LoFT moves one factor per step, so a per-step norm recorded every k-th
    (even) step would show the same factor still at every record."""
    (B0, A0), (B1, A1) = initial, now
    out: dict[str, Tensor | float] = {"factor_b_change_norm": (B1 - B0).norm(),
                                      "factor_a_change_norm": (A1 - A0).norm()}
    g_B, g_A = grads
    if g_B is not None and g_A is not None:
        out["factor_grad_norm"] = (g_B.float().norm() ** 2 + g_A.float().norm() ** 2).sqrt()
    return _defined(out)


def residual_metrics(q: Quantities, grad: Dense, B: Tensor, A: Tensor) -> dict[str, float]:
    """How much of G (m×n) the adapter with factors B (m×r), A (r×n) can express."""
    left, right, tangent = metrics.projection_residuals(grad.x, B, A, out=q.scratch.like("residual", grad.x, B))
    return _defined({"residual_left": left, "residual_right": right, "residual_tangent": tangent})


def shadow_metrics(q: Quantities, update: Dense, shadow_update: Dense) -> dict[str, float]:
    """The actual update against the shadow's update from the same point (both m×n)."""
    return _defined({"shadow_update_cosine": q.cosine([update], [shadow_update]),
                     "shadow_update_rel_norm": metrics.ratio(update.norm, shadow_update.norm)})


def moment_metrics(q: Quantities, own: DenseMoments, shadow: DenseMoments) -> dict[str, float]:
    """An optimizer's full-space moments (m×n: a dense weight's, LoFT's reconstruction) against the shadow's:
    errors and cosines of each moment both have, and of the preconditioned directions ``M/(sqrt(V) + ε)``
    (each with the run's ε)."""
    out = {}
    if own.first is not None and shadow.first is not None:
        out["shadow_m_rel_error"] = q.relative_error([own.first], [shadow.first])
        out["shadow_m_cosine"] = q.cosine([own.first], [shadow.first])
    if own.second is not None and shadow.second is not None:
        out["shadow_v_rel_error"] = q.relative_error([own.second], [shadow.second])
        out["shadow_v_cosine"] = q.cosine([own.second], [shadow.second])
        if own.first is not None and shadow.first is not None:
            out["shadow_precond_cosine"] = q.cosine([own.direction], [shadow.direction])
    return _defined(out)


def side_metrics(q: Quantities, sides: list[Side], shadow: DenseMoments) -> dict[str, float]:
    """A pair's per-factor first moments (m×n each, in the subspace that factor expresses) and the projections of
    its preconditioned directions against the shadow's projected onto the same subspaces; both sides of a LoRA
    pair together (as one vector), and each named side's cosine on its own (GaLore's one side has no name).

    Where every side's moment lies in its subspace (``within``), the projections are compared through their
    coordinates (:class:`~loft_probe.probe.layouts.Subspace`: m×r or r×n numbers, inner products, norms and
    differences the same as in m×n); otherwise they are formed."""
    within = all(side.within for side in sides)

    def seen(side: Side, x: Tensor, project: bool) -> Dense:
        """x as compared: its projection's coordinates, or the projection (``project``) or x itself, formed."""
        if within:
            return q(side.subspace.coordinates(x))
        return q(side.subspace.project(x) if project else x)

    own = [seen(side, side.first, project=False) for side in sides]
    target = [seen(side, shadow.first.x.to(side.first.dtype), project=True) for side in sides]
    out = {"shadow_m_proj_rel_error": q.relative_error(own, target), "shadow_m_proj_cosine": q.cosine(own, target)}
    for side, own_side, target_side in zip(sides, own, target, strict=True):
        if side.name is not None:
            out[f"shadow_m_proj_cosine_{side.name}"] = q.cosine([own_side], [target_side])
    if shadow.second is not None and all(side.direction is not None for side in sides):
        directions = [seen(side, side.direction, project=True) for side in sides]
        projected = [seen(side, shadow.direction.x.to(side.direction.dtype), project=True) for side in sides]
        out["shadow_precond_proj_cosine"] = q.cosine(directions, projected)
    return _defined(out)


def moment_grad_metrics(q: Quantities, first: Dense, grad: Dense) -> dict[str, float]:
    """The optimizer's first moment against this step's gradient: (m, n) each, or flat vectors (factor space)."""
    return _defined({"cos_moment_grad": q.cosine([first], [grad])})


def layout_metrics(values: dict[str, Tensor | float]) -> dict[str, float]:
    """An optimizer's own metrics (:meth:`Layout.extra_values`: GaLore's refreshes), the undefined left out."""
    return _defined(values)


def spectrum_metrics(delta: metrics.SVD, base_norm: float) -> dict[str, float]:
    """The cumulative ΔW from its (top-k) singular values; its size relative to a zero W_0 is undefined."""
    S = delta.S
    return _defined({"delta_rel_size": S.norm() / base_norm if base_norm > 0 else math.nan,
                     "delta_stable_rank": metrics.stable_rank(S), "delta_r90": metrics.r90(S)})


def intruder_metrics(scores: Tensor) -> dict[str, float]:
    """Intruder dimensions at ε = 0.5 (Shuttleworth et al.'s default) from the tuned weight's scores."""
    return _defined({"intruders": metrics.intruder_counts(scores, 0.5)})
