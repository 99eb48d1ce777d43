"""A LoRA pair's optimizer state in the weight's space, side by side with what each factor can express.

For ``W = W0 + s·B·A`` (B: m×r, A: r×n), moving B alone changes W by ``s·ΔB·A``: the matrices ``X = X·P_A``,
``P_A = A⁺A``; moving A alone by ``s·B·ΔA``: ``X = P_B·X``, ``P_B = B·B⁺``. A factor's first moment is a
running combination of its gradients ``g_B = s·G·Aᵀ`` and ``g_A = s·Bᵀ·G``, so it lifts to the weight's space
through the pseudo-inverse of its partner (spec: docs/metrics-spec.md, "LoRA's moments in full space"):

    M_B = (1/s)·m_B·(A·Aᵀ)⁺·A          (m×n, in {X·P_A})
    M_A = (1/s)·B·(Bᵀ·B)⁺·m_A          (m×n, in {P_B·X})

With A fixed, ``M_B = EMA(G)·P_A`` exactly: the full fine-tuning moment restricted to what a B-step can
express. When both factors move, the lift drifts from it; that drift is what LoFT removes. The pseudo-inverse
is LoFT's own truncated one (:class:`~loft_probe.optim.functional.PartnerFrame`), so a rank-deficient partner
gives a bounded lift, and the lift does not change when the pair is re-parametrised as ``(B·T, T⁻¹·A)``.

A factor's elementwise second moment has no full-space image; what is compared instead is the direction each
side's preconditioner applies, ``m/(sqrt(v) + ε)`` on the factor, lifted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from loft_probe.metrics import preconditioned_direction
from loft_probe.optim.functional import PARTNER_CUTOFF, PartnerFrame


@dataclass(frozen=True)
class Subspace:
    """The m×n matrices ``P·X = Q_L·Q_Lᵀ·X·Q_R·Q_Rᵀ`` one factor's step can reach: Q_L (m×r) keeps a column space
    (an A-step: ``P_B·X``), Q_R (n×r) a row space (a B-step: ``X·P_A``), either None: all of it (GaLore's
    two-sided projector has both). Q's columns are orthonormal or zero.

    Metrics compare projections through their coordinates ``Q_Lᵀ·X·Q_R`` (r×n, m×r or r×r), never an m×n
    product: ``⟨X, P·Y⟩ = ⟨P·X, P·Y⟩ = ⟨coords X, coords Y⟩`` and ``‖P·X‖ = ‖coords X‖`` (P is an orthogonal
    projector).
    """

    left: Tensor | None
    right: Tensor | None

    def coordinates(self, X: Tensor) -> Tensor:
        """``Q_Lᵀ·X·Q_R`` of X (m×n)."""
        if self.left is not None:
            X = self.left.mT.to(X.dtype) @ X
        return X if self.right is None else X @ self.right.to(X.dtype)

    def project(self, X: Tensor) -> Tensor:
        """P·X (m×n)."""
        C = self.coordinates(X)
        if self.right is not None:
            C = C @ self.right.mT.to(C.dtype)
        return C if self.left is None else self.left.to(C.dtype) @ C


@dataclass(frozen=True)
class Side:
    """One factor's state in the weight's space (m×n each) and the subspace that factor expresses (or, for a dense
    weight stepped in a subspace, GaLore's, its state and that subspace).

    first: the first moment, lifted (LoRA) or reconstructed (LoFT). second: the full-space second moment where
    one exists (LoFT), else None. direction: the preconditioned direction, whose projection onto the subspace
    the factor's step applies: with ``second``, ``first/(sqrt(second) + ε)`` itself (the moment metrics
    compare it unprojected); None without a second moment. within: whether ``first`` lies in the subspace and
    the subspace's basis is orthonormal to working precision (lifts through partner frames, LoFT's projected
    update), so that metrics may compare coordinates; not so for LoFT's factor-space ablation (its moment
    reaches beyond the partner directions kept) or GaLore's projector (orthonormal in float32 only).
    """

    name: str | None  # "b" or "a": which factor moves this way; None: a dense weight's (GaLore's subspace)
    first: Tensor
    second: Tensor | None
    direction: Tensor | None
    subspace: Subspace
    within: bool = True


class PairSubspaces:
    """The two subspaces of a pair with factors B (m×r), A (r×n) and scale s, and the lifts into them."""

    def __init__(self, B: Tensor, A: Tensor, scale: float, cutoff: float = PARTNER_CUTOFF) -> None:
        self.scale = scale
        self.frame_A = PartnerFrame(A, cutoff)  # B's partner: A ≈ V·diag(σ)·Qᵀ, Q (n×r)
        self.frame_B = PartnerFrame(B.mT, cutoff)  # A's partner, on Bᵀ (r×m): Q (m×r)

    def lift_b(self, X: Tensor) -> Tensor:
        """``(1/s)·X·(A·Aᵀ)⁺·A`` (m×n) for B-shaped X (m×r): ``(A⁺)ᵀ = V·diag(1/σ)·Qᵀ``."""
        return self.frame_A.coordinates(X / self.scale) @ self.frame_A.basis.mT.to(X.dtype)

    def lift_a(self, X: Tensor) -> Tensor:
        """``(1/s)·B·(Bᵀ·B)⁺·X`` (m×n) for A-shaped X (r×n)."""
        return (self.frame_B.coordinates(X.mT / self.scale) @ self.frame_B.basis.mT.to(X.dtype)).mT

    def subspace_b(self) -> Subspace:
        """The matrices X·P_A (m×n): what moving B can express."""
        return Subspace(None, self.frame_A.basis)

    def subspace_a(self) -> Subspace:
        """The matrices P_B·X (m×n): what moving A can express."""
        return Subspace(self.frame_B.basis, None)


def lift_factor_state(B: Tensor, A: Tensor, scale: float, first: list[Tensor | None],
                      second: list[Tensor | None], eps: float) -> list[Side]:
    """The sides of a LoRA pair with factors B (m×r), A (r×n) from their moments: ``first = [m_B, m_A]``
    (m×r, r×n; None for a factor without one: no side), ``second`` the matching second moments (None: no
    direction for that side)."""
    spaces = PairSubspaces(B, A, scale)
    sides = []
    for name, lift, subspace, m, v in (("b", spaces.lift_b, spaces.subspace_b, first[0], second[0]),
                                       ("a", spaces.lift_a, spaces.subspace_a, first[1], second[1])):
        if m is not None:
            direction = None if v is None else lift(preconditioned_direction(m, v, eps))
            sides.append(Side(name, lift(m), None, direction, subspace()))
    return sides
