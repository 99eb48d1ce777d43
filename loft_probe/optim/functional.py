"""LoFT's math as pure functions of tensors (spec: docs/loft-spec.md).

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

    ``δ = eps(R.dtype)·trace(R·Rᵀ)/r + tiny``: relative to the Gram's scale, so it vanishes against the
    eigenvalues of a well-conditioned factor (the full-rank limit stays exact to ~1e-14 in float64), yet
    bounds the solve for a singular one. The Gram and the solves are float64 whatever R's dtype: for a nearly
    singular float32 factor a float32 Gram can come out indefinite by more than δ, and the solve explodes.
    ``R = 0`` gives ``δ = tiny`` and every solve of a zero right-hand side returns 0, never NaN.
    """

    def __init__(self, R: Tensor) -> None:
        self.dtype = R.dtype
        R64 = R.to(torch.float64)
        self.gram = R64 @ R64.T  # (r, r)
        r = self.gram.shape[0]
        ridge = torch.finfo(R.dtype).eps * self.gram.diagonal().sum() / r + torch.finfo(torch.float64).tiny
        guarded = self.gram + ridge * torch.eye(r, dtype=torch.float64, device=R.device)
        self._lu, self._pivots = torch.linalg.lu_factor(guarded)

    def right(self, X: Tensor) -> Tensor:
        """``X·(R·Rᵀ)⁻¹`` for X (k, r), in X's dtype."""
        return torch.linalg.lu_solve(self._lu, self._pivots, X.to(torch.float64), left=False).to(X.dtype)


def scaled_gradient(grad: Tensor, scale: float, gram: GramSolver) -> Tensor:
    """Step 1: ``h = (g / s)·(R·Rᵀ)⁻¹`` (k×r), so that ``h·R = G·P_R`` (the full gradient seen by L)."""
    return gram.right(grad / scale)


def fullspace_sq_norm(h: Tensor, gram: GramSolver) -> Tensor:
    """``‖h·R‖²_F = trace(h·(R·Rᵀ)·hᵀ)`` without forming the k×n product h·R."""
    h = h.to(torch.float64)
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
        return h.index_select(1, self.p) * h.index_select(1, self.q)

    def kernel(self, R: Tensor) -> Tensor:
        """(T, n) matrix K with ``V = S·K``, ``V_ij = r_jᵀ·S_i·r_j`` (r_j: column j of R)."""
        K = R.index_select(0, self.p) * R.index_select(0, self.q)
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


def adam_moments_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float) -> None:
    """In place: the EMAs of the gradient and of its square (any shape)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adamw_move_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float) -> Tensor:
    """In place: ``param ← (1 − lr·λ)·param − lr·m̂/(sqrt(v̂) + ε)`` from moments already updated; returns it."""
    param.mul_(1 - lr * weight_decay)
    denom = adam_denominator_(exp_avg_sq.clone(), step, beta2, eps)
    return param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step, in place on ``param`` and both moments; torch.optim.AdamW's arithmetic."""
    adam_moments_(grad, exp_avg, exp_avg_sq, beta1, beta2)
    adamw_move_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)


# Rows of the k×n reconstruction handled at once: two such blocks stay in cache, so the elementwise
# passes of the Adam direction cost little and the step never allocates (let alone faults in) k×n memory.
BLOCK_ELEMENTS = 1 << 18


def projected_direction(exp_avg: Tensor, exp_avg_sq: Tensor, R: Tensor, basis: SecondMomentBasis,
                        step: int, beta2: float, eps: float) -> Tensor:
    """Step 5: ``D·Rᵀ`` (k×r), D the full-space Adam direction (k×n), undivided by ``1 − β1ᵗ``.

    ``D = M / (sqrt(V/(1 − β2ᵗ)) + ε)`` with the reconstructed moments ``M = m·R``, ``V = S·kernel(R)``
    (see :func:`reconstruct_moments`), computed block of rows by block of rows: the transient memory is
    two blocks of ``BLOCK_ELEMENTS`` numbers, not two k×n buffers.
    """
    k, n = exp_avg.shape[0], R.shape[1]
    rows = max(1, min(k, BLOCK_ELEMENTS // n))
    K = basis.kernel(R).div_(1 - beta2**step)  # (T, n); the bias correction folded in once
    M = exp_avg.new_empty(rows, n)
    V = exp_avg.new_empty(rows, n)
    out = exp_avg.new_empty(k, R.shape[0])  # (k, r)
    for start in range(0, k, rows):
        stop = min(start + rows, k)
        M_b, V_b = M[: stop - start], V[: stop - start]
        torch.mm(exp_avg[start:stop], R, out=M_b)
        torch.mm(exp_avg_sq[start:stop], K, out=V_b)
        # clamp: roundoff can take a reconstructed second moment slightly below 0
        M_b.div_(V_b.clamp_min_(0).sqrt_().add_(eps))
        torch.mm(M_b, R.T, out=out[start:stop])
    return out


def reconstruct_moments(exp_avg: Tensor, exp_avg_sq: Tensor, R: Tensor,
                        basis: SecondMomentBasis) -> tuple[Tensor, Tensor]:
    """Full-space first and second moments ``(m·R, S·kernel(R))`` (k×n each), for probes and tests."""
    # clamp: roundoff can take a reconstructed second moment slightly below 0
    return exp_avg @ R, (exp_avg_sq @ basis.kernel(R)).clamp_min_(0)
