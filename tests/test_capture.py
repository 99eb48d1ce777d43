"""The captured G's finiteness, certified from the inputs it is formed from (no pass over G) where that is the
cheaper read, and checked on G otherwise; a non-finite G is still flagged and kept out of the shadow."""

from __future__ import annotations

import torch
from helpers import F64, randn

from loft_probe import add_lora, attach, load_run
from loft_probe.lora import lora_pairs
from loft_probe.probe.capture import GradCapture, entry_bound


def test_the_bound_bounds_every_entry_and_is_skipped_for_large_batches():
    g, x = randn(8, 64, seed=1), randn(8, 48, seed=2)
    assert (g.T @ x).abs().max() <= entry_bound(g, x)
    assert entry_bound(randn(64, 8, seed=1), randn(64, 6, seed=2)) is None  # tokens·(m + n) ≥ m·n


def captured(x: torch.Tensor, passes: int = 1, loss_scale: float = 1.0) -> GradCapture:
    """A capture of a 64×64 linear layer's G over ``passes`` backward passes of the batch x (8 × 64)."""
    layer = torch.nn.Linear(64, 64, bias=False).double()
    capture = GradCapture(layer, (64, 64), F64)
    capture.active = True
    for _ in range(passes):
        (layer(x).sum() * loss_scale).backward()
    return capture


def test_a_capture_certifies_finite_inputs_and_not_others():
    assert captured(randn(8, 64, seed=1), passes=3).certifies_finite()
    assert not captured(randn(8, 64, seed=1).index_fill_(1, torch.tensor([3]), float("nan"))).certifies_finite()
    huge = captured(randn(8, 64, seed=1) * 1e200, loss_scale=1e200)  # finite inputs whose products overflow
    assert not huge.certifies_finite() and not torch.isfinite(huge.take()).all()


def test_nonfinite_gradients_are_flagged_with_the_certificate_in_use(tmp_path):
    """Wide layers, few rows: the capture certifies G; an inf input fails the certificate and G is checked."""
    torch.manual_seed(0)
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).double(), rank=2, targets=["0"])
    with torch.no_grad():
        lora_pairs(model)[0].B.normal_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probe = attach(model, optimizer, tmp_path / "run", every=1, shadow=True)
    certified = []
    for t in range(3):
        x = randn(4, 64, seed=t)
        if t == 2:
            x[0, 0] = float("inf")
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        certified.append(probe.layers[0].capture.certifies_finite())
        optimizer.step()
    probe.close()
    assert certified == [True, True, False]
    flagged = load_run(tmp_path / "run").metrics.query("metric == 'nonfinite_grad'")
    assert flagged[["step", "layer"]].values.tolist() == [[3, "0"]]
    assert probe.layers[0].shadow.step == 2  # the non-finite G is kept out
