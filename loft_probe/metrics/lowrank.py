"""Orthonormal bases and exact thin SVDs of low-rank products, never forming an m×n matrix.

A LoRA update ΔW = s·B·A (B: m×r, A: r×n) has rank ≤ r. Its thin SVD follows from the QR
factorisations B = Q_B·R_B and Aᵀ = Q_A·R_A:

    s·B·A = Q_B · (s·R_B·R_Aᵀ) · Q_Aᵀ,   s·R_B·R_Aᵀ = U_c·S·V_cᵀ   (an r×r SVD)
          = (Q_B·U_c) · S · (Q_A·V_c)ᵀ,

which costs O((m + n)·r²) instead of the O(m·n·min(m, n)) of a dense SVD.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from loft_probe.metrics._common import as_float, check_matrix


class LowRank(NamedTuple):
    """A matrix held as the product ``B @ A`` and never formed."""

    B: Tensor  # (..., m, r)
    A: Tensor  # (..., r, n)


class SVD(NamedTuple):
    """A thin SVD ``U @ diag(S) @ Vh``, singular values in descending order."""

    U: Tensor  # (..., m, k), orthonormal columns
    S: Tensor  # (..., k), non-negative, descending
    Vh: Tensor  # (..., k, n), orthonormal rows

    def lowrank(self) -> LowRank:
        """The same matrix as a factor pair ``(U·diag(S), Vh)``."""
        return LowRank(self.U * self.S.unsqueeze(-2), self.Vh)


def default_rtol(X: Tensor) -> float:
    """Relative rank tolerance ``max(d, p)·eps(dtype)`` (as numpy.linalg.matrix_rank, scipy.linalg.orth)."""
    return max(X.shape[-2], X.shape[-1]) * torch.finfo(X.dtype).eps


def orth_coords(X: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Rank-revealing orthonormal basis Q of span(X) together with the map T such that Q = X·T.

    Args:
        X: (d, p) matrix (not batched: the rank, hence the output width, depends on the values).
        rtol: directions whose singular value is at most ``rtol·σ_max(X)`` are dropped;
            default ``max(d, p)·eps(dtype)``. An all-zero X has rank 0.

    Returns:
        Q: (d, k) orthonormal columns spanning the numerical column space of X, k = numerical rank.
        T: (p, k) with Q = X·T, so that ``Qᵀ·G = Tᵀ·(Xᵀ·G)`` is available from ``Xᵀ·G`` alone.

    Formula: X = Q_X·R (reduced QR), R = U_R·diag(σ)·V_Rᵀ; kept directions σ_i > rtol·σ_1:
    Q = Q_X·U_R[:, keep], T = V_R[:, keep]·diag(1/σ[keep]). QR first keeps the SVD at size min(d, p).
    """
    check_matrix("X", X, batched=False)
    (X,) = as_float(X)
    rtol = default_rtol(X) if rtol is None else rtol
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    Qx, R = torch.linalg.qr(X)  # (d, t), (t, p), t = min(d, p)
    Ur, S, Vrh = torch.linalg.svd(R, full_matrices=False)  # (t, t), (t,), (t, p)
    smax = S[0] if S.numel() else X.new_zeros(())
    keep = (S > rtol * smax) & (smax > 0)
    Q = Qx @ Ur[:, keep]  # (d, k)
    T = Vrh[keep].mT / S[keep]  # (p, k)
    return Q, T


def orth(X: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis (d, k) of the column space of X (d, p), rank-revealing; see `orth_coords`.

    Directions with singular value ≤ rtol·σ_max are dropped (default rtol = max(d, p)·eps), so a
    rank-deficient X gives k < p columns and an all-zero X gives a (d, 0) basis.

    References: scipy.linalg.orth (same tolerance rule).
    """
    return orth_coords(X, rtol)[0]


def lowrank_svd(B: Tensor, A: Tensor, scale: float | Tensor = 1.0) -> SVD:
    """Exact thin SVD of s·B·A from QR of B and of Aᵀ plus one small SVD; never forms m×n.

    Args:
        B: (..., m, r) left factor.
        A: (..., r, n) right factor.
        scale: the LoRA scaling s (float or tensor broadcastable to the batch dims); may be negative.

    Returns:
        SVD(U (..., m, k), S (..., k), Vh (..., k, n)), k = min(m, n, r), S descending. When B·A has
        rank < k the trailing singular values are (numerically) zero and their vectors are an
        arbitrary orthonormal completion inside span(B) and span(Aᵀ).

    Formula: B = Q_B·R_B, Aᵀ = Q_A·R_A, s·R_B·R_Aᵀ = U_c·S·V_cᵀ (computed in float64),
    U = Q_B·U_c, Vh = V_cᵀ·Q_Aᵀ. Cost O((m + n)·r²).
    """
    check_matrix("B", B)
    check_matrix("A", A)
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"B (..., m, r) and A (..., r, n) disagree on r: {tuple(B.shape)} and {tuple(A.shape)}"
        )
    B, A = as_float(B, A)
    Qb, Rb = torch.linalg.qr(B)  # (..., m, rb), (..., rb, r)
    Qa, Ra = torch.linalg.qr(A.mT)  # (..., n, ra), (..., ra, r)
    scale = torch.as_tensor(scale, dtype=torch.float64, device=B.device)
    core = scale[..., None, None] * (Rb.double() @ Ra.double().mT)  # (..., rb, ra), tiny: float64
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    return SVD(Qb @ Uc.to(B.dtype), S.to(B.dtype), Vch.to(B.dtype) @ Qa.mT)


def top_singular(M: Tensor, k: int) -> SVD:
    """Top-k singular triplets of a dense matrix M (..., m, n) by a full thin SVD.

    Returns SVD(U (..., m, k), S (..., k), Vh (..., k, n)), S descending; 0 ≤ k ≤ min(m, n).
    Exact (LAPACK), not randomized: cost O(m·n·min(m, n)).
    """
    check_matrix("M", M)
    if not 0 <= k <= min(M.shape[-2:]):
        raise ValueError(f"k must be in [0, min(m, n)] = [0, {min(M.shape[-2:])}], got {k}")
    (M,) = as_float(M)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVD(U[..., :k], S[..., :k], Vh[..., :k, :])
