"""A slow, literal LoFT for one LoRA pair: dense m×n quantities, explicit pseudo-inverses, full r×r matrices.

It follows docs/loft-spec.md line by line, in the spec's own coordinates (raw factor coordinates, the
partner's truncated pseudo-inverse ``A⁺`` where the spec writes an inverse), and is the oracle the fast
optimizer (orthonormal frames, packed state, blocked reconstruction) is tested against in float64. Not for
training: memory of order m·n·r, and raw factor coordinates amplify roundoff by the partner's conditioning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loft_probe.optim.functional import PARTNER_CUTOFF


def truncated_pinv(R: Tensor, cutoff: float = PARTNER_CUTOFF) -> Tensor:
    """``R⁺`` (l×r) of R (r×l), singular values at or below ``cutoff·σ₁`` treated as 0 (σ₁ = 0: R⁺ = 0)."""
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    kept = S > cutoff * S[:1]
    inv = torch.where(kept, 1 / torch.where(kept, S, 1.0), 0.0)
    return Vh.T @ torch.diag(inv) @ U.T


class ReferenceLoFT:
    """LoFT with every switch on, for ``W = W0 + s·B·A``; B (m×r), A (r×n)."""

    def __init__(self, B: Tensor, A: Tensor, scale: float, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, cutoff: float = PARTNER_CUTOFF) -> None:
        self.B, self.A = B.detach().clone(), A.detach().clone()
        self.s, self.lr, self.eps, self.wd, self.cutoff = scale, lr, eps, weight_decay, cutoff
        self.beta1, self.beta2 = betas
        m, r = B.shape
        n = A.shape[1]
        self.m_B, self.S_B = B.new_zeros(m, r), B.new_zeros(m, r, r)
        self.m_A, self.S_A = A.new_zeros(r, n), A.new_zeros(n, r, r)
        self.prev_A, self.prev_B = self.A.clone(), self.B.clone()
        self.t, self.move_B = 0, True

    def step(self, g_B: Tensor, g_A: Tensor) -> None:
        """One step from the raw factor gradients ``g_B = s·G·Aᵀ`` and ``g_A = s·Bᵀ·G``."""
        A0, B0, s = self.A, self.B, self.s
        self.t += 1
        pinv_A = truncated_pinv(A0, self.cutoff)  # (n, r): A0⁺
        pinv_B = truncated_pinv(B0, self.cutoff)  # (r, m): B0⁺

        h_B = (g_B / s) @ pinv_A.T @ pinv_A  # step 1: G·A0⁺ = (g_B/s)·(A0·A0ᵀ)⁺
        h_A = pinv_B @ pinv_B.T @ (g_A / s)  # B0⁺·G = (B0ᵀ·B0)⁺·(g_A/s)

        if self.move_B:  # steps 2–3, for the factor about to move (the other's partner did not change)
            C = self.prev_A @ pinv_A
            self.m_B = self.m_B @ C
            self.S_B = C.T @ self.S_B @ C
        else:
            R = pinv_B @ self.prev_B
            self.m_A = R @ self.m_A
            self.S_A = R @ self.S_A @ R.T

        b1, b2 = self.beta1, self.beta2  # step 4, both factors
        self.m_B = b1 * self.m_B + (1 - b1) * h_B
        self.S_B = b2 * self.S_B + (1 - b2) * torch.einsum("ip,iq->ipq", h_B, h_B)
        self.m_A = b1 * self.m_A + (1 - b1) * h_A
        self.S_A = b2 * self.S_A + (1 - b2) * torch.einsum("pj,qj->jpq", h_A, h_A)

        if self.move_B:  # step 5
            M = self.m_B @ A0
            V = torch.einsum("pj,ipq,qj->ij", A0, self.S_B, A0).clamp_min(0)
            D = self._direction(M, V)
            self.B = (1 - self.lr * self.wd) * B0 - (self.lr / s) * D @ pinv_A
            self.prev_A = A0
        else:
            M = B0 @ self.m_A
            V = torch.einsum("ip,jpq,iq->ij", B0, self.S_A, B0).clamp_min(0)
            D = self._direction(M, V)
            self.A = (1 - self.lr * self.wd) * A0 - (self.lr / s) * pinv_B @ D
            self.prev_B = B0
        self.move_B = not self.move_B  # step 6

    def full_moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reconstructed full-space moments ``(m_B·A, V_B, B·m_A, V_A)`` (each m×n) against the partners the
        states were last written for (A before the last B-step, B before the last A-step)."""
        A, B = self.prev_A, self.prev_B
        V_B = torch.einsum("pj,ipq,qj->ij", A, self.S_B, A)
        V_A = torch.einsum("ip,jpq,iq->ij", B, self.S_A, B)
        return self.m_B @ A, V_B, B @ self.m_A, V_A

    def _direction(self, M: Tensor, V: Tensor) -> Tensor:
        t = self.t
        return (M / (1 - self.beta1**t)) / (torch.sqrt(V / (1 - self.beta2**t)) + self.eps)
