"""The true full-weight gradient of a LoRA layer, ``G = ∂L/∂W`` (m×n), captured from the layer's input and
the gradient of its output (the frozen base weight has no ``.grad`` of its own)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GradCapture:
    """Accumulates ``G += ∂L/∂yᵀ·x`` over every backward pass while active (gradient accumulation sums,
    as ``.grad`` does) until :meth:`reset`.

    The module's input is kept alive from the forward to the backward pass: capture costs activation memory,
    which is why it is optional, plus one m×n buffer (float32, or float64 for float64 layers) kept between
    steps. ``y`` is the whole layer's output: the same G for every adapter of a layer. With LoRA dropout the
    factors see a dropped-out input, so ``g_B = s·G·Aᵀ`` then holds only in expectation, and residuals and
    shadow comparisons are approximate.
    """

    def __init__(self, module: nn.Module, shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.active = False
        self.grad: Tensor | None = None  # (m, n), allocated on first use and reused
        self.filled = False
        self.bound: Tensor | None = None  # ≥ every |G_ij| (0-dim), or None: not taken (see entry_bound)
        self._handle = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if not (self.active and torch.is_grad_enabled() and args and isinstance(output, Tensor)
                and output.requires_grad):
            return
        x = args[0].detach()
        output.register_hook(lambda grad_out: self._accumulate(grad_out, x))

    def _accumulate(self, grad_out: Tensor, x: Tensor) -> None:
        m, n = self.shape
        g = grad_out.detach().reshape(-1, m).to(self.dtype)  # (tokens, m)
        inputs = x.reshape(-1, n).to(self.dtype)  # (tokens, n)
        bound = entry_bound(g, inputs)
        if self.filled:  # accumulating: the bounds add up
            bound = None if bound is None or self.bound is None else self.bound + bound
        self.bound = bound
        if self.grad is None:
            self.grad = g.T @ inputs
        elif not self.filled:
            torch.mm(g.T, inputs, out=self.grad)
        else:
            self.grad.addmm_(g.T, inputs)
        self.filled = True

    def certifies_finite(self) -> bool:
        """Whether the accumulated G is finite, known without reading it: its entries are at most ``bound``, a
        quarter of the dtype's largest number at most (the products' rounding, a factor 1 + tokens·ε, cannot
        reach inf), and the inputs it was formed from were finite (else the bound is NaN or inf)."""
        return self.bound is not None and bool(self.bound < torch.finfo(self.dtype).max / 4)

    def take(self) -> Tensor | None:
        """The accumulated G (m×n), or None when no backward pass ran since the last reset."""
        return self.grad if self.filled else None

    def reset(self) -> None:
        self.filled = False

    def remove(self) -> None:
        self._handle.remove()


def entry_bound(g: Tensor, x: Tensor) -> Tensor | None:
    """``‖g‖·‖x‖`` (0-dim) for g (tokens×m) and x (tokens×n): every entry of ``gᵀ·x`` is at most
    ``‖g_:i‖·‖x_:j‖`` (Cauchy–Schwarz), so at most this; NaN or inf when an input is. None where reading the
    inputs would cost more than reading ``gᵀ·x`` (tokens·(m + n) ≥ m·n: large batches), which is then checked."""
    if g.numel() + x.numel() >= g.shape[1] * x.shape[1]:
        return None
    return torch.linalg.vector_norm(g) * torch.linalg.vector_norm(x)
