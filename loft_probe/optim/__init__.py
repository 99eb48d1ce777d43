"""The LoFT optimizer, its math (``functional``) and a slow literal twin (``reference``)."""

from loft_probe.optim.loft import LoFT, clip_grad_norm_

__all__ = ["LoFT", "clip_grad_norm_"]
