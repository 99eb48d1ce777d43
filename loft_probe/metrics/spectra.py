"""Spectra of a layer's update ΔW: effective ranks, size, amplification and intruder dimensions."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, svds
from torch import Tensor

from loft_probe.metrics._common import as_float, check_matrix, ratio
from loft_probe.metrics.alignment import lowrank_norm
from loft_probe.metrics.lowrank import SVD, LowRank

# Below this size the core of `intruder_scores_lowrank` is decomposed densely (faster than Lanczos).
_DENSE_CORE_MAX = 512


def r90(S: Tensor, fraction: float = 0.9) -> Tensor:
    """Smallest k with Σ_{i≤k} σ_i² ≥ fraction·Σ_i σ_i² (the energy rank; 0.9 gives "r90").

    Args:
        S: (..., k) singular values (e.g. `torch.linalg.svdvals(ΔW)` or `lowrank_svd(B, A).S`);
            sorted internally, so any order works.
        fraction: in (0, 1].

    Returns:
        (...) int64 ranks in [1, k]; 0 where all σ are 0. Computed in float64 with a relative slack
        of 1e-12 so that an exact tie with the threshold counts as reached.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = S.double().abs().sort(dim=-1, descending=True).values.square()  # (..., k)
    total = energy.sum(-1, keepdim=True)
    short = energy.cumsum(-1) < fraction * total * (1 - 1e-12)  # prefixes still below the threshold
    rank = short.sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))


def stable_rank(S: Tensor) -> Tensor:
    """Stable rank ‖M‖_F² / ‖M‖_2² = Σ σ_i² / max σ_i² from singular values S (..., k); NaN (undefined) for M = 0.

    References: Rudelson & Vershynin, "Sampling from large matrices", J. ACM 54 (2007).
    """
    (S,) = as_float(S)
    energy = S.double().square()
    return ratio(energy.sum(-1), energy.amax(-1)).to(S.dtype)


def relative_size(dW: Tensor | LowRank, W0: Tensor | float) -> Tensor:
    """Relative size ‖ΔW‖ / ‖W0‖ (Frobenius).

    Args:
        dW: (..., m, n) dense update, or LowRank(B, A) (e.g. from `lowrank_update`): no m×n formed.
        W0: (..., m, n) base weight, or its norm ‖W0‖ as a float / 0-dim tensor to reuse a cached one.

    Returns (...); NaN (undefined) when W0 is zero.
    """
    num = lowrank_norm(dW.B, dW.A) if isinstance(dW, LowRank) else torch.linalg.matrix_norm(as_float(dW)[0])
    if not isinstance(W0, Tensor):
        den = torch.tensor(float(W0), dtype=torch.float64, device=num.device)
    elif W0.ndim >= 2:
        den = torch.linalg.matrix_norm(as_float(W0)[0])
    else:
        den = W0
    return ratio(num, den.to(num.dtype))


def amplification(dW_U: Tensor, dW_S: Tensor, dW_Vh: Tensor, W0: Tensor, r: int) -> Tensor:
    """Amplification factor ‖ΔW‖ / ‖U_rᵀ·W0·V_r‖ of the update ΔW = U·diag(S)·Vh over W0.

    Args:
        dW_U (..., m, k), dW_S (..., k), dW_Vh (..., k, n): SVD of ΔW, S descending (from
            `lowrank_svd` for a LoRA update: no m×n formed). ‖ΔW‖ is ‖S‖ over the k given values.
        W0: (..., m, n) base weight.
        r: 1 ≤ r ≤ k, number of top singular directions of ΔW.

    Returns (...): how strongly ΔW amplifies directions W0 hardly uses; NaN (undefined) when the
    projection of W0 is zero. Cost O(m·n·r).

    References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, §7.3.
    """
    check_matrix("W0", W0)
    k = dW_S.shape[-1]
    if not 1 <= r <= k:
        raise ValueError(f"r must be in [1, {k}] (the number of singular values given), got {r}")
    dW_U, dW_S, dW_Vh, W0 = as_float(dW_U, dW_S, dW_Vh, W0)
    proj = (dW_U[..., :r].mT @ W0) @ dW_Vh[..., :r, :].mT  # (..., r, r) = U_rᵀ·W0·V_r
    return ratio(torch.linalg.vector_norm(dW_S, dim=-1), torch.linalg.matrix_norm(proj))


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def intruder_scores(W0: Tensor, W1: Tensor, k: int = 10, *, side: str = "left") -> Tensor:
    """Best match c_j = max_i |⟨u_j, u0_i⟩| of each top-k singular vector of W1 among all of W0's.

    Args:
        W0: (..., m, n) base weight; W1: (..., m, n) tuned weight W0 + ΔW.
        k: number of top singular vectors of W1, 1 ≤ k ≤ min(m, n).
        side: "left" (u_j, columns of U) or "right" (v_j, rows of Vh: the same on transposes).

    Returns:
        (..., k) scores in [0, 1], j in order of decreasing singular value of W1. A score below ε
        marks an intruder dimension (`intruder_counts`). Dense SVDs of both matrices:
        O(m·n·min(m, n)); see `intruder_scores_lowrank` to reuse W0's SVD.

    References: Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
    """
    check_matrix("W0", W0)
    check_matrix("W1", W1)
    _check_side(side)
    if W0.shape != W1.shape:
        raise ValueError(f"W0 and W1 must have the same shape, got {tuple(W0.shape)} and {tuple(W1.shape)}")
    if not 1 <= k <= min(W0.shape[-2:]):
        raise ValueError(f"k must be in [1, min(m, n)] = [1, {min(W0.shape[-2:])}], got {k}")
    W0, W1 = as_float(W0, W1)
    if side == "right":
        W0, W1 = W0.mT, W1.mT
    U0 = torch.linalg.svd(W0, full_matrices=False).U  # (..., m, l)
    U1 = torch.linalg.svd(W1, full_matrices=False).U[..., :k]  # (..., m, k)
    return (U0.mT @ U1).abs().amax(-2).clamp(0.0, 1.0)


