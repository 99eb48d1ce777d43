"""Small helpers the numerical tests share: float64, tight tolerances, seeded random tensors."""

from __future__ import annotations

import torch

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 math tests


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)
