"""A pair's sides as the recorded step forms them: LoFT's reconstruction in work buffers, in the weight's layout
on both sides, equals the dense formula; side metrics taken in a subspace's coordinates equal those of the
projections formed in full (float64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import F64, randn
from torch.testing import assert_close

from loft_probe import LoFT, add_lora
from loft_probe.lora import lora_pairs
from loft_probe.metrics import preconditioned_direction
from loft_probe.probe import measure
from loft_probe.probe.layouts import layout_of
from loft_probe.probe.layouts.pairs import PairSubspaces, Side, lift_factor_state


def trained_pair(steps: int, projected_update: bool = True):
    """A float64 LoFT pair (B ≠ 0) after ``steps`` steps: odd counts end on a B-step, even ones on an A-step."""
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(9, 7, bias=False)).double(), rank=3, targets=["0"])
    pair = lora_pairs(model)[0]
    with torch.no_grad():
        pair.B.copy_(randn(*pair.B.shape, seed=1))
    kwargs = {} if projected_update else dict(projected_update=False, second_moment="simple")
    optimizer = LoFT.from_model(model, lr=1e-2, **kwargs)
    for t in range(steps):
        optimizer.zero_grad()
        model(randn(20, 9, seed=10 + t)).pow(2).sum().backward()
        optimizer.step()
    return optimizer, pair


@pytest.mark.parametrize("steps", [3, 4], ids=["B-step", "A-step"])
@pytest.mark.parametrize("projected_update", [True, False], ids=["projected", "factor-space"])
def test_loft_side_in_work_buffers_is_the_dense_formula(steps, projected_update):
    optimizer, pair = trained_pair(steps, projected_update)
    group = optimizer.param_groups[0]
    scratch = measure.Scratch()
    (side,) = layout_of(optimizer).pair_sides(optimizer, group, pair, F64, scratch=scratch)
    (fresh,) = layout_of(optimizer).pair_sides(optimizer, group, pair, F64)
    moments = optimizer.full_space_moments(group)
    M, V, Q = moments.first, moments.second, moments.basis.to(F64)
    # the dense formula: B-step (M = m·Qᵀ, projection X·Q·Qᵀ), A-step (its transpose, projection Q·Qᵀ·X)
    project = (lambda X: X @ Q @ Q.T) if steps % 2 else (lambda X: Q @ Q.T @ X)
    assert side.name == ("b" if steps % 2 else "a") and side.within is projected_update
    for got in (side, fresh):
        assert got.first.is_contiguous() and got.second.is_contiguous()
        assert_close(got.first, M, rtol=1e-12, atol=1e-15)
        assert_close(got.second, V, rtol=1e-12, atol=1e-15)
        assert_close(got.direction, preconditioned_direction(M, V, group["eps"]), rtol=1e-12, atol=1e-15)
        assert_close(got.subspace.project(got.direction), project(got.direction), rtol=1e-12, atol=1e-15)
    if projected_update:  # the moment lies in the subspace
        assert_close(project(M), M, rtol=1e-10, atol=1e-13)
    assert side.first.data_ptr() == scratch.like("side first", M).data_ptr()  # in the work buffers


def random_sides() -> tuple[list[Side], measure.DenseMoments, measure.Quantities]:
    """A LoRA pair's two lifted sides (moments and directions) and a shadow's moments, all float64."""
    B, A = randn(7, 3, seed=1), randn(3, 5, seed=2)
    sides = lift_factor_state(B, A, 2.0, [randn(7, 3, seed=3), randn(3, 5, seed=4)],
                              [randn(7, 3, seed=5).square(), randn(3, 5, seed=6).square()], eps=1e-8)
    q = measure.Quantities(measure.Scratch())
    shadow = measure.DenseMoments(q, "shadow direction", randn(7, 5, seed=7), randn(7, 5, seed=8).square(), 1e-8)
    return sides, shadow, q


def test_side_metrics_in_coordinates_equal_the_formed_projections():
    sides, shadow, q = random_sides()
    in_coordinates = measure.side_metrics(q, sides, shadow)
    formed = [dataclasses.replace(side, within=False) for side in sides]
    _, shadow_again, q_again = random_sides()
    in_full = measure.side_metrics(q_again, formed, shadow_again)
    assert in_coordinates.keys() == in_full.keys() == {
        "shadow_m_proj_rel_error", "shadow_m_proj_cosine", "shadow_m_proj_cosine_b", "shadow_m_proj_cosine_a",
        "shadow_precond_proj_cosine"}
    for name, value in in_full.items():
        assert in_coordinates[name] == pytest.approx(value, rel=1e-12, abs=1e-14)


def test_a_subspace_projection_is_orthogonal_and_its_coordinates_keep_norms():
    spaces = PairSubspaces(randn(7, 3, seed=1), randn(3, 5, seed=2), 2.0)
    X, Y = randn(7, 5, seed=3), randn(7, 5, seed=4)
    for subspace in (spaces.subspace_b(), spaces.subspace_a()):
        P_X, P_Y = subspace.project(X), subspace.project(Y)
        assert_close(subspace.project(P_X), P_X, rtol=1e-12, atol=1e-14)  # idempotent
        assert_close((X * P_Y).sum(), (P_X * P_Y).sum(), rtol=1e-12, atol=1e-14)  # symmetric
        assert_close((P_X * P_Y).sum(), (subspace.coordinates(X) * subspace.coordinates(Y)).sum(),
                     rtol=1e-12, atol=1e-14)
        assert_close(P_X.norm(), subspace.coordinates(X).norm(), rtol=1e-12, atol=1e-14)
