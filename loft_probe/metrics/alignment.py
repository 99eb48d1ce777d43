"""Cosines, relative norms and errors between updates, gradients and optimizer moments.

Dense matrices are compared over their last two dims (Frobenius), batched over leading dims.
Low-rank matrices are `LowRank(B, A)` factor pairs: their inner products and norms use r×r products
only, so two rank-r updates of an m×n layer compare in O((m + n)·r²), never forming m×n.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loft_probe.metrics._common import as_float, check_matrix, ratio
from loft_probe.metrics.lowrank import LowRank, lowrank_svd

Dims = tuple[int, ...]


def cosine(X: Tensor, Y: Tensor, dim: Dims = (-2, -1)) -> Tensor:
    """Cosine ⟨X, Y⟩ / (‖X‖·‖Y‖) over ``dim`` (default the last two: Frobenius), in [-1, 1].

    Args:
        X, Y: tensors of the same shape, e.g. (..., m, n); pass ``dim=(-1,)`` for vectors (biases).

    Returns:
        (...) the cosine, clamped into [-1, 1]; NaN (undefined) when X or Y is zero: no direction to compare.
    """
    if X.shape != Y.shape:
        raise ValueError(f"X and Y must have the same shape, got {tuple(X.shape)} and {tuple(Y.shape)}")
    X, Y = as_float(X, Y)
    inner = (X * Y).sum(dim=dim)
    norms = torch.linalg.vector_norm(X, dim=dim) * torch.linalg.vector_norm(Y, dim=dim)
    return ratio(inner, norms).clamp(-1.0, 1.0)


def relative_norm(X: Tensor, ref: Tensor, dim: Dims = (-2, -1)) -> Tensor:
    """‖X‖ / ‖ref‖ over ``dim`` (Frobenius by default), e.g. update / weight norm ratio.

    Returns (...); NaN (undefined) when ref is zero: a size relative to nothing.
    """
    X, ref = as_float(X, ref)
    return ratio(torch.linalg.vector_norm(X, dim=dim), torch.linalg.vector_norm(ref, dim=dim))


def relative_error(X_hat: Tensor, X: Tensor, dim: Dims = (-2, -1)) -> Tensor:
    """Relative error ‖X̂ − X‖ / ‖X‖ over ``dim`` (Frobenius by default).

    Returns (...); NaN (undefined) when X is zero, whatever X̂ is.
    """
    if X_hat.shape != X.shape:
        raise ValueError(
            f"X_hat and X must have the same shape, got {tuple(X_hat.shape)} and {tuple(X.shape)}"
        )
    X_hat, X = as_float(X_hat, X)
    return relative_norm(X_hat - X, X, dim=dim)


def update_lr_ratio(update: Tensor | LowRank, lr: float, norm: Tensor | None = None) -> Tensor:
    """‖ΔW‖ / (lr·sqrt(#entries)): a step's size in units of the learning rate, per entry.

    Args:
        update: (..., m, n) the step ΔW, or a LoRA pair's step as a :class:`LowRank` (its norm from r×r
            products); lr: the learning rate it was taken with, >= 0; norm: ‖ΔW‖ (...) when the caller has
            it already (a probe takes each norm once per recorded step), else computed here.

    Returns (...); NaN (undefined) at lr = 0. An Adam-like step moves each entry by lr·|m̂|/(sqrt(v̂) + eps)
    with |m̂|/sqrt(v̂) ≤ K(t) (`loft_probe.optim.functional.adam_ratio_bound`, → 7.3 for betas (0.9, 0.999)),
    so every such step, and LoFT's full-space step, has a ratio ≤ K(t) (plus weight decay's lr·λ·‖W‖ term);
    gradients that keep their sign give ratios near 1, noise well below. A ratio far above K(t) is an
    optimizer taking steps its learning rate does not account for.
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if isinstance(update, LowRank):
        B, A = as_float(*update)
        entries = B.shape[-2] * A.shape[-1]
        norm = lowrank_norm(B, A) if norm is None else norm
    else:
        (update,) = as_float(update)
        entries = update.shape[-2] * update.shape[-1]
        norm = torch.linalg.matrix_norm(update) if norm is None else norm
    return ratio(norm, torch.tensor(lr * entries**0.5, dtype=norm.dtype, device=norm.device))


