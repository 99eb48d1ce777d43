"""loft_probe: why LoRA does not behave like full fine-tuning, measured."""

from loft_probe.lora import LoraLinear, LoraPair, add_lora, lora_pairs
from loft_probe.optim import LoFT, clip_grad_norm_

__version__ = "0.1.0"

__all__ = [
    "LoFT",
    "LoraLinear",
    "LoraPair",
    "add_lora",
    "clip_grad_norm_",
    "lora_pairs",
]
