"""Principal angles, subspace distances and φ against scipy, closed forms and dense projectors."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import F64, TOL, gen
from torch.testing import assert_close

from loft_probe.metrics import grassmann_distance, principal_angles, projection_distance, subspace_similarity


def rotated_pair(thetas: list[float], extra_q: int = 0, d: int = 16, seed: int = 0):
    """X (d, p) and Y (d, p + extra_q) with principal angles exactly `thetas`.

    Y's i-th column is X's i-th column rotated by θ_i in its own 2-D plane (orthogonal to all other
    planes); the extra columns of Y are orthogonal to X. Everything is then rotated by a random
    orthogonal matrix so no coordinate axis is special.
    """
    p = len(thetas)
    O, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    t = torch.tensor(thetas, dtype=F64)
    X = O[:, :p]
    Y = torch.cos(t) * O[:, :p] + torch.sin(t) * O[:, p : 2 * p]
    Y = torch.cat([Y, O[:, 2 * p : 2 * p + extra_q]], dim=1)
    return X, Y


def dense_projector(X: torch.Tensor) -> torch.Tensor:
    return X @ torch.linalg.pinv(X)


@pytest.mark.parametrize(("d", "p", "q"), [(10, 3, 3), (12, 5, 2), (12, 2, 5), (30, 7, 11), (6, 4, 5)])
def test_principal_angles_match_scipy(d, p, q):
    g = gen(d + p + q)
    X = torch.randn(d, p, generator=g, dtype=F64)
    Y = torch.randn(d, q, generator=g, dtype=F64)
    expected = np.sort(scipy.linalg.subspace_angles(X.numpy(), Y.numpy()))  # scipy: descending
    got = principal_angles(X, Y)
    assert got.shape == (min(p, q),)
    assert torch.all(got[1:] >= got[:-1]), "angles must be ascending"
    assert_close(got, torch.from_numpy(expected), **TOL)


def test_same_subspace_gives_zero_and_orthogonal_gives_right_angles():
    O, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen(1), dtype=F64))
    X = O[:, :3]
    T = torch.randn(3, 3, generator=gen(2), dtype=F64) + 3 * torch.eye(3, dtype=F64)
    assert_close(principal_angles(X, X @ T), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    assert_close(principal_angles(X, O[:, 3:7]), torch.full((3,), math.pi / 2, dtype=F64), rtol=0, atol=1e-12)


def test_change_of_basis_changes_no_angle():
    g = gen(3)
    X = torch.randn(15, 4, generator=g, dtype=F64)
    Y = torch.randn(15, 6, generator=g, dtype=F64)
    TX = torch.randn(4, 4, generator=g, dtype=F64) + 2 * torch.eye(4, dtype=F64)
    TY = torch.randn(6, 6, generator=g, dtype=F64) + 2 * torch.eye(6, dtype=F64)
    assert_close(principal_angles(X @ TX, Y @ TY), principal_angles(X, Y), **TOL)


@pytest.mark.parametrize("extra_q", [0, 2])
def test_constructed_rotations_give_their_angles(extra_q):
    thetas = [0.3, 1.2, 0.05, math.pi / 4, 1.5]
    X, Y = rotated_pair(thetas, extra_q=extra_q, d=16)
    expected = torch.tensor(sorted(thetas), dtype=F64)
    assert_close(principal_angles(X, Y), expected, **TOL)
    assert_close(principal_angles(Y, X), expected, **TOL)
    assert_close(principal_angles(X, Y, orthonormal=True), expected, **TOL)


def test_small_angles_keep_full_precision():
    thetas = [1e-7, 3e-8, 2.5e-7, 1e-9]
    X, Y = rotated_pair(thetas, d=12, seed=4)
    got = principal_angles(X, Y)
    # arccos(cos θ) would only resolve these to ~1e-8; the sine formula gets ~1e-16.
    assert_close(got, torch.tensor(sorted(thetas), dtype=F64), rtol=0, atol=1e-12)


def test_small_angles_stay_precise_next_to_large_ones():
    # scipy.linalg.subspace_angles (1.17) pairs its small-angle mask with the reversed angle order, so a
    # tiny angle next to a large one falls back to arccos there (~2e-9 off here); not here.
    thetas = [1e-7, 1.2, 4e-8]
    X, Y = rotated_pair(thetas, d=10, seed=11)
    assert_close(principal_angles(X, Y), torch.tensor(sorted(thetas), dtype=F64), rtol=0, atol=1e-12)


def test_principal_angles_batched_and_empty():
    g = gen(5)
    Q = torch.linalg.qr(torch.randn(3, 9, 4, generator=g, dtype=F64)).Q
    R = torch.linalg.qr(torch.randn(3, 9, 2, generator=g, dtype=F64)).Q
    batched = principal_angles(Q, R, orthonormal=True)
    assert batched.shape == (3, 2)
    for b in range(3):
        assert_close(batched[b], principal_angles(Q[b], R[b]), **TOL)
    assert principal_angles(torch.zeros(9, 2, dtype=F64), Q[0]).shape == (0,)


def test_principal_angles_reject_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(torch.randn(5, 2), torch.randn(6, 2))


@pytest.mark.parametrize("extra_q", [0, 3])
def test_grassmann_distance_closed_form(extra_q):
    thetas = [0.2, 0.9, 1.4]
    X, Y = rotated_pair(thetas, extra_q=extra_q, d=14, seed=6)
    expected = math.sqrt(sum(t * t for t in thetas) + extra_q * (math.pi / 2) ** 2)
    assert_close(grassmann_distance(X, Y), torch.tensor(expected, dtype=F64), **TOL)
    assert_close(grassmann_distance(Y, X), torch.tensor(expected, dtype=F64), **TOL)


@pytest.mark.parametrize(("p", "q"), [(3, 3), (2, 5), (6, 1)])
def test_projection_distance_matches_dense_projectors(p, q):
    g = gen(7 + p + q)
    X = torch.randn(11, p, generator=g, dtype=F64)
    Y = torch.randn(11, q, generator=g, dtype=F64)
    dense = torch.linalg.matrix_norm(dense_projector(X) - dense_projector(Y))
    assert_close(projection_distance(X, Y), dense, **TOL)
    cos2 = torch.cos(principal_angles(X, Y)).square().sum()
    assert_close(projection_distance(X, Y), torch.sqrt(p + q - 2 * cos2), **TOL)


def test_distances_vanish_for_the_same_subspace():
    X = torch.randn(8, 3, generator=gen(8), dtype=F64)
    assert_close(grassmann_distance(X, 2 * X), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-12)
    assert_close(projection_distance(X, 2 * X), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-12)


def test_subspace_similarity_is_the_mean_squared_cosine():
    g = gen(9)
    U1 = torch.linalg.qr(torch.randn(20, 5, generator=g, dtype=F64)).Q
    U2 = torch.linalg.qr(torch.randn(20, 7, generator=g, dtype=F64)).Q
    phi = subspace_similarity(U1, U2)
    assert phi.shape == (5, 7)
    for a in range(1, 6):
        for b in range(1, 8):
            cos2 = torch.cos(principal_angles(U1[:, :a], U2[:, :b], orthonormal=True)).square()
            assert_close(phi[a - 1, b - 1], cos2.mean(), **TOL)
            direct = torch.linalg.matrix_norm(U1[:, :a].mT @ U2[:, :b]).square() / min(a, b)
            assert_close(phi[a - 1, b - 1], direct, **TOL)


def test_subspace_similarity_range_symmetry_and_identity():
    g = gen(10)
    U1 = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=F64)).Q
    U2 = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=F64)).Q
    phi = subspace_similarity(U1, U2, i=3, j=5)
    assert phi.shape == (3, 5)
    assert bool(((phi >= 0) & (phi <= 1)).all())
    assert_close(subspace_similarity(U2, U1, i=5, j=3), phi.mT, **TOL)
    # A subspace against itself: φ(a, b) = 1 (the smaller one lies inside the larger one).
    assert_close(subspace_similarity(U1, U1), torch.ones(4, 4, dtype=F64), **TOL)
    with pytest.raises(ValueError, match="1 <= i"):
        subspace_similarity(U1, U2, i=5)
