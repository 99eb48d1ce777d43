"""Property-based checks: every metric stays finite and in its range over shapes, ranks and dtypes."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loft_probe.metrics import (
    cosine,
    grassmann_distance,
    intruder_dimensions,
    lowrank_svd,
    lowrank_update,
    principal_angles,
    projection_distance,
    projection_residuals,
    r90,
    stable_rank,
    subspace_similarity,
    update_cosine,
)

SETTINGS = settings(max_examples=25, deadline=None)
RIGHT_ANGLE = math.pi / 2 + 1e-6  # float32 rounds π/2 up


@st.composite
def factor_case(draw):
    """(m, n), a rank-`rank` left factor B (m, r) and right factor A (r, n), G, in float32 or float64.

    r may exceed the rank: extra columns are combinations of the others (rank-deficient adapters),
    and rank 0 (all-zero factors, as PEFT initialises B) is included.
    """
    m = draw(st.integers(2, 12))
    n = draw(st.integers(2, 12))
    r = draw(st.integers(1, min(m, n)))
    rank = draw(st.integers(0, r))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    B = torch.randn(m, rank, generator=g, dtype=dtype) @ torch.randn(rank, r, generator=g, dtype=dtype)
    A = torch.randn(r, rank, generator=g, dtype=dtype) @ torch.randn(rank, n, generator=g, dtype=dtype)
    G = torch.randn(m, n, generator=g, dtype=dtype)
    return B, A, G


def finite(*xs: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


@SETTINGS
@given(factor_case())
def test_angles_and_distances_in_range(case):
    B, A, G = case
    for X, Y in ((B, G), (B, G @ A.mT), (B, B), (G, A.mT)):  # the second pair: both rank-deficient
        if X.shape[0] != Y.shape[0]:
            continue
        theta = principal_angles(X, Y)
        assert finite(theta)
        assert bool(((theta >= 0) & (theta <= RIGHT_ANGLE)).all())
        assert finite(grassmann_distance(X, Y), projection_distance(X, Y))
        assert float(projection_distance(X, Y)) <= math.sqrt(X.shape[1] + Y.shape[1]) + 1e-5


@SETTINGS
@given(factor_case())
def test_similarity_residuals_and_cosines_in_range(case):
    B, A, G = case
    U = lowrank_svd(B, A).U
    U2 = torch.linalg.qr(G).Q
    phi = subspace_similarity(U, U2[:, : min(U2.shape[1], 4)])
    assert finite(phi) and bool(((phi >= 0) & (phi <= 1)).all())
    res = projection_residuals(G, B, A)
    for x in res:
        assert finite(x) and 0.0 <= float(x) <= 1.0
    for c, inputs in ((cosine(G, B @ A), (G, B @ A)), (update_cosine(lowrank_update(B, A, B + 1, A, 2.0), G),
                                                       (G, (B + 1) @ A - B @ A))):
        if any(float(x.norm()) == 0.0 for x in inputs):  # undefined with a zero vector, and only then
            assert math.isnan(float(c))
        else:
            assert finite(c) and -1.0 <= float(c) <= 1.0


@SETTINGS
@given(factor_case())
def test_spectra_finite_on_rank_deficient_updates(case):
    B, A, G = case
    out = lowrank_svd(B, A, -1.5)
    assert finite(*out)
    assert bool((out.S >= 0).all())
    assert 0 <= int(r90(out.S)) <= out.S.shape[0]
    sr = stable_rank(out.S)
    if float(out.S.max()) == 0.0:  # ΔW = 0: undefined
        assert math.isnan(float(sr))
    else:
        assert finite(sr) and 0.0 <= float(sr) <= out.S.shape[0] + 1e-4
    k = min(3, min(G.shape))
    count = intruder_dimensions(G, G + B @ A, k=k)
    assert 0 <= int(count) <= k
