"""The LoFT optimizer, its math (``functional``) and a slow literal twin (``reference``)."""

from loft_probe.optim.loft import LoFT

__all__ = ["LoFT"]