def preconditioned_cosine(
    m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor, eps: float = 1e-8, dim: Dims = (-2, -1)
) -> Tensor:
    """Cosine between the Adam directions m1/(sqrt(v1) + eps) and m2/(sqrt(v2) + eps).

    Args:
        m1, v1: first and (non-negative) second moments of one optimizer, same shape (..., m, n).
        m2, v2: the other optimizer's moments (e.g. a shadow fed the true gradient).
        eps: Adam's epsilon, >= 0 (use the run's value).

    Returns (...) in [-1, 1]; NaN (undefined) when either direction is zero. Bias corrections are scalars per
    tensor and cancel in a cosine, except through eps: pass bias-corrected moments if that matters.

    References: Kingma & Ba, "Adam", ICLR 2015.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    m1, v1, m2, v2 = as_float(m1, v1, m2, v2)
    return cosine(preconditioned_direction(m1, v1, eps), preconditioned_direction(m2, v2, eps), dim=dim)


def preconditioned_direction(m: Tensor, v: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """Adam's direction ``m/(sqrt(v) + eps)`` from a first and a (non-negative) second moment of one shape;
    ``out``: a buffer of that shape and the result's dtype to write it into instead of new memory."""
    if out is None:
        return m / (v.sqrt() + eps)
    return torch.div(m, torch.sqrt(v, out=out).add_(eps), out=out)


def lowrank_update(B0: Tensor, A0: Tensor, B1: Tensor, A1: Tensor, scale: float = 1.0) -> LowRank:
    """The change of a LoRA layer's effective weight as a rank ≤ 2r factor pair.

    Args:
        B0 (..., m, r), A0 (..., r, n): factors before; B1, A1: factors after; scale: the LoRA s.

    Returns:
        LowRank(B (..., m, 2r), A (..., 2r, n)) with B·A = s·(B1·A1 − B0·A0):
        B = [s·B1, −s·B0], A = [A1; A0]. This is the update of W_eff = W0 + s·B·A, never the
        concatenation of the factor updates (B1 − B0, A1 − A0).
    """
    for name, x in (("B0", B0), ("A0", A0), ("B1", B1), ("A1", A1)):
        check_matrix(name, x)
    if B0.shape != B1.shape or A0.shape != A1.shape:
        raise ValueError(
            f"factors before and after must match: B0 {tuple(B0.shape)} vs B1 {tuple(B1.shape)}, "
            f"A0 {tuple(A0.shape)} vs A1 {tuple(A1.shape)}"
        )
    B0, A0, B1, A1 = as_float(B0, A0, B1, A1)
    return LowRank(torch.cat([scale * B1, -scale * B0], dim=-1), torch.cat([A1, A0], dim=-2))


def lowrank_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """Frobenius inner product ⟨B1·A1, B2·A2⟩ = trace((B1·A1)ᵀ·B2·A2) from r×r products.

    Args:
        B1 (..., m, r1), A1 (..., r1, n), B2 (..., m, r2), A2 (..., r2, n).

    Returns:
        (...) the inner product. Formula: Σ_ij (B1ᵀ·B2)_ij · (A1·A2ᵀ)_ij; cost O((m + n)·r1·r2).
        Exact in exact arithmetic; when a factor pair is a difference of nearly equal products
        (B1·A1 − B0·A0 small) prefer `update_cosine`, which orthogonalises each pair first.
    """
    if B1.shape[-2] != B2.shape[-2] or A1.shape[-1] != A2.shape[-1]:
        raise ValueError(
            f"B1·A1 is {(B1.shape[-2], A1.shape[-1])} but B2·A2 is {(B2.shape[-2], A2.shape[-1])}"
        )
    B1, A1, B2, A2 = as_float(B1, A1, B2, A2)
    gram_b = B1.mT @ B2  # (..., r1, r2)
    gram_a = A1 @ A2.mT  # (..., r1, r2)
    return (gram_b.double() * gram_a.double()).sum((-2, -1)).to(B1.dtype)


