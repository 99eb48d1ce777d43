"""loft_probe: why LoRA does not behave like full fine-tuning, measured."""

from loft_probe.lora import LoraLinear, LoraPair, add_lora, lora_pairs
from loft_probe.optim import LoFT, clip_grad_norm_
from loft_probe.probe import Probe, Run, attach, load_run

__version__ = "0.1.0"

__all__ = [
    "LoFT",
    "LoraLinear",
    "LoraPair",
    "Probe",
    "Run",
    "add_lora",
    "attach",
    "clip_grad_norm_",
    "load_run",
    "lora_pairs",
]
