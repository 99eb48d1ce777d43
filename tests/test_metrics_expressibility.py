"""Gradient expressibility residuals against dense projectors and a vectorised least-squares oracle."""

import math

import pytest
import torch
from helpers import F64, TOL, gen
from torch.testing import assert_close

from loft_probe.metrics import projection_residuals, projection_residuals_from_grads, tangent_projection

ZERO = torch.tensor(0.0, dtype=F64)


def setup(m: int = 9, n: int = 7, r: int = 2, seed: int = 0):
    g = gen(seed)
    return (
        torch.randn(m, n, generator=g, dtype=F64),
        torch.randn(m, r, generator=g, dtype=F64),
        torch.randn(r, n, generator=g, dtype=F64),
    )


def dense_projector(X: torch.Tensor) -> torch.Tensor:
    return X @ torch.linalg.pinv(X)


def lstsq_tangent_residual(G, B, A):
    """min over X, Y of ‖G − (B·X + Y·A)‖, by least squares on the vectorised problem.

    Column-major vec: vec(B·X) = (I_n ⊗ B)·vec(X), vec(Y·A) = (Aᵀ ⊗ I_m)·vec(Y).
    """
    m, n = G.shape
    M = torch.cat(
        [torch.kron(torch.eye(n, dtype=F64), B), torch.kron(A.mT.contiguous(), torch.eye(m, dtype=F64))],
        dim=1,
    )
    g = G.mT.reshape(-1)  # column-major vec(G)
    sol = torch.linalg.lstsq(M, g, driver="gelsd").solution
    return torch.linalg.vector_norm(g - M @ sol), (M @ sol).reshape(n, m).mT


def test_residuals_match_dense_projectors():
    G, B, A = setup()
    I_m, I_n = torch.eye(9, dtype=F64), torch.eye(7, dtype=F64)
    PB, PA = dense_projector(B), dense_projector(A.mT)
    g = torch.linalg.matrix_norm(G)
    res = projection_residuals(G, B, A)
    assert_close(res.left, torch.linalg.matrix_norm((I_m - PB) @ G) / g, **TOL)
    assert_close(res.right, torch.linalg.matrix_norm(G @ (I_n - PA)) / g, **TOL)
    assert_close(res.tangent, torch.linalg.matrix_norm((I_m - PB) @ G @ (I_n - PA)) / g, **TOL)


def test_tangent_residual_is_the_least_squares_optimum():
    G, B, A = setup(m=6, n=5, r=2, seed=1)
    best, _ = lstsq_tangent_residual(G, B, A)
    assert_close(projection_residuals(G, B, A).tangent, best / torch.linalg.matrix_norm(G), **TOL)


def test_residuals_vanish_on_expressible_gradients():
    G, B, A = setup(seed=2)
    g = gen(3)
    X = torch.randn(2, 7, generator=g, dtype=F64)
    Y = torch.randn(9, 2, generator=g, dtype=F64)
    exact = {"atol": 1e-13, "rtol": 0}
    res = projection_residuals(B @ X, B, A)
    assert_close(res.left, ZERO, **exact)
    assert_close(res.tangent, ZERO, **exact)
    res = projection_residuals(Y @ A, B, A)
    assert_close(res.right, ZERO, **exact)
    assert_close(res.tangent, ZERO, **exact)
    res = projection_residuals(B @ X + Y @ A, B, A)
    assert_close(res.tangent, ZERO, **exact)
    assert float(res.left) > 0.01 and float(res.right) > 0.01


def test_zero_gradient_and_missing_factors():
    _, B, A = setup(seed=4)
    res = projection_residuals(torch.zeros(9, 7, dtype=F64), B, A)
    assert all(math.isnan(float(x)) for x in res)  # undefined: there is no gradient to express
    G = setup(seed=5)[0]
    only_b = projection_residuals(G, B=B)
    assert only_b.right is None and only_b.tangent is None and only_b.left is not None
    only_a = projection_residuals(G, A=A)
    assert only_a.left is None and only_a.tangent is None and only_a.right is not None
    # PEFT initialises B = 0: no column space, nothing of G is reachable by an A-step.
    assert_close(projection_residuals(G, torch.zeros(9, 2, dtype=F64), A).left, torch.tensor(1.0, dtype=F64))


def test_rank_deficient_factors_use_their_numerical_span():
    G, B, A = setup(seed=6)
    B_dup = torch.cat([B, B[:, :1], 2 * B], dim=1)  # (9, 5), rank 2
    A_dup = torch.cat([A, A], dim=0)  # (4, 7), rank 2
    assert_close(projection_residuals(G, B_dup, A_dup), projection_residuals(G, B, A), **TOL)


def test_residuals_from_factor_gradients_match_direct():
    G, B, A = setup(m=11, n=8, r=3, seed=7)
    s = 2.5
    g_A, g_B = s * B.mT @ G, s * G @ A.mT  # what autograd gives a LoRA layer W0 + s·B·A
    direct = projection_residuals(G, B, A)
    cheap = projection_residuals_from_grads(torch.linalg.matrix_norm(G), B, A, g_A / s, g_B / s)
    assert_close(cheap, direct, **TOL)
    left_only = projection_residuals_from_grads(float(torch.linalg.matrix_norm(G)), B, A, Bt_G=g_A / s)
    assert left_only.right is None and left_only.tangent is None
    assert_close(left_only.left, direct.left, **TOL)
    zero = projection_residuals_from_grads(
        0.0, B, A, torch.zeros(3, 8, dtype=F64), torch.zeros(11, 3, dtype=F64)
    )
    assert all(math.isnan(float(x)) for x in zero)


def test_residuals_from_grads_reject_bad_shapes():
    G, B, A = setup(seed=8)
    with pytest.raises(ValueError, match="Bt_G"):
        projection_residuals_from_grads(1.0, B, A, Bt_G=torch.zeros(7, 2, dtype=F64))


def test_tangent_projection_is_the_least_squares_fit():
    G, B, A = setup(m=6, n=5, r=2, seed=9)
    _, fit = lstsq_tangent_residual(G, B, A)
    proj = tangent_projection(G, B, A)
    assert_close(proj, fit, **TOL)
    assert_close(tangent_projection(proj, B, A), proj, **TOL)  # a projection is idempotent
    ratio = torch.linalg.matrix_norm(G - proj) / torch.linalg.matrix_norm(G)
    assert_close(ratio, projection_residuals(G, B, A).tangent, **TOL)


def test_residual_arguments_are_checked():
    G, B, A = setup(seed=10)
    with pytest.raises(ValueError, match="B must have shape"):
        projection_residuals(G, B.mT, A)
    with pytest.raises(ValueError, match="A must have shape"):
        projection_residuals(G, B, A.mT)
