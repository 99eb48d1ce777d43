"""LoFT's math as pure functions of tensors (spec: shared/spec/loft.md).

Every function is written once, for the *left* factor ``L`` (m×r) of ``W = s·L·R`` with its partner
``R`` (r×n). That is the B-side of a PEFT pair (L = B, R = A). The A-side is the same call on transposes,
because ``Wᵀ = s·Aᵀ·Bᵀ``: L = Aᵀ (n×r), R = Bᵀ (r×m), gradient ``g_Aᵀ``, moments ``m_Aᵀ``. The optimizer
makes both calls; nothing here knows which side it is working on.

Second moments live in a *feature basis* so that the "full" and "simple" variants share every formula:

=========  =====================================  =========================  ============================
variant    per-row state (width T)                ``features(h)``            ``kernel(R)`` (T×n)
=========  =====================================  =========================  ============================
full       packed upper triangle of S_i (r×r)     ``h_p·h_q`` (p ≤ q)        ``c_pq·R_p·R_q`` (Khatri–Rao)
simple     diagonal of S_i                        ``h_p²``                   ``R_p²``
=========  =====================================  =========================  ============================

so that the full-space second moment is one matrix multiply ``V = S·kernel(R)`` (m×n), never an
(m, r, n) tensor, and transport is ``S ← S·transport(C)`` with a T×T matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GramSolver:
    """Solves against the guarded Gram matrix ``R·Rᵀ + δ·I`` (r×r) of a factor ``R`` (r×n).

    ``δ = eps(dtype)·trace(R·Rᵀ)/r + tiny``: relative to the Gram's scale, so it vanishes against the
    eigenvalues of a well-conditioned factor (the full-rank limit stays exact to ~1e-14 in float64),
    yet keeps the solve finite for a singular one. ``R = 0`` gives ``δ = tiny`` and every solve of a
    zero right-hand side returns 0, never NaN.
    """

    def __init__(self, R: Tensor) -> None:
        gram = R @ R.T  # (r, r)
        self.gram = gram
        r = gram.shape[0]
        finfo = torch.finfo(gram.dtype)
        ridge = finfo.eps * gram.diagonal().sum() / r + finfo.tiny
        guarded = gram + ridge * torch.eye(r, dtype=gram.dtype, device=gram.device)
        self._lu, self._pivots = torch.linalg.lu_factor(guarded)

    def right(self, X: Tensor) -> Tensor:
        """``X·(R·Rᵀ)⁻¹`` for X (k, r)."""
        return torch.linalg.lu_solve(self._lu, self._pivots, X, left=False)


def scaled_gradient(grad: Tensor, scale: float, gram: GramSolver) -> Tensor:
    """Step 1: ``h = (g / s)·(R·Rᵀ)⁻¹`` (k×r), so that ``h·R = G·P_R`` (the full gradient seen by L)."""
    return gram.right(grad / scale)


def fullspace_sq_norm(h: Tensor, gram: GramSolver) -> Tensor:
    """``‖h·R‖²_F = trace(h·(R·Rᵀ)·hᵀ)`` without forming the k×n product h·R."""
    return (h * (h @ gram.gram)).sum()


def transport_matrix(prev_R: Tensor, R: Tensor, gram: GramSolver) -> Tensor:
    """Step 2: ``C = prev_R·Rᵀ·(R·Rᵀ)⁻¹`` (r×r), so that ``m·C·R = (m·prev_R)·P_R``.

    The full-space moment built on the old partner is carried over to the new one, not reinterpreted.
    """
    return gram.right(prev_R @ R.T)


class SecondMomentBasis:
    """How one row's second-moment state is stored; see the module docstring's table.

    ``full=True``: the packed upper triangle of the r×r matrix S_i, T = r(r+1)/2 numbers per row.
    ``full=False`` ("simple"): its diagonal, T = r numbers per row — the elementwise Adam state.
    """

    def __init__(self, rank: int, full: bool, device: torch.device | None = None) -> None:
        self.rank, self.full = rank, full
        if full:
            p, q = torch.triu_indices(rank, rank, device=device)
        else:
            p = q = torch.arange(rank, device=device)
        self.p, self.q = p, q
        self.off_diagonal = p != q  # (T,) entries stored once but counted twice in a symmetric S

    @property
    def width(self) -> int:
        """T, the number of state entries per row."""
        return self.p.numel()

    def features(self, h: Tensor) -> Tensor:
        """``h_p·h_q`` for every stored (p, q): (k, r) → (k, T). Its EMA is the state."""
        return h[:, self.p] * h[:, self.q]

    def kernel(self, R: Tensor) -> Tensor:
        """(T, n) matrix K with ``V = S·K``, ``V_ij = r_jᵀ·S_i·r_j`` (r_j: column j of R)."""
        K = R[self.p] * R[self.q]
        return torch.where(self.off_diagonal[:, None], 2 * K, K)

    def transport(self, C: Tensor) -> Tensor:
        """(T, T) matrix of the map ``S_i ← Cᵀ·S_i·C`` in stored coordinates (step 3).

        full: ``S'_kl = Σ_{p≤q} S_pq·(C_pk·C_ql + [p<q]·C_qk·C_pl)``.
        simple: the diagonal of ``Cᵀ·diag(v)·C``, i.e. ``v' = v·(C∘C)``.
        """
        p, q = self.p, self.q
        T = C[p][:, p] * C[q][:, q]  # rows: stored (p, q); columns: stored (k, l)
        if self.full:
            T = T + self.off_diagonal[:, None] * (C[q][:, p] * C[p][:, q])
        return T


def adam_denominator_(exp_avg_sq: Tensor, step: int, beta2: float, eps: float) -> Tensor:
    """In place: ``sqrt(v)/sqrt(1 − β2ᵗ) + ε``, the order of operations torch.optim.AdamW uses."""
    return exp_avg_sq.sqrt_().div_(math.sqrt(1 - beta2**step)).add_(eps)


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place on ``param`` and both moments (any shape); torch's arithmetic order."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = adam_denominator_(exp_avg_sq.clone(), step, beta2, eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def projected_direction(exp_avg: Tensor, exp_avg_sq: Tensor, R: Tensor, basis: SecondMomentBasis,
                        step: int, beta2: float, eps: float) -> Tensor:
    """Step 5: the full-space Adam direction, undivided by ``1 − β1ᵗ``, times ``Rᵀ`` (k×r).

    ``M = m·R`` and ``V = S·kernel(R)`` are the reconstructed full-space moments (k×n);
    ``D = M / (sqrt(V)/sqrt(1 − β2ᵗ) + ε)``; returns ``D·Rᵀ``. Two k×n buffers at most.
    """
    M, V = reconstruct_moments(exp_avg, exp_avg_sq, R, basis)  # (k, n) each
    D = M.div_(adam_denominator_(V, step, beta2, eps))
    del V
    return D @ R.T  # (k, r)


def reconstruct_moments(exp_avg: Tensor, exp_avg_sq: Tensor, R: Tensor,
                        basis: SecondMomentBasis) -> tuple[Tensor, Tensor]:
    """Full-space first and second moments ``(m·R, S·kernel(R))`` (k×n each), for probes and tests."""
    # clamp: roundoff can take a reconstructed second moment slightly below 0
    return exp_avg @ R, (exp_avg_sq @ basis.kernel(R)).clamp_min_(0)
