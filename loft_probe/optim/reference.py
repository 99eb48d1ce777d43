"""A slow, literal LoFT for one LoRA pair: dense m×n quantities, explicit inverses, full r×r matrices.

It follows docs/loft-spec.md line by line and is the oracle the fast optimizer is tested against in
float64. Not for training: it needs full-rank factors (it inverts Gram matrices without a guard) and
memory of order m·n·r.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ReferenceLoFT:
    """LoFT with every switch on, for ``W = W0 + s·B·A``; B (m×r), A (r×n)."""

    def __init__(self, B: Tensor, A: Tensor, scale: float, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.B, self.A = B.detach().clone(), A.detach().clone()
        self.s, self.lr, self.eps, self.wd = scale, lr, eps, weight_decay
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
        inv_AAt = torch.linalg.inv(A0 @ A0.T)
        inv_BtB = torch.linalg.inv(B0.T @ B0)

        h_B = (g_B / s) @ inv_AAt  # step 1
        h_A = inv_BtB @ (g_A / s)

        C = self.prev_A @ A0.T @ inv_AAt  # steps 2–3
        R = inv_BtB @ B0.T @ self.prev_B
        self.m_B = self.m_B @ C
        self.S_B = C.T @ self.S_B @ C
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
            self.B = (1 - self.lr * self.wd) * B0 - (self.lr / s) * D @ A0.T @ inv_AAt
        else:
            M = B0 @ self.m_A
            V = torch.einsum("ip,jpq,iq->ij", B0, self.S_A, B0).clamp_min(0)
            D = self._direction(M, V)
            self.A = (1 - self.lr * self.wd) * A0 - (self.lr / s) * inv_BtB @ B0.T @ D

        self.prev_A, self.prev_B = A0, B0  # step 6
        self.move_B = not self.move_B

    def full_moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reconstructed full-space moments ``(m_B·A, V_B, B·m_A, V_A)`` (each m×n) at the current factors."""
        A, B = self.A, self.B
        V_B = torch.einsum("pj,ipq,qj->ij", A, self.S_B, A)
        V_A = torch.einsum("ip,jpq,iq->ij", B, self.S_A, B)
        return self.m_B @ A, V_B, B @ self.m_A, V_A

    def _direction(self, M: Tensor, V: Tensor) -> Tensor:
        t = self.t
        return (M / (1 - self.beta1**t)) / (torch.sqrt(V / (1 - self.beta2**t)) + self.eps)
