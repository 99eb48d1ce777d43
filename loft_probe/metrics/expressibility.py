"""How much of a layer's full-weight gradient G a LoRA adapter (B, A) can express.

An A-step changes ΔW by B·X, a B-step by Y·A, a joint step by B·X + Y·A (the tangent space of the
rank-r manifold at B·A). With P_B the projector onto span(B) and P_A the projector onto span(Aᵀ):

    left residual    ‖(I − P_B)·G‖ / ‖G‖            what no A-step can produce
    right residual   ‖G·(I − P_A)‖ / ‖G‖            what no B-step can produce
    tangent residual ‖(I − P_B)·G·(I − P_A)‖ / ‖G‖  = min_{X,Y} ‖G − (B·X + Y·A)‖ / ‖G‖

Projectors are applied through orthonormal bases (m×r, n×r): never an m×m or n×n matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from loft_probe.metrics._common import as_float, check_matrix, ratio
from loft_probe.metrics.lowrank import orth, orth_coords


class Residuals(NamedTuple):
    """Relative residuals in [0, 1]; a field is None when the factor it needs was not given."""

    left: Tensor | None  # ‖(I − P_B)·G‖ / ‖G‖, needs B
    right: Tensor | None  # ‖G·(I − P_A)‖ / ‖G‖, needs A
    tangent: Tensor | None  # ‖(I − P_B)·G·(I − P_A)‖ / ‖G‖, needs B and A


def _check_factors(G_shape: tuple[int, ...], B: Tensor | None, A: Tensor | None) -> None:
    m, n = G_shape[-2], G_shape[-1]
    if B is not None and (B.ndim != 2 or B.shape[0] != m):
        raise ValueError(f"B must have shape (m, r) = ({m}, r), got {tuple(B.shape)}")
    if A is not None and (A.ndim != 2 or A.shape[1] != n):
        raise ValueError(f"A must have shape (r, n) = (r, {n}), got {tuple(A.shape)}")


def projection_residuals(G: Tensor, B: Tensor | None = None, A: Tensor | None = None,
                         out: Tensor | None = None) -> Residuals:
    """Left, right and tangent residuals of the gradient G against the adapter factors B and A.

    Args:
        G: (m, n) full-weight gradient of the layer.
        B: (m, r) LoRA up-projection (its column space is that of ΔW), or None.
        A: (r, n) LoRA down-projection (its row space is that of ΔW), or None.
        out: an (m, n) buffer of G's working dtype that the residuals are formed in, one after the other
            (default: new memory).

    Returns:
        Residuals(left, right, tangent), 0-dim tensors in [0, 1] (None where a factor is missing).
        G = 0 gives NaN residuals (undefined: there is no gradient to express). Rank-deficient factors
        count only their numerical column / row space (rank-revealing `orth`); B = 0 gives left residual 1.

    Formula: with Q_B = orth(B) (m, r_B) and Q_A = orth(Aᵀ) (n, r_A),
        L = G − Q_B·(Q_Bᵀ·G),  R = G − (G·Q_A)·Q_Aᵀ,  T = L − (L·Q_A)·Q_Aᵀ,
    residuals ‖L‖, ‖R‖, ‖T‖ over ‖G‖. Forming the m×n residuals directly (O(m·n·r), the size of G)
    keeps full relative accuracy even for residuals near 0, unlike the squared-norm differences of
    `projection_residuals_from_grads`. Each residual is one fused multiply-subtract (``addmm``) into one
    buffer, T in place on L, with ``L·Q_A = G·Q_A − Q_B·(Q_Bᵀ·G·Q_A)`` from r-sized products.

    References: Hu et al., "LoRA", ICLR 2022; Zhao et al., "GaLore", ICML 2024 (gradient projection).
    """
    check_matrix("G", G, batched=False)
    _check_factors(G.shape, B, A)
    given = [x for x in (B, A) if x is not None]
    G, *given = as_float(G, *given)
    if B is not None:
        B = given.pop(0)
    if A is not None:
        A = given.pop(0)
    g = torch.linalg.matrix_norm(G)
    work = torch.empty_like(G) if out is None else out  # (m, n)

    def rel(X: Tensor) -> Tensor:
        return ratio(torch.linalg.matrix_norm(X), g).clamp(0.0, 1.0)

    QB = orth(B) if B is not None else None  # (m, r_B)
    QA = orth(A.mT) if A is not None else None  # (n, r_A)
    G_QA = G @ QA if QA is not None else None  # (m, r_A)
    left = right = tangent = None
    if QB is not None:
        QBt_G = QB.mT @ G  # (r_B, n)
        left = rel(torch.addmm(G, QB, QBt_G, alpha=-1, out=work))  # L
        if QA is not None:
            L_QA = torch.addmm(G_QA, QB, QBt_G @ QA, alpha=-1)  # (m, r_A) = L·Q_A
            tangent = rel(work.addmm_(L_QA, QA.mT, alpha=-1))  # T = L − (L·Q_A)·Q_Aᵀ
    if QA is not None:
        right = rel(torch.addmm(G, G_QA, QA.mT, alpha=-1, out=work))  # R
    return Residuals(left, right, tangent)


def projection_residuals_from_grads(
    G_norm: Tensor | float,
    B: Tensor,
    A: Tensor,
    Bt_G: Tensor | None = None,
    G_At: Tensor | None = None,
) -> Residuals:
    """The residuals of `projection_residuals` from ‖G‖ and the factor gradients, without G itself.

    Autograd gives the LoRA factor gradients for free: g_A = s·Bᵀ·G and g_B = s·G·Aᵀ, so
    ``Bt_G = g_A / s`` (r, n) and ``G_At = g_B / s`` (m, r). With ‖G‖ (one reduction over G, or
    a sum of per-shard squared norms) every residual follows from r×n, m×r and r×r quantities.

    Args:
        G_norm: ‖G‖_F, a float or 0-dim tensor.
        B: (m, r), A: (r, n) the adapter factors.
        Bt_G: (r, n) = Bᵀ·G, needed for the left and tangent residuals.
        G_At: (m, r) = G·Aᵀ, needed for the right and tangent residuals.

    Returns:
        Residuals(left, right, tangent) as in `projection_residuals`; a field is None when its input
        is missing. G_norm = 0 gives NaN (undefined).

    Formula: with Q_B = B·T_B and Q_A = Aᵀ·T_A (`orth_coords`),
        Q_Bᵀ·G = T_Bᵀ·(Bᵀ·G),  G·Q_A = (G·Aᵀ)·T_A,  Q_Bᵀ·G·Q_A = T_Bᵀ·(Bᵀ·G·Aᵀ)·T_A,
        left²    = ‖G‖² − ‖Q_Bᵀ·G‖²
        right²   = ‖G‖² − ‖G·Q_A‖²
        tangent² = ‖G‖² − ‖Q_Bᵀ·G‖² − ‖G·Q_A‖² + ‖Q_Bᵀ·G·Q_A‖².
    Precision: differences of squares, so a residual ρ·‖G‖ carries an absolute error of about
    sqrt(eps)·‖G‖ when ρ is near 0 (~1e-8 in float64, ~3e-4 in float32); prefer
    `projection_residuals` when G is at hand and residuals near 0 matter.
    """
    check_matrix("B", B, batched=False)
    check_matrix("A", A, batched=False)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B (m, r) and A (r, n) disagree on r: {tuple(B.shape)} and {tuple(A.shape)}")
    m, n = B.shape[0], A.shape[1]
    if Bt_G is not None and tuple(Bt_G.shape) != (A.shape[0], n):
        raise ValueError(f"Bt_G must have shape (r, n) = {(A.shape[0], n)}, got {tuple(Bt_G.shape)}")
    if G_At is not None and tuple(G_At.shape) != (m, B.shape[1]):
        raise ValueError(f"G_At must have shape (m, r) = {(m, B.shape[1])}, got {tuple(G_At.shape)}")
    B, A = as_float(B, A)
    g2 = torch.as_tensor(G_norm, dtype=torch.float64, device=B.device).square()
    left2 = right2 = tangent2 = None
    if Bt_G is not None:
        _, TB = orth_coords(B)  # (r, r_B)
        pb = TB.mT @ Bt_G.to(B.dtype)  # (r_B, n) = Q_Bᵀ·G
        left2 = g2 - pb.double().square().sum()
    if G_At is not None:
        _, TA = orth_coords(A.mT)  # (r, r_A)
        pa = G_At.to(B.dtype) @ TA  # (m, r_A) = G·Q_A
        right2 = g2 - pa.double().square().sum()
    if left2 is not None and right2 is not None:
        core = TB.mT @ (Bt_G.to(B.dtype) @ A.mT) @ TA  # (r_B, r_A) = Q_Bᵀ·G·Q_A
        tangent2 = left2 - (g2 - right2) + core.double().square().sum()

    def rel(sq: Tensor | None) -> Tensor | None:
        if sq is None:
            return None
        return ratio(sq.clamp_min(0.0).sqrt(), g2.sqrt()).clamp(0.0, 1.0).to(B.dtype)

    return Residuals(rel(left2), rel(right2), rel(tangent2))


def tangent_projection(X: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Orthogonal projection of X onto the adapter's tangent space {B·U + V·A}.

    Args:
        X: (m, n) a full-space matrix (a gradient, an AdamW update of a shadow optimizer).
        B: (m, r), A: (r, n) the adapter factors.

    Returns:
        (m, n) P_B·X + X·P_A − P_B·X·P_A = X − (I − P_B)·X·(I − P_A): the part of X some B·U + V·A
        reproduces, so ‖X − tangent_projection(X)‖ / ‖X‖ is the tangent residual. Comparing a LoRA
        run against this projection (instead of X) separates the irreducible cost of the subspace
        from transport and alternation errors.
    """
    check_matrix("X", X, batched=False)
    _check_factors(X.shape, B, A)
    X, B, A = as_float(X, B, A)
    QB = orth(B)  # (m, r_B)
    QA = orth(A.mT)  # (n, r_A)
    L = X - QB @ (QB.mT @ X)  # (I − P_B)·X
    return X - (L - (L @ QA) @ QA.mT)
