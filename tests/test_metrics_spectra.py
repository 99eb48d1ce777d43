"""Spectral metrics of ΔW against dense formulas; intruder dimensions on constructed spikes."""

import math

import pytest
import torch
from helpers import F64, TOL, randn
from torch.testing import assert_close

from loft_probe.metrics import (
    SVD,
    LowRank,
    amplification,
    intruder_counts,
    intruder_dimensions,
    intruder_scores,
    intruder_scores_lowrank,
    lowrank_svd,
    lowrank_update,
    r90,
    relative_size,
    stable_rank,
)


def brute_r90(S: torch.Tensor, fraction: float = 0.9) -> int:
    energy = sorted((float(s) ** 2 for s in S), reverse=True)
    total, running = sum(energy), 0.0
    for k, e in enumerate(energy, start=1):
        running += e
        if running >= fraction * total:
            return k
    return len(energy)


def test_r90_matches_brute_force_and_edge_cases():
    S = randn(5, 12, seed=0).abs()
    got = r90(S)
    assert got.shape == (5,) and got.dtype == torch.int64
    assert got.tolist() == [brute_r90(row) for row in S]
    assert r90(S[0], fraction=0.5).item() == brute_r90(S[0], 0.5)
    assert r90(torch.tensor([1.0, 3.0], dtype=F64)).item() == 1  # 9 of 10: an exact tie counts; any order
    assert r90(torch.zeros(4, dtype=F64)).item() == 0
    assert r90(torch.ones(10, dtype=F64)).item() == 9
    with pytest.raises(ValueError, match="fraction"):
        r90(S, fraction=0.0)


def test_stable_rank_matches_dense_norms():
    M = randn(3, 9, 6, seed=1)
    dense = torch.linalg.matrix_norm(M).square() / torch.linalg.matrix_norm(M, ord=2).square()
    assert_close(stable_rank(torch.linalg.svdvals(M)), dense, **TOL)
    assert math.isnan(float(stable_rank(torch.zeros(5, dtype=F64))))
    assert_close(stable_rank(torch.ones(7, dtype=F64)), torch.tensor(7.0, dtype=F64), **TOL)


def test_relative_size_dense_lowrank_and_cached_norm():
    W0 = randn(12, 10, seed=2)
    B0, A0, B1, A1 = randn(12, 3, seed=3), randn(3, 10, seed=4), randn(12, 3, seed=5), randn(3, 10, seed=6)
    delta = lowrank_update(B0, A0, B1, A1, 0.25)
    dense = delta.B @ delta.A
    expected = torch.linalg.matrix_norm(dense) / torch.linalg.matrix_norm(W0)
    assert_close(relative_size(dense, W0), expected, **TOL)
    assert_close(relative_size(delta, W0), expected, **TOL)
    assert_close(relative_size(delta, float(torch.linalg.matrix_norm(W0))), expected, **TOL)
    assert math.isnan(float(relative_size(dense, torch.zeros_like(W0))))


def test_amplification_matches_the_dense_formula():
    W0 = randn(15, 11, seed=7)
    B, A = randn(15, 4, seed=8), randn(4, 11, seed=9)
    dW = 0.3 * B @ A
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    for r in (1, 2, 4):
        expected = torch.linalg.matrix_norm(dW) / torch.linalg.matrix_norm(U[:, :r].mT @ W0 @ Vh[:r].mT)
        assert_close(amplification(*lowrank_svd(B, A, 0.3), W0, r), expected, **TOL)
    with pytest.raises(ValueError, match="r must be"):
        amplification(*lowrank_svd(B, A), W0, 5)


def spiked(m: int, n: int, seed: int):
    """W0 random and a large rank-1 spike on an even mix of W0's 10 weakest singular directions.

    The spike's direction has |⟨u, u0_i⟩| = 1/sqrt(10) ≈ 0.32 for 10 of W0's vectors and 0 for the
    others, and W0's top singular pairs stay exact singular pairs of W0 + spike (the spike is
    orthogonal to them on both sides): exactly one intruder among the top k = 10 at ε = 0.5.
    """
    W0 = randn(m, n, seed=seed)
    U0, S0, Vh0 = torch.linalg.svd(W0, full_matrices=False)
    u = U0[:, -10:].sum(1, keepdim=True) / 10**0.5  # (m, 1)
    v = Vh0[-10:].sum(0, keepdim=True) / 10**0.5  # (1, n)
    spike = LowRank(10 * S0[0] * u, v)
    return W0, SVD(U0, S0, Vh0), spike


@pytest.mark.parametrize(("m", "n"), [(40, 40), (50, 30), (30, 45)])
def test_one_spike_creates_exactly_one_intruder(m, n):
    W0, _, spike = spiked(m, n, seed=10)
    W1 = W0 + spike.B @ spike.A
    scores = intruder_scores(W0, W1)
    assert 0.2 < float(scores[0]) < 0.45  # the spike comes first and matches nothing in W0
    assert_close(scores[1:], torch.ones(9, dtype=F64), rtol=0, atol=1e-10)
    assert intruder_dimensions(W0, W1).item() == 1
    assert intruder_dimensions(W0, W1, side="right").item() == 1
    sweep = intruder_dimensions(W0, W1, eps=torch.tensor([0.1, 0.5, 1.5], dtype=F64))
    assert sweep.tolist() == [0, 1, 10]


def test_no_change_means_no_intruder():
    W0 = randn(20, 16, seed=11)
    assert intruder_dimensions(W0, W0.clone(), k=10).item() == 0
    assert intruder_dimensions(W0, W0.clone(), k=10, side="right").item() == 0
    base = SVD(*torch.linalg.svd(W0, full_matrices=False))
    zero = LowRank(torch.zeros(20, 2, dtype=F64), torch.zeros(2, 16, dtype=F64))
    scores = intruder_scores_lowrank(base, zero, 10)
    assert_close(scores, torch.ones(10, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("m", "n"), [(40, 40), (50, 30), (30, 45)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_lowrank_intruder_scores_match_dense(m, n, side, method):
    W0, base, spike = spiked(m, n, seed=12)
    got = intruder_scores_lowrank(base, spike, 10, side=side, method=method)
    assert_close(got, intruder_scores(W0, W0 + spike.B @ spike.A, 10, side=side), rtol=0, atol=1e-8)
    # A generic LoRA update (rank ≤ 2r, not aligned with anything in W0).
    delta = lowrank_update(
        randn(m, 3, seed=13), randn(3, n, seed=14), randn(m, 3, seed=15), randn(3, n, seed=16), 2.0
    )
    got = intruder_scores_lowrank(base, delta, 8, side=side, method=method)
    assert_close(got, intruder_scores(W0, W0 + delta.B @ delta.A, 8, side=side), rtol=0, atol=1e-8)


def test_intruder_arguments_are_checked():
    W0, base, spike = spiked(30, 20, seed=17)
    with pytest.raises(ValueError, match="side"):
        intruder_scores(W0, W0, side="up")
    with pytest.raises(ValueError, match="k must be"):
        intruder_scores(W0, W0, k=21)
    with pytest.raises(ValueError, match="complete thin SVD"):
        intruder_scores_lowrank(SVD(base.U[:, :5], base.S[:5], base.Vh[:5]), spike)
    with pytest.raises(ValueError, match="method"):
        intruder_scores_lowrank(base, spike, method="power")
    with pytest.raises(ValueError, match="1-D"):
        intruder_counts(torch.rand(3, 4), torch.rand(2, 2))
