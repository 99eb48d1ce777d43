"""Cosines, relative norms and low-rank inner products against dense computations (float64)."""

import math

import pytest
import torch
from helpers import F64, TOL, gen, randn
from torch.testing import assert_close

from loft_probe.metrics import (
    SVD,
    LowRank,
    cosine,
    lowrank_inner,
    lowrank_norm,
    lowrank_update,
    preconditioned_cosine,
    relative_error,
    relative_norm,
    update_cosine,
)


def test_cosine_matches_flattened_vectors_and_is_batched():
    X, Y = randn(4, 6, 5, seed=0), randn(4, 6, 5, seed=1)
    got = cosine(X, Y)
    assert got.shape == (4,)
    for b in range(4):
        x, y = X[b].reshape(-1), Y[b].reshape(-1)
        assert_close(got[b], x @ y / (x.norm() * y.norm()), **TOL)
    assert_close(cosine(X, 3 * X), torch.ones(4, dtype=F64), **TOL)
    assert_close(cosine(X, -X), -torch.ones(4, dtype=F64), **TOL)
    v, w = randn(7, seed=2), randn(7, seed=3)
    assert_close(cosine(v, w, dim=(-1,)), v @ w / (v.norm() * w.norm()), **TOL)


def test_cosine_with_zero_is_undefined_and_shapes_are_checked():
    X = randn(3, 4, seed=4)
    assert math.isnan(float(cosine(X, torch.zeros_like(X))))
    assert math.isnan(float(cosine(torch.zeros_like(X), torch.zeros_like(X))))
    with pytest.raises(ValueError, match="same shape"):
        cosine(X, X.mT)


def test_relative_norm_and_error():
    X, ref = randn(5, 3, seed=5), randn(5, 3, seed=6)
    assert_close(relative_norm(X, ref), X.norm() / ref.norm(), **TOL)
    assert_close(relative_error(X, ref), (X - ref).norm() / ref.norm(), **TOL)
    assert float(relative_error(X, X)) == 0.0
    assert math.isnan(float(relative_norm(X, torch.zeros_like(X))))
    assert math.isnan(float(relative_error(X, torch.zeros_like(X))))


def test_preconditioned_cosine_matches_the_adam_directions():
    m1, m2 = randn(6, 4, seed=7), randn(6, 4, seed=8)
    v1, v2 = randn(6, 4, seed=9).square(), randn(6, 4, seed=10).square()
    eps = 1e-3
    d1, d2 = m1 / (v1.sqrt() + eps), m2 / (v2.sqrt() + eps)
    expected = (d1 * d2).sum() / (d1.norm() * d2.norm())
    assert_close(preconditioned_cosine(m1, v1, m2, v2, eps), expected, **TOL)
    with pytest.raises(ValueError, match="eps"):
        preconditioned_cosine(m1, v1, m2, v2, -1.0)


def test_lowrank_update_is_the_change_of_the_effective_weight():
    B0, A0, B1, A1 = randn(8, 3, seed=11), randn(3, 6, seed=12), randn(8, 3, seed=13), randn(3, 6, seed=14)
    s = 0.5
    delta = lowrank_update(B0, A0, B1, A1, s)
    assert delta.B.shape == (8, 6) and delta.A.shape == (6, 6)
    assert_close(delta.B @ delta.A, s * (B1 @ A1 - B0 @ A0), **TOL)
    with pytest.raises(ValueError, match="must match"):
        lowrank_update(B0, A0, B1[:, :2], A1, s)


def test_lowrank_inner_and_norm_match_dense():
    B1, A1, B2, A2 = (
        randn(2, 9, 3, seed=15),
        randn(2, 3, 7, seed=16),
        randn(2, 9, 5, seed=17),
        randn(2, 5, 7, seed=18),
    )
    dense = ((B1 @ A1) * (B2 @ A2)).sum((-2, -1))
    assert_close(lowrank_inner(B1, A1, B2, A2), dense, **TOL)
    assert_close(lowrank_norm(B1, A1), torch.linalg.matrix_norm(B1 @ A1), **TOL)
    with pytest.raises(ValueError, match="B1·A1"):
        lowrank_inner(B1, A1, B2[:, :8], A2)


def test_update_cosine_agrees_across_representations():
    B0, A0, B1, A1 = randn(10, 2, seed=19), randn(2, 8, seed=20), randn(10, 2, seed=21), randn(2, 8, seed=22)
    lora = lowrank_update(B0, A0, B1, A1, 2.0)
    full_dense = randn(10, 8, seed=23)
    U, S, Vh = torch.linalg.svd(full_dense, full_matrices=False)
    full = SVD(U[:, :4], S[:4], Vh[:4]).lowrank()  # a truncated full-run snapshot
    full_as_dense = full.B @ full.A
    expected = cosine(lora.B @ lora.A, full_as_dense)
    assert_close(update_cosine(lora, full), expected, **TOL)
    assert_close(update_cosine(lora, full_as_dense), expected, **TOL)
    assert_close(update_cosine(full_as_dense, lora), expected, **TOL)
    assert_close(update_cosine(lora.B @ lora.A, full_as_dense), expected, **TOL)
    zero = LowRank(torch.zeros(10, 1, dtype=F64), torch.zeros(1, 8, dtype=F64))
    assert math.isnan(float(update_cosine(lora, zero)))


def test_lowrank_norm_of_a_cancelling_difference_is_accurate():
    # B1 = B0 + dB exactly in float64 (B0 on a 2^-20 grid, dB on a 2^-44 grid, |dB| < 2^-20),
    # so the exact update s·(B1·A0 − B0·A0) = s·dB·A0 has a cancellation-free factorisation.
    g = gen(24)
    B0 = torch.round(torch.randn(40, 4, generator=g, dtype=F64) * 2**20) / 2**20
    dB = torch.round(torch.randn(40, 4, generator=g, dtype=F64) * 2**20) / 2**44
    B1 = B0 + dB
    assert torch.equal(B1 - B0, dB)
    A0 = randn(4, 30, seed=25)
    delta = lowrank_update(B0, A0, B1, A0)
    exact = lowrank_norm(dB, A0)
    # Relative error ~ eps·‖B0·A0‖/‖ΔW‖ ≈ 1e-16·1.6e7; sqrt(⟨ΔW, ΔW⟩) from Gram products would be ~1e-2 off.
    assert_close(lowrank_norm(delta.B, delta.A), exact, rtol=1e-7, atol=0)
    other = LowRank(randn(40, 2, seed=26), randn(2, 30, seed=27))
    assert_close(update_cosine(delta, other), update_cosine(LowRank(dB, A0), other), rtol=0, atol=1e-7)
