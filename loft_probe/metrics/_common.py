"""Private helpers shared by the metric modules: dtype policy, the undefined-ratio rule, argument checks."""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(*xs: Tensor) -> tuple[Tensor, ...]:
    """Cast tensors to one working dtype: float64 if any input is float64, else float32.

    Half precision (bf16, fp16) and integer inputs are upcast to float32: no metric is computed in
    16-bit arithmetic.
    """
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    return tuple(x if x.dtype == dtype else x.to(dtype) for x in xs)


def ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, and NaN where den == 0: a cosine with a zero vector, a residual of G = 0, a
    size relative to nothing is *undefined*, never a number a reader could take at face value. The probe
    records an undefined value as a missing row (``loft_probe.probe.measure``), so NaN in a run's record
    always means the training itself produced a non-finite number."""
    positive = den > 0
    return torch.where(
        positive, num / torch.where(positive, den, torch.ones_like(den)), torch.full_like(num, float("nan"))
    )


def check_matrix(name: str, x: Tensor, batched: bool = True) -> None:
    """Raise ValueError unless x is a matrix (2-D, or (..., m, n) when batched)."""
    if x.ndim < 2 or (not batched and x.ndim != 2):
        allowed = "(..., m, n)" if batched else "(m, n)"
        raise ValueError(f"{name} must have shape {allowed}, got {tuple(x.shape)}")


def check_same_rows(x_name: str, x: Tensor, y_name: str, y: Tensor) -> None:
    """Raise ValueError unless x and y have the same number of rows (ambient dimension)."""
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(
            f"{x_name} and {y_name} must have the same number of rows, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
