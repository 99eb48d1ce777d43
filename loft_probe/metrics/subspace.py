"""Principal angles between subspaces and the distances and similarities built on them.

Inputs are spanning sets X (d, p) and Y (d, q): by default each is first reduced to a rank-revealing
orthonormal basis (`orth`), so p and q below are the numerical ranks. Pass ``orthonormal=True`` when
the columns are already orthonormal (singular vectors): this skips `orth`, keeps every column, and
allows leading batch dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loft_probe.metrics._common import as_float, check_matrix, check_same_rows
from loft_probe.metrics.lowrank import orth


def _bases(X: Tensor, Y: Tensor, orthonormal: bool) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of span(X) and span(Y), in one working dtype."""
    check_matrix("X", X, batched=orthonormal)
    check_matrix("Y", Y, batched=orthonormal)
    check_same_rows("X", X, "Y", Y)
    X, Y = as_float(X, Y)
    if orthonormal:
        return X, Y
    return orth(X), orth(Y)


def _angles(QX: Tensor, QY: Tensor) -> Tensor:
    """Principal angles (..., k) ascending, from orthonormal bases QX (..., d, p), QY (..., d, q).

    Knyazev & Argentati (2002): cosines σ_i(QXᵀ·QY) are accurate for large angles, sines
    σ_i((I − P_big)·Q_small) for small ones (arccos(1 − δ) loses half the digits). Each angle takes
    arcsin(sine) when cos² ≥ 1/2 (θ ≤ π/4), arccos(cosine) otherwise.
    """
    p, q = QX.shape[-1], QY.shape[-1]
    k = min(p, q)
    if k == 0:
        return QX.new_zeros(QX.shape[:-2] + (0,))
    M = QX.mT @ QY  # (..., p, q)
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # (..., k), descending: ascending angles
    # The residual of the smaller basis after projection onto the larger one has the sines.
    R = QY - QX @ M if p >= q else QX - QY @ M.mT  # (..., d, k)
    sin = torch.linalg.svdvals(R).flip(-1).clamp(0.0, 1.0)  # (..., k), ascending: ascending angles
    theta = torch.where(cos.square() >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    # The two branches meet at π/4 to rounding; sorting keeps the stated order exactly.
    return theta.sort(dim=-1).values


def principal_angles(X: Tensor, Y: Tensor, *, orthonormal: bool = False) -> Tensor:
    """Principal angles between span(X) and span(Y), in ASCENDING order, in radians in [0, π/2].

    Args:
        X: (d, p) spanning set; (..., d, p) when ``orthonormal=True``.
        Y: (d, q) spanning set; (..., d, q) when ``orthonormal=True``.
        orthonormal: the columns of X and Y are already orthonormal; skip the rank-revealing `orth`.

    Returns:
        (..., k) angles, k = min(rank X, rank Y) (= min(p, q) for full-rank or orthonormal inputs);
        k = 0 (an empty tensor) when either input is zero.

    Formula: θ_i = arccos σ_i(orth(X)ᵀ·orth(Y)), with the sine-based formula for θ ≤ π/4 so that small
    angles keep full relative accuracy (two subspaces 1e-7 rad apart are resolved to ~1e-16 in float64).

    References: Knyazev & Argentati, "Principal angles between subspaces in an A-based scalar product",
    SIAM J. Sci. Comput. 23 (2002); scipy.linalg.subspace_angles (same algorithm, DESCENDING order).
    """
    return _angles(*_bases(X, Y, orthonormal))


def grassmann_distance(X: Tensor, Y: Tensor, *, orthonormal: bool = False) -> Tensor:
    """Geodesic (Grassmann) distance between span(X) and span(Y), in radians.

    Args/shape conventions as `principal_angles`; returns (...,).

    Formula: sqrt(Σ_i θ_i² + |p − q|·(π/2)²), p, q the subspace dimensions (numerical ranks): a
    dimension one subspace has and the other lacks counts as a right angle.

    References: Ye & Lim, "Schubert varieties and distances between subspaces of different
    dimensions", SIAM J. Matrix Anal. Appl. 37 (2016).
    """
    QX, QY = _bases(X, Y, orthonormal)
    theta = _angles(QX, QY)
    extra = abs(QX.shape[-1] - QY.shape[-1]) * (math.pi / 2) ** 2
    return torch.sqrt(theta.square().sum(-1) + extra)


def projection_distance(X: Tensor, Y: Tensor, *, orthonormal: bool = False) -> Tensor:
    """Projection (chordal) distance ‖P_X − P_Y‖_F between span(X) and span(Y) — the norm, NOT squared.

    Args/shape conventions as `principal_angles`; returns (...,), in [0, sqrt(p + q)].

    Formula: ‖P_X − P_Y‖² = p + q − 2·Σ cos²θ_i = |p − q| + 2·Σ sin²θ_i (the sine form avoids the
    cancellation of p + q − 2Σcos² when the subspaces are close). Never forms a d×d projector.

    References: Edelman, Arias & Smith, "The geometry of algorithms with orthogonality constraints",
    SIAM J. Matrix Anal. Appl. 20 (1998), §4.3.
    """
    QX, QY = _bases(X, Y, orthonormal)
    theta = _angles(QX, QY)
    extra = abs(QX.shape[-1] - QY.shape[-1])
    return torch.sqrt(2.0 * torch.sin(theta).square().sum(-1) + extra)


def subspace_similarity(U1: Tensor, U2: Tensor, i: int | None = None, j: int | None = None) -> Tensor:
    """Normalised subspace similarity grid φ between the leading columns of U1 and U2.

    Args:
        U1: (..., d, r1) singular vectors, orthonormal columns ordered by decreasing singular value.
        U2: (..., d, r2) idem. Pass left singular vectors (U) to compare column spaces, or right ones
            (Vhᵀ) to compare row spaces: the function is the same on either side.
        i, j: grid size, default r1 and r2.

    Returns:
        (..., i, j) grid in [0, 1], entry [a-1, b-1] = φ(a, b) = ‖U1[:, :a]ᵀ·U2[:, :b]‖_F² / min(a, b),
        the mean of cos²θ over the min(a, b) principal angles between the two leading subspaces.
        Swapping U1 and U2 transposes the grid. Cost O(d·i·j): one (i, j) product and 2-D cumsums.

    References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, §7.2.
    """
    check_matrix("U1", U1)
    check_matrix("U2", U2)
    check_same_rows("U1", U1, "U2", U2)
    r1, r2 = U1.shape[-1], U2.shape[-1]
    i = r1 if i is None else i
    j = r2 if j is None else j
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}, got i={i}, j={j}")
    U1, U2 = as_float(U1, U2)
    sq = (U1[..., :i].mT @ U2[..., :j]).double().square()  # (..., i, j), squared cosines
    cum = sq.cumsum(-2).cumsum(-1)  # [a-1, b-1] = ‖U1[:, :a]ᵀ U2[:, :b]‖²
    a = torch.arange(1, i + 1, device=sq.device, dtype=sq.dtype)
    b = torch.arange(1, j + 1, device=sq.device, dtype=sq.dtype)
    phi = cum / torch.minimum(a[:, None], b[None, :])
    return phi.clamp(0.0, 1.0).to(U1.dtype)
