"""The recorded step's shared quantities (norms and inner products taken once, work buffers reused) give the
dense formulas of loft_probe.metrics, in float64."""

from __future__ import annotations

import torch
from helpers import TOL, randn
from torch.testing import assert_close

from loft_probe import metrics
from loft_probe.probe.measure import DenseMoments, Quantities, Scratch


def test_quantities_give_the_dense_cosine_and_relative_error_of_one_matrix_and_of_two_sides_together():
    X, Y, Z, W = (randn(7, 5, seed=s) for s in range(4))
    q = Quantities(Scratch())
    assert_close(q.cosine([q(X)], [q(Y)]), metrics.cosine(X, Y), **TOL)
    assert_close(q.relative_error([q(X)], [q(Y)]), metrics.relative_error(X, Y), **TOL)
    both = (-3, -2, -1)
    assert_close(q.cosine([q(X), q(Z)], [q(Y), q(W)]), metrics.cosine(torch.stack([X, Z]), torch.stack([Y, W]),
                                                                        dim=both), **TOL)
    assert_close(q.relative_error([q(X), q(Z)], [q(Y), q(W)]),
                 metrics.relative_error(torch.stack([X, Z]), torch.stack([Y, W]), dim=both), **TOL)
    assert_close(q.cosine([q(X.mT)], [q(Y.mT)]), metrics.cosine(X, Y), **TOL)  # not contiguous: no dot product
    assert q(X) is q(X) and torch.isnan(q.cosine([q(X)], [q(torch.zeros_like(X))]))  # undefined at zero



def test_a_freed_16_bit_temporary_does_not_lend_its_quantity_to_the_next_tensor():
    """Quantities are found by id; a 16-bit tensor is upcast, and a temporary freed after the call could leave its
    id to the next tensor, which would then read the first one's numbers."""
    q = Quantities(Scratch())
    quantities = [q(torch.full((64, 64), float(k), dtype=torch.bfloat16)) for k in range(8)]  # each freed at once
    assert [float(quantity.norm) for quantity in quantities] == [64.0 * k for k in range(8)]

def test_moments_direction_is_formed_once_in_its_buffer():
    m, v = randn(6, 4, seed=0), randn(6, 4, seed=1).abs()
    q = Quantities(Scratch())
    moments = DenseMoments(q, "direction", m, v, eps=1e-3)
    assert moments.direction is moments.direction
    assert_close(moments.direction.x, metrics.preconditioned_direction(m, v, 1e-3), rtol=0, atol=0)


def test_residuals_and_directions_written_into_given_buffers_equal_new_memory():
    G, B, A = randn(9, 11, seed=0), randn(9, 3, seed=1), randn(3, 11, seed=2)
    out = torch.full_like(G, float("nan"))
    for given, fresh in zip(metrics.projection_residuals(G, B, A, out=out), metrics.projection_residuals(G, B, A),
                            strict=True):
        assert_close(given, fresh, rtol=0, atol=0)
    v = randn(9, 11, seed=3).abs()
    assert_close(metrics.preconditioned_direction(G, v, 1e-8, out=out), G / (v.sqrt() + 1e-8), rtol=0, atol=0)
    update = randn(9, 11, seed=4)
    assert_close(metrics.update_lr_ratio(update, 0.1, norm=update.norm()), metrics.update_lr_ratio(update, 0.1),
                 **TOL)
