"""The matrix-factorisation experiment of the LoFT paper (spec: docs/loft-spec.md, "Known facts")."""

from __future__ import annotations

import math

import pytest
import torch

from loft_probe.optim import LoFT


def factorisation_loss(seed: int, init: str, steps: int = 300, **switches) -> float:
    """MSE of ``s·B·A`` against ``W* = A*·B*`` (1024×512, rank 8) after ``steps`` LoFT steps, s = 1."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(1024, 8, generator=gen) @ torch.randn(8, 512, generator=gen)  # (m, n)
    torch.manual_seed(seed)  # nn.Linear's own initialisation draws from the global generator
    lora_A, lora_B = torch.nn.Linear(512, 8, bias=False), torch.nn.Linear(8, 1024, bias=False)
    if init == "peft":
        torch.nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(lora_B.weight)
    B, A = lora_B.weight, lora_A.weight
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=10.0, betas=(0.9, 0.999), eps=1e-4, **switches)
    for _ in range(steps):
        opt.zero_grad()
        loss = (B @ A - target).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((B @ A - target).pow(2).mean())


@pytest.mark.slow
@pytest.mark.parametrize("init", ["linear", "peft"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loft_solves_the_factorisation(seed, init):
    assert factorisation_loss(seed, init) < 1e-9