def _span_coords(Q0: Tensor, P: Tensor) -> Tensor:
    """Coefficients (l + t, ρ) of P (d, ρ) in an orthonormal basis [Q0, Q⊥] with Q⊥ (d, t) ⟂ Q0.

    Q⊥ itself is never needed: only its coordinates R_P (P − Q0·Q0ᵀ·P = Q⊥·R_P). When Q0 (d, l) is
    square it spans everything and t = 0. Classical Gram–Schmidt twice ("twice is enough").
    """
    a = Q0.mT @ P  # (l, ρ)
    if Q0.shape[-1] == Q0.shape[-2]:
        return a
    rest = P - Q0 @ a  # (d, ρ)
    fix = Q0.mT @ rest
    rest, a = rest - Q0 @ fix, a + fix
    Rp = torch.linalg.qr(rest, mode="r").R  # (min(d, ρ), ρ)
    return torch.cat([a, Rp], dim=0)


def _top_left_vectors(S0: np.ndarray, L: np.ndarray, R: np.ndarray, k: int, method: str) -> np.ndarray:
    """Top-k left singular vectors (rows, k) of K = D + L·Rᵀ, D = diag(S0) zero-padded to L, R rows."""
    rows, cols, l = L.shape[0], R.shape[0], S0.shape[0]
    if method == "auto":
        method = "dense" if min(rows, cols) <= _DENSE_CORE_MAX else "lanczos"
    if method == "dense":
        K = L @ R.T
        K[np.arange(l), np.arange(l)] += S0
        return np.linalg.svd(K, full_matrices=False)[0][:, :k]

    def matvec(x: np.ndarray) -> np.ndarray:  # K·x, x (cols,) or (cols, b)
        out = L @ (R.T @ x)
        out[:l] += S0.reshape((l,) + (1,) * (x.ndim - 1)) * x[:l]
        return out

    def rmatvec(y: np.ndarray) -> np.ndarray:  # Kᵀ·y
        out = R @ (L.T @ y)
        out[:l] += S0.reshape((l,) + (1,) * (y.ndim - 1)) * y[:l]
        return out

    op = LinearOperator(
        (rows, cols), matvec=matvec, rmatvec=rmatvec, matmat=matvec, rmatmat=rmatvec, dtype=float
    )
    v0 = np.random.default_rng(0).standard_normal(min(rows, cols))  # fixed start: deterministic output
    u, s, _ = svds(op, k=k, tol=0, v0=v0, solver="arpack")
    return u[:, np.argsort(-s)]


