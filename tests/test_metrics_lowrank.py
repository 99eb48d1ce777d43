"""Orthonormal bases and low-rank SVDs against dense LAPACK oracles (float64)."""

import pytest
import torch
from helpers import F64, TOL, gen
from torch.testing import assert_close

from loft_probe.metrics import SVD, lowrank_svd, orth, orth_coords, principal_angles, top_singular


def test_orth_is_orthonormal_and_spans_the_input():
    X = torch.randn(9, 4, generator=gen(0), dtype=F64)
    Q = orth(X)
    assert Q.shape == (9, 4)
    assert_close(Q.mT @ Q, torch.eye(4, dtype=F64), **TOL)
    assert_close(Q @ (Q.mT @ X), X, **TOL)  # the projector onto span(Q) leaves X unchanged


def test_orth_drops_directions_below_the_tolerance():
    g = gen(1)
    X = torch.randn(10, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)  # rank 2
    assert orth(X).shape == (10, 2)
    assert orth(torch.zeros(6, 3, dtype=F64)).shape == (6, 0)
    wide = torch.randn(3, 7, generator=g, dtype=F64)
    assert orth(wide).shape == (3, 3)


def test_orth_coords_maps_the_input_onto_the_basis():
    g = gen(2)
    X = torch.randn(12, 3, generator=g, dtype=F64) @ torch.randn(3, 5, generator=g, dtype=F64)
    Q, T = orth_coords(X)
    assert T.shape == (5, 3)
    assert_close(X @ T, Q, **TOL)


def test_orth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rtol"):
        orth(torch.randn(4, 2), rtol=-1.0)
    with pytest.raises(ValueError, match=r"\(m, n\)"):
        orth(torch.randn(2, 4, 2))


@pytest.mark.parametrize(("m", "n", "r"), [(20, 15, 4), (8, 30, 6), (5, 6, 9)])
def test_lowrank_svd_matches_dense_svd(m, n, r):
    g = gen(3)
    B = torch.randn(m, r, generator=g, dtype=F64)
    A = torch.randn(r, n, generator=g, dtype=F64)
    s = -0.7  # a negative scale is absorbed by the singular vectors
    U, S, Vh = lowrank_svd(B, A, s)
    k = min(m, n, r)
    dense = s * B @ A
    U_d, S_d, Vh_d = torch.linalg.svd(dense, full_matrices=False)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert_close(S, S_d[:k], **TOL)
    assert_close(U @ torch.diag(S) @ Vh, dense, **TOL)
    assert_close(U.mT @ U, torch.eye(k, dtype=F64), **TOL)
    assert_close(Vh @ Vh.mT, torch.eye(k, dtype=F64), **TOL)
    # Same singular subspaces, direction by direction (random spectra are simple).
    for j in range(1, k + 1):
        angles = principal_angles(U[:, :j], U_d[:, :j])
        assert_close(angles, torch.zeros(j, dtype=F64), rtol=0, atol=1e-7)


def test_lowrank_svd_is_batched_and_handles_zero_factors():
    g = gen(4)
    B = torch.randn(3, 10, 4, generator=g, dtype=F64)
    A = torch.randn(3, 4, 7, generator=g, dtype=F64)
    scale = torch.tensor([1.0, 2.0, -3.0], dtype=F64)
    U, S, Vh = lowrank_svd(B, A, scale)
    assert_close(U @ torch.diag_embed(S) @ Vh, scale[:, None, None] * B @ A, **TOL)
    zero = lowrank_svd(torch.zeros(10, 4, dtype=F64), A[0])
    assert_close(zero.S, torch.zeros(4, dtype=F64), rtol=0, atol=0)
    assert torch.isfinite(zero.U).all() and torch.isfinite(zero.Vh).all()


def test_lowrank_svd_upcasts_half_precision():
    g = gen(5)
    B = torch.randn(8, 2, generator=g).to(torch.bfloat16)
    A = torch.randn(2, 6, generator=g).to(torch.bfloat16)
    out = lowrank_svd(B, A)
    assert out.S.dtype == torch.float32
    assert_close(out.S, torch.linalg.svdvals(B.float() @ A.float())[:2], rtol=1e-5, atol=1e-5)


def test_lowrank_svd_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="disagree on r"):
        lowrank_svd(torch.randn(5, 3), torch.randn(2, 4))


def test_top_singular_and_svd_lowrank_view():
    M = torch.randn(9, 7, generator=gen(6), dtype=F64)
    U, S, Vh = top_singular(M, 3)
    U_d, S_d, Vh_d = torch.linalg.svd(M, full_matrices=False)
    assert_close(S, S_d[:3], **TOL)
    assert_close(U @ torch.diag(S) @ Vh, U_d[:, :3] @ torch.diag(S_d[:3]) @ Vh_d[:3], **TOL)
    B, A = SVD(U, S, Vh).lowrank()
    assert_close(B @ A, U @ torch.diag(S) @ Vh, **TOL)
    with pytest.raises(ValueError, match="k must be"):
        top_singular(M, 8)
