"""Where LoFT's α-dependence in float32 comes from: one digits run at α = 8 and α = 24 (rank 8), float64, float32.

LoFT's trajectory is α-invariant in exact arithmetic. Prints the relative difference of the training losses of
the two runs at a few steps, in each dtype: float64 shows the invariance (~1e-12), float32 shows rounding that
the steps amplify. Usage: OMP_NUM_THREADS=1 python benchmarks/alpha_rounding.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import loft_probe
from loft_probe.tasks import build_task

RANK, ALPHAS, STEPS, SHOWN = 8, (8.0, 24.0), 50, (2, 5, 10, 20, 50)


def losses(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """Training losses (STEPS,) of LoFT on digits at this α, the model and data in `dtype`."""
    task = build_task("digits", seed=0)
    model = task.model.to(dtype)
    torch.manual_seed(0)  # LoRA's A initialisation: the same for both α
    loft_probe.add_lora(model, RANK, alpha, targets=list(task.lora_targets))
    model.head.requires_grad_(True)
    optimizer = loft_probe.LoFT.from_model(model, lr=1e-2)
    batches, out = task.batches(0), []
    for _ in range(STEPS):
        x, y = next(batches)
        loss = F.cross_entropy(model(x.to(dtype)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return torch.tensor(out, dtype=torch.float64)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for dtype in (torch.float64, torch.float32):
        a, b = (losses(alpha, dtype) for alpha in ALPHAS)
        relative = (a - b).abs() / a.abs()
        print(f"{dtype}: |loss(α={ALPHAS[0]:g}) − loss(α={ALPHAS[1]:g})| / loss at steps {SHOWN}: "
              + ", ".join(f"{relative[s - 1]:.1e}" for s in SHOWN))
