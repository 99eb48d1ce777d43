"""LoFT's math as pure functions of tensors (spec: docs/loft-spec.md).

Every function is written once, for the *left* factor ``L`` (k×r) of ``W = s·L·R`` with its partner
``R`` (r×l). That is the B-side of a PEFT pair (L = B, R = A). The A-side is the same call on transposes,
because ``Wᵀ = s·Aᵀ·Bᵀ``: L = Aᵀ (n×r), R = Bᵀ (r×m), gradient ``g_Aᵀ``, moments ``m_Aᵀ``. The optimizer
makes both calls; nothing here knows which side it is working on.

**Frames.** The partner enters only through its :class:`PartnerFrame`, a truncated SVD
``R ≈ V·diag(σ)·Qᵀ`` that keeps the singular directions above ``cutoff·σ₁`` (the *numerical rank* ρ). The
moments of L are stored against a frame matrix E (l×r): the full-space first moment is ``M = m·Eᵀ`` (k×l).
For LoFT's projected update E = Q, an orthonormal basis of what moving L can express, so the stored numbers
are the full gradient's own coordinates ``G·Q``: nothing is scaled by the partner's conditioning, moving to a
new partner is a contraction (``C = Q_oldᵀ·Q``, ‖C‖ ≤ 1), and the only ill-conditioned operation left is the
final factor update ``ΔL ∝ D·R⁺ = (D·Q)·diag(1/σ)·Vᵀ``. The factor-space ablation (Adam on L itself) keeps
E = Rᵀ, the raw factor coordinates.

Second moments live in a *feature basis* so that the "full" and "simple" variants share every formula:

=========  =====================================  =========================  ============================
variant    per-row state (width T)                ``features(h)``            ``kernel(Eᵀ)`` (T×l)
=========  =====================================  =========================  ============================
full       packed upper triangle of S_i (r×r)     ``h_p·h_q`` (p ≤ q)        ``c_pq·E_p·E_q`` (Khatri–Rao)
simple     diagonal of S_i                        ``h_p²``                   ``E_p²``
=========  =====================================  =========================  ============================

so that the full-space second moment is one matrix multiply ``V = S·kernel(Eᵀ)`` (k×l), never an
(k, r, l) tensor, and transport is ``S ← S·transport(C)`` with a T×T matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Singular directions of a partner below this fraction of its largest are treated as absent. A conditioning
# choice, not a roundoff guard (docs/loft-spec.md, "Rank-deficient partners"): it bounds every factor step by
# 1/cutoff times the partner's scale and keeps the full-rank limit exact wherever cond(R) < 1/cutoff.
PARTNER_CUTOFF = 1e-2


class PartnerFrame:
    """The numerically supported row space of a partner factor ``R`` (r×l): ``R ≈ V·diag(σ)·Qᵀ``.

    ``R`` may carry leading batch dimensions (P, r, l): every map then works pair by pair, as for the
    multi-tensor step (:mod:`loft_probe.optim.foreach`); shapes below are written for one pair.

    Singular values at or below ``cutoff·σ₁`` are dropped (σ, 1/σ and Q's columns set to 0 there), so a zero
    partner has rank 0 and every map below returns 0 for it, never NaN. Computed in float64 by a thin SVD of
    ``Rᵀ`` (accurate to float64 roundoff at any conditioning, unlike an eigen-decomposition of the Gram
    matrix); it is a deterministic function of R's values, so an unchanged partner gives the same frame.

    Attributes:
        basis: Q (l, r), orthonormal columns spanning the kept directions, zero columns beyond the rank; R's dtype.
        right: V (r, r), float64. sigma, inv_sigma: (r,), float64, 0 beyond the rank.
    """

    def __init__(self, R: Tensor, cutoff: float = PARTNER_CUTOFF) -> None:
        r = R.shape[-2]
        U, sigma, Vh = torch.linalg.svd(R.to(torch.float64).mT, full_matrices=False)  # (l,k) (k,) (k,r), k=min(r,l)
        if sigma.shape[-1] < r:  # more factor columns than the partner has room for: pad with absent directions
            pad = r - sigma.shape[-1]
            U = torch.nn.functional.pad(U, (0, pad))
            sigma = torch.nn.functional.pad(sigma, (0, pad))
            Vh = torch.nn.functional.pad(Vh, (0, 0, 0, pad))
        kept = sigma > cutoff * sigma[..., :1]  # strict: σ₁ = 0 keeps nothing
        self.sigma = torch.where(kept, sigma, 0.0)  # (r,)
        self.inv_sigma = torch.where(kept, 1 / torch.where(kept, sigma, 1.0), 0.0)  # (r,)
        self.right = Vh.mT  # (r, r)
        self.basis = (U * kept.unsqueeze(-2)).to(R.dtype)  # (l, r)
        self._partner = R

    def coordinates(self, X: Tensor) -> Tensor:
        """``X·V·diag(1/σ)`` (k×r): the coordinates in Q of the k×l matrix Y with ``Y·Rᵀ = X`` (the minimum-norm
        one). For a factor gradient, ``coordinates(g_L / s) = G·Q``: the full gradient seen by L."""
        return ((X.to(torch.float64) @ self.right) * self.inv_sigma.unsqueeze(-2)).to(X.dtype)

    def push(self, X: Tensor) -> Tensor:
        """``X·V·diag(σ)`` (k×r): the coordinates in Q of ``X·R`` for factor coefficients X (k×r)."""
        return ((X.to(torch.float64) @ self.right) * self.sigma.unsqueeze(-2)).to(X.dtype)

    def to_factor(self, Y: Tensor) -> Tensor:
        """``Y·diag(1/σ)·Vᵀ`` (k×r): the factor coefficients X with ``X·R = Y·Qᵀ`` (minimum norm, ``Y·Qᵀ·R⁺``).
        The one ill-conditioned map: its gain is 1/σ_ρ ≤ 1/(cutoff·σ₁)."""
        return ((Y.to(torch.float64) * self.inv_sigma.unsqueeze(-2)) @ self.right.mT).to(Y.dtype)

    def matrix(self, factor_coordinates: bool) -> Tensor:
        """The frame E (l×r) moments are written against: Q, or ``Rᵀ`` itself for raw factor coordinates."""
        return self._partner.mT if factor_coordinates else self.basis

    def in_frame(self, Y: Tensor, factor_coordinates: bool) -> Tensor:
        """Q-coordinates Y (k×r) rewritten in the frame of :meth:`matrix` (identity for Q)."""
        return self.to_factor(Y) if factor_coordinates else Y


def gradient_coordinates(grad: Tensor, scale: float, frame: PartnerFrame, scaled: bool,
                         factor_coordinates: bool) -> Tensor:
    """Step 1: the gradient whose EMAs are the moments (k×r), in the frame ``E = frame.matrix(...)``.

    scaled (LoFT): ``h·Eᵀ = G·P`` with ``P = Q·Qᵀ``, the full gradient restricted to what L can express.
    Not scaled (ablation): ``h·Eᵀ = g_L·R``, the raw factor gradient pushed through the partner.
    """
    Y = frame.coordinates(grad / scale) if scaled else frame.push(grad)
    return frame.in_frame(Y, factor_coordinates)


def transport_matrix(old_frame: Tensor, frame: PartnerFrame, factor_coordinates: bool, rows: slice = slice(None),
                     total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Step 2: ``C`` (r×r) with ``m·C·Eᵀ = (m·E_oldᵀ)·P``: the full-space moment written against the old frame
    E_old (l×r) is carried over to the new one, not reinterpreted. Orthonormal frames: ``C = Q_oldᵀ·Q``.

    A sharded pair holds only some ``rows`` of E_old: ``total`` sums the ranks' partial overlaps (an all-reduce).
    """
    overlap = old_frame.to(torch.float64).mT @ frame.basis[..., rows, :].to(torch.float64)  # (r, r)
    if total is not None:
        overlap = total(overlap)
    return frame.in_frame(overlap, factor_coordinates).to(old_frame.dtype)


class SecondMomentBasis:
    """How one row's second-moment state is stored; see the module docstring's table.

    ``full=True``: the packed upper triangle of the r×r matrix S_i, T = r(r+1)/2 numbers per row.
    ``full=False`` ("simple"): its diagonal, T = r numbers per row — the elementwise Adam state.
    """

    def __init__(self, rank: int, full: bool, device: torch.device | None = None) -> None:
        self.full = full
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
        rows = h.reshape(-1, h.shape[-1])  # a stack's rows as one matrix: gathers along dim 1 of a matrix are fast
        return (rows.index_select(1, self.p) * rows.index_select(1, self.q)).view(*h.shape[:-1], self.width)

    def kernel(self, R: Tensor) -> Tensor:
        """(T, n) matrix K with ``V = S·K``, ``V_ij = r_jᵀ·S_i·r_j`` (r_j: column j of R)."""
        K = R.index_select(-2, self.p) * R.index_select(-2, self.q)
        return torch.where(self.off_diagonal[:, None], 2 * K, K)

    def transport_(self, S: Tensor, C: Tensor) -> Tensor:
        """In place, step 3: every row's ``S_i ← Cᵀ·S_i·C``; S (..., k, T) in stored coordinates, C (..., r, r).

        One map, evaluated the cheaper of two exact ways. With k ≥ T rows: through the map's (T, T) matrix
        (:meth:`transport`), one product shared by every row. With fewer rows, a full second moment's rows are
        unpacked to their symmetric r×r matrices instead: O(k·r³) work, where forming the matrix alone is O(T²) =
        O(r⁴) (a high rank on a narrow layer; at r = 64, k = 128: 4 ms against 43 ms on this CPU).
        """
        if not self.full or S.shape[-2] >= self.width:
            return S.copy_(S @ self.transport(C))
        rank = C.shape[-1]
        dense = S.new_zeros(*S.shape[:-1], rank, rank)  # (..., k, r, r)
        dense[..., self.p, self.q] = S
        dense[..., self.q, self.p] = S
        C = C.unsqueeze(-3)  # (..., 1, r, r): the same C for every row
        return S.copy_((C.mT @ dense @ C)[..., self.p, self.q])

    def transport(self, C: Tensor) -> Tensor:
        """(T, T) matrix of the map ``S_i ← Cᵀ·S_i·C`` in stored coordinates (step 3).

        full: ``S'_kl = Σ_{p≤q} S_pq·(C_pk·C_ql + [p<q]·C_qk·C_pl)``.
        simple: the diagonal of ``Cᵀ·diag(v)·C``, i.e. ``v' = v·(C∘C)``.
        """
        Cp, Cq = C.index_select(-2, self.p), C.index_select(-2, self.q)  # rows p, rows q of C
        T = Cp.index_select(-1, self.p) * Cq.index_select(-1, self.q)  # rows: stored (p, q); columns: (k, l)
        if self.full:
            T = T + self.off_diagonal[:, None] * (Cq.index_select(-1, self.p) * Cp.index_select(-1, self.q))
        return T


def adam_denominator_(exp_avg_sq: Tensor, step: int, beta2: float, eps: float) -> Tensor:
    """In place: ``sqrt(v)/sqrt(1 − β2ᵗ) + ε``, the order of operations torch.optim.AdamW uses."""
    return exp_avg_sq.sqrt_().div_(math.sqrt(1 - beta2**step)).add_(eps)


def adam_moments_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float) -> None:
    """In place: the EMAs of the gradient and of its square (any shape)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


# A moment stored divided by its scale (:func:`scaled_ema_`) has the scale folded back into it once the scale falls
# below this: the stored numbers stay within 2¹⁶ times the moment's own (they overflow only where the moment is
# within 2¹⁶ of overflowing), and the fold, one pass over the state, comes every log(2¹⁶)/log(1/β) steps
# (β = 0.9: 105; β = 0.999: 11 000).
SCALE_FLOOR = 2.0**-16


def scaled_ema_(state: Tensor, scale: float, beta: float, x: Tensor, y: Tensor | None = None) -> float:
    """In place, one pass over ``state``: the EMA ``e ← β·e + (1 − β)·x`` (``x·y`` elementwise with ``y``) of a
    moment stored as ``e = scale·state``; returns the new scale.

    Why: the decay moves into the scale (``scale·β``), so the state only gains the new term, ``(1 − β)/scale·x``,
    one ``add_``/``addcmul_`` instead of a ``mul_`` and an ``addcmul_`` (or ``lerp_``): two m×n passes fewer
    per step for Adam's two moments. Any shape; a lower-precision state (bfloat16) is updated in the promoted
    dtype of its inputs and rounded once. Below :data:`SCALE_FLOOR` the scale is folded back (scale 1).
    """
    scale = scale * beta
    if scale < SCALE_FLOOR:
        state.mul_(scale)
        scale = 1.0
    weight = (1 - beta) / scale
    if y is None:
        state.add_(x, alpha=weight)
    else:
        state.addcmul_(x, y, value=weight)
    return scale


def adamw_move_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, denominator: Tensor | None = None) -> Tensor:
    """In place: ``param ← (1 − lr·λ)·param − lr·m̂/(sqrt(v̂) + ε)`` from moments already updated; returns it.
    ``denominator``: a work buffer of exp_avg_sq's shape for ``sqrt(v̂) + ε`` (default: new memory)."""
    if weight_decay:  # a factor of exactly 1 would leave param as it is
        param.mul_(1 - lr * weight_decay)
    denom = adam_denominator_(exp_avg_sq.clone() if denominator is None else denominator.copy_(exp_avg_sq), step,
                              beta2, eps)
    return param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step, in place on ``param`` and both moments; torch.optim.AdamW's arithmetic."""
    adam_moments_(grad, exp_avg, exp_avg_sq, beta1, beta2)
    adamw_move_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)


