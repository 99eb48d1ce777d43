"""Matrix factorisation: the synthetic task of the LoFT paper.

Fit a rank-r target W* = A*·B* (A*: m×r, B*: r×n, standard normal) with a single bias-free
Linear(n, m) whose weight starts at zero. The input is the n×n identity, so the model's output is
exactly its weight transposed and the loss measures ‖W − W*‖² entry by entry. Starting from zero
means a LoRA run's effective weight is exactly s·B·A, like the paper's `lora_B(lora_A(x))`.

References:
    N. Tastan et al., "LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning", ICLR 2026
    (arXiv:2505.21289), the matrix-factorisation experiment.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loft_probe.tasks.base import Task, device_of, evaluating, make_config, seeded_rng

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class MatFactConfig:
    m: int = 1024  # rows of W*: the Linear's output size
    n: int = 512  # columns of W*: the Linear's input size and the size of the identity input
    target_rank: int = 8  # rank r of W* = A*·B*; also the suggested LoRA rank
    dtype: str = "float32"  # "float32" or "float64" for the model, input and target

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1:
            raise ValueError(f"m and n must be positive, got m={self.m}, n={self.n}")
        if not 1 <= self.target_rank <= min(self.m, self.n):
            raise ValueError(
                f"target_rank must be in [1, min(m, n)] = [1, {min(self.m, self.n)}], got {self.target_rank}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


class MatFactModel(nn.Module):
    """x (b, n) ↦ x·Wᵀ (b, m) through `proj`, a bias-free Linear(n, m) whose weight W starts at zero."""

    def __init__(self, m: int, n: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(n, m, bias=False, dtype=dtype)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def matfact_target(m: int, n: int, rank: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W* = A*·B* (m, n) with A* (m, rank) and B* (rank, n) standard normal, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=generator, dtype=dtype)  # (m, r)
    b = torch.randn(rank, n, generator=generator, dtype=dtype)  # (r, n)
    return a @ b  # (m, n)


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error between model(x) (n, m) and W*ᵀ (n, m); with x = I this is mean((W − W*)²)."""
    device = device_of(model)
    x, target = batch
    return F.mse_loss(model(x.to(device)), target.to(device))


def build(seed: int = 0, **options) -> Task:
    """The matrix-factorisation task; options are the fields of `MatFactConfig`."""
    cfg = make_config(MatFactConfig, "matfact", options)
    dtype = DTYPES[cfg.dtype]
    with seeded_rng(seed):
        model = MatFactModel(cfg.m, cfg.n, dtype)
    x = torch.eye(cfg.n, dtype=dtype)  # (n, n)
    target = matfact_target(cfg.m, cfg.n, cfg.target_rank, seed, dtype).T.contiguous()  # (n, m) = W*ᵀ
    batch = (x, target)

    def evaluate(model: nn.Module) -> dict[str, float]:
        with evaluating(model):
            return {"loss": mse_loss(model, batch).item()}

    return Task(
        name="matfact",
        model=model,
        lora_targets=("proj",),
        trainable_extra=(),
        # The one batch is the whole identity: there is nothing for the seed to shuffle.
        batches=lambda seed: itertools.repeat(batch),
        loss=mse_loss,
        evaluate=evaluate,
        defaults={
            "steps": 300,
            # lora/loft: the paper's Adam lr. full: Adam from W = 0 with eps 1e-4 reaches mse < 1e-9 in
            # 220 steps at lr 1 (lr 0.5 stalls at 2e-5 after 300 steps) on the default sizes.
            "lr": {"full": 1.0, "lora": 10.0, "loft": 10.0},
            "rank": cfg.target_rank,
            "alpha": cfg.target_rank,  # scaling alpha / rank = 1: the paper's plain lora_B(lora_A(x))
            "eps": 1e-4,
            "betas": (0.9, 0.999),
            "weight_decay": 0.0,  # any decay keeps W away from W*, so the loss could never reach zero
        },
    )