def intruder_scores_lowrank(
    base: SVD, delta: LowRank, k: int = 10, *, side: str = "left", method: str = "auto"
) -> Tensor:
    """`intruder_scores` for W1 = W0 + ΔW from W0's cached thin SVD and a low-rank ΔW = P·Q.

    Args:
        base: SVD(U0 (m, l), S0 (l,), Vh0 (l, n)) of W0, complete thin SVD, l = min(m, n)
            (`torch.linalg.svd(W0, full_matrices=False)`): the one-off O(m·n·l) cost, cache it per layer.
        delta: LowRank(P (m, ρ), Q (ρ, n)), e.g. `lowrank_update(...)` or ``SVD(U, S, Vh).lowrank()``.
        k: 1 ≤ k < l + ρ; side: "left" or "right" as in `intruder_scores`.
        method: "dense" decomposes the (l+ρ)² core densely, "lanczos" uses ARPACK on it as an
            operator (O(l·ρ) per product); "auto" picks dense up to l + ρ = 512.

    Returns:
        (k,) scores in [0, 1], equal to `intruder_scores(W0, W0 + ΔW, k, side=side)` up to solver
        tolerance (assuming distinct top-k singular values of W1; on ties any basis is as valid).

    Formula: write P = U0·a + P⊥ (P⊥ = Q_P·R_P ⟂ U0, absent when m ≤ n) and likewise Qᵀ on the right.
    Then W1 = [U0, Q_P]·K·[V0, Q_Q]ᵀ with K = diag(S0, 0) + [a; R_P]·[b; R_Q]ᵀ, so a left singular
    vector of W1 is u_j = [U0, Q_P]·z_j and ⟨u_j, u0_i⟩ = z_j[i]: c_j = max_{i ≤ l} |z_j[i]|.
    Cost O(m·n·ρ) for a = U0ᵀ·P and b = V0ᵀ·Qᵀ plus the small top-k problem; no m×n SVD.

    References: Brand, "Fast low-rank modifications of the thin SVD", Linear Algebra Appl. 415 (2006);
    Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
    """
    _check_side(side)
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos', got {method!r}")
    U0, S0, Vh0 = base
    check_matrix("base.U", U0, batched=False)
    check_matrix("delta.B", delta.B, batched=False)
    m, n = U0.shape[0], Vh0.shape[-1]
    l = S0.shape[-1]
    if l != min(m, n) or U0.shape[1] != l or Vh0.shape[0] != l:
        raise ValueError(
            f"base must be the complete thin SVD of W0 (m, n) = ({m}, {n}) with min(m, n) = {min(m, n)} "
            f"triplets, got U {tuple(U0.shape)}, S {tuple(S0.shape)}, Vh {tuple(Vh0.shape)}"
        )
    if delta.B.shape[0] != m or delta.A.shape[-1] != n:
        raise ValueError(f"delta is {(delta.B.shape[0], delta.A.shape[-1])}, base is {(m, n)}")
    U0, S0, Vh0, P, Qt = as_float(U0, S0, Vh0, delta.B, delta.A)
    V0, Q = Vh0.mT, Qt.mT  # (n, l), (n, ρ)
    if side == "right":
        U0, V0, P, Q = V0, U0, Q, P
    left = _span_coords(U0, P)  # (l + t_P, ρ)
    right = _span_coords(V0, Q)  # (l + t_Q, ρ)
    size = min(left.shape[0], right.shape[0])
    if not 1 <= k < size:
        raise ValueError(f"k must be in [1, {size - 1}] for this layer, got {k}")
    z = _top_left_vectors(
        S0.double().cpu().numpy(), left.double().cpu().numpy(), right.double().cpu().numpy(), k, method
    )
    c = torch.from_numpy(np.abs(z[: S0.shape[0]]).max(axis=0))
    return c.clamp(0.0, 1.0).to(device=U0.device, dtype=U0.dtype)


def intruder_counts(scores: Tensor, eps: float | Tensor = 0.5) -> Tensor:
    """Number of intruder dimensions: scores c_j (..., k) below ε.

    Args:
        scores: (..., k) from `intruder_scores` or `intruder_scores_lowrank`.
        eps: a float, or a 1-D tensor (E,) of thresholds to sweep.

    Returns: (...) int64 for a float eps, (..., E) for a tensor of thresholds.
    """
    eps_t = torch.as_tensor(eps, dtype=scores.dtype, device=scores.device)
    if eps_t.ndim == 0:
        return (scores < eps_t).sum(-1)
    if eps_t.ndim != 1:
        raise ValueError(f"eps must be a float or a 1-D tensor, got shape {tuple(eps_t.shape)}")
    return (scores.unsqueeze(-2) < eps_t.unsqueeze(-1)).sum(-1)


def intruder_dimensions(
    W0: Tensor, W1: Tensor, k: int = 10, eps: float | Tensor = 0.5, *, side: str = "left"
) -> Tensor:
    """Count of intruder dimensions: top-k singular vectors of W1 with c_j = max_i |⟨u_j, u0_i⟩| < ε.

    Args/returns as `intruder_scores` followed by `intruder_counts` (defaults k = 10, ε = 0.5, as in
    the paper); a 1-D tensor eps gives the count for each threshold.

    References: Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
    """
    return intruder_counts(intruder_scores(W0, W1, k, side=side), eps)