# Rows of the k×n reconstruction handled at once: two such blocks stay in cache, so the elementwise
# passes of the Adam direction cost little and the step never allocates (let alone faults in) k×n memory.
BLOCK_ELEMENTS = 1 << 18


def projected_direction(exp_avg: Tensor, exp_avg_sq: Tensor, E: Tensor, basis: SecondMomentBasis,
                        step: int, betas: tuple[float, float], eps: float, max_ratio: float,
                        block_elements: int = BLOCK_ELEMENTS) -> Tensor:
    """Step 5: ``D·E`` (k×r), D the full-space Adam direction (k×l), undivided by ``1 − β1ᵗ``.

    ``D = M̂ / (sqrt(V̂) + ε)`` with the reconstructed moments ``M = m·Eᵀ``, ``V = S·kernel(Eᵀ)``
    (see :func:`reconstruct_moments`), computed block by block: the transient memory is two blocks of
    ``block_elements`` numbers, not two k×l buffers. For a stack of P pairs (a leading dimension on every
    argument) a block is a run of rows of several pairs: whole pairs when they fit, so that each batched
    multiply keeps the many rows per pair a matrix multiply needs to run fast.

    ``V_ij`` is a quadratic form: where the gradients are nearly orthogonal to ``e_j`` its roundoff is of the
    order of eps·‖S_i‖·‖e_j‖², far above the true value, and can take it to 0 while ``M_ij`` is not (then
    D = M̂/ε). Moments of one gradient sequence always obey ``|M̂| ≤ max_ratio·sqrt(V̂)`` (Cauchy–Schwarz,
    :func:`adam_ratio_bound`), so every entry of D is clamped to ``±max_ratio``: a no-op in exact arithmetic
    that keeps the step within its bound whatever the precision.
    """
    if exp_avg.dim() == 2:  # one pair: a stack of one
        return projected_direction(exp_avg[None], exp_avg_sq[None], E[None], basis, step, betas, eps,
                                   max_ratio, block_elements)[0]
    beta1, beta2 = betas
    (P, k, r), n = exp_avg.shape, E.shape[-2]
    rows = max(1, min(k, block_elements // n))
    pairs = max(1, min(P, block_elements // (rows * n)))
    R = E.mT.contiguous()  # (P, r, l); contiguous rows make the kernel's row gathers plain copies
    K = basis.kernel(R).div_(1 - beta2**step)  # (P, T, l); the bias correction folded in once
    cap = max_ratio * (1 - beta1**step)  # |D| ≤ max_ratio once divided by 1 − β1ᵗ
    M = exp_avg.new_empty(pairs * rows * n)  # flat, so that every block's view of it is contiguous
    V = exp_avg.new_empty(pairs * rows * n)
    out = exp_avg.new_empty(P, k, r)
    for first in range(0, P, pairs):
        last = min(first + pairs, P)
        for start in range(0, k, rows):
            stop = min(start + rows, k)
            M_b, V_b = (buffer[: (last - first) * (stop - start) * n].view(last - first, stop - start, n)
                        for buffer in (M, V))
            torch.matmul(exp_avg[first:last, start:stop], R[first:last], out=M_b)
            torch.matmul(exp_avg_sq[first:last, start:stop], K[first:last], out=V_b)
            M_b.div_(V_b.clamp_min_(0).sqrt_().add_(eps)).clamp_(-cap, cap)
            torch.matmul(M_b, E[first:last], out=out[first:last, start:stop])
    return out


def reconstruct_moments(exp_avg: Tensor, exp_avg_sq: Tensor, E: Tensor, basis: SecondMomentBasis,
                        out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Full-space first and second moments ``(m·Eᵀ, S·kernel(Eᵀ))`` (k×l each) for the frame E (l×r); into
    ``out`` (two k×l tensors, possibly transposed views: the product is written through them) when given."""
    K = basis.kernel(E.mT)  # (T, l)
    if out is None:
        first, second = exp_avg @ E.mT, exp_avg_sq @ K
    else:
        first, second = torch.mm(exp_avg, E.mT, out=out[0]), torch.mm(exp_avg_sq, K, out=out[1])
    return first, second.clamp_min_(0)  # roundoff can take a reconstructed second moment slightly below 0


def adam_ratio_bound(step: int, betas: tuple[float, float]) -> float:
    """``K(t)``: the largest ``|m̂|/sqrt(v̂)`` that EMAs of one scalar sequence can reach after t steps.

    With bias-corrected weights ``w_i = (1−β1)·β1^(t−i)/(1−β1ᵗ)`` and ``u_i = (1−β2)·β2^(t−i)/(1−β2ᵗ)``,
    Cauchy–Schwarz gives ``|Σ w_i·x_i| ≤ sqrt(Σ w_i²/u_i)·sqrt(Σ u_i·x_i²)``, so ``K(t)² = Σ w_i²/u_i``
    (a geometric sum). K(1) = 1; for (0.9, 0.999) K → 7.27. Every Adam-like step obeys
    ``‖Δ‖ ≤ K(t)·lr·sqrt(#entries)``, and so does LoFT's full-space step when its moments are consistent.
    """
    beta1, beta2 = betas
    if beta2 == 0:
        return 1.0 if beta1 == 0 or step == 1 else math.inf
    a, b = (1 - beta1) / (1 - beta1**step), (1 - beta2) / (1 - beta2**step)
    q = beta1**2 / beta2
    total = step if q == 1 else (1 - q**step) / (1 - q)
    return math.sqrt(a * a / b * total)