def lowrank_norm(B: Tensor, A: Tensor) -> Tensor:
    """Frobenius norm ‖B·A‖ (...) from QR factors: ‖B·A‖ = ‖R_B·R_Aᵀ‖ (B = Q_B·R_B, Aᵀ = Q_A·R_A).

    Unlike sqrt(⟨B·A, B·A⟩), this does not square the rounding error of a cancelling difference.
    """
    return torch.linalg.vector_norm(lowrank_svd(B, A).S, dim=-1)


def _dense_lowrank_inner(D: Tensor, L: LowRank) -> Tensor:
    """⟨D, B·A⟩ = Σ (Bᵀ·D) ⊙ A for dense D (..., m, n): O(m·n·r), no m×n temporary besides D."""
    D, B, A = as_float(D, L.B, L.A)
    return ((B.mT @ D).double() * A.double()).sum((-2, -1)).to(D.dtype)


def update_cosine(U1: Tensor | LowRank, U2: Tensor | LowRank) -> Tensor:
    """Cosine ⟨U1, U2⟩ / (‖U1‖·‖U2‖) of two m×n updates, each dense or a `LowRank` factor pair.

    Args:
        U1, U2: (..., m, n) dense tensors, or LowRank(B (..., m, r), A (..., r, n)); for a LoRA layer
            build the update with `lowrank_update` (the change of s·B·A), for a full run's truncated
            SVD snapshot use ``SVD(U, S, Vh).lowrank()``.

    Returns:
        (...) in [-1, 1], NaN (undefined) when either update is zero.

    Formula: two low-rank updates are first orthogonalised (`lowrank_svd`, U·S·Vh), so that
    ⟨U1, U2⟩ = Σ (S1·U1ᵀ·U2·S2) ⊙ (Vh1·Vh2ᵀ) and ‖U‖ = ‖S‖: O((m + n)·r²) and accurate even when a
    pair is a difference B1·A1 − B0·A0 of nearly equal products. Dense vs low-rank: ⟨D, B·A⟩ =
    Σ (Bᵀ·D) ⊙ A, O(m·n·r). Dense vs dense: `cosine`.
    """
    dense1, dense2 = not isinstance(U1, LowRank), not isinstance(U2, LowRank)
    if dense1 and dense2:
        return cosine(U1, U2)
    if dense1 != dense2:
        D, L = (U1, U2) if dense1 else (U2, U1)
        check_matrix("dense update", D)
        if D.shape[-2:] != (L.B.shape[-2], L.A.shape[-1]):
            raise ValueError(
                f"dense update is {tuple(D.shape[-2:])}, low-rank is {(L.B.shape[-2], L.A.shape[-1])}"
            )
        inner = _dense_lowrank_inner(D, L)
        norms = torch.linalg.matrix_norm(D.to(inner.dtype)) * lowrank_norm(L.B, L.A).to(inner.dtype)
        return ratio(inner, norms).clamp(-1.0, 1.0)
    s1, s2 = lowrank_svd(U1.B, U1.A), lowrank_svd(U2.B, U2.A)
    inner = lowrank_inner(s1.U * s1.S.unsqueeze(-2), s1.Vh, s2.U * s2.S.unsqueeze(-2), s2.Vh)
    norms = torch.linalg.vector_norm(s1.S, dim=-1) * torch.linalg.vector_norm(s2.S, dim=-1)
    return ratio(inner, norms.to(inner.dtype)).clamp(-1.0, 1.0)
