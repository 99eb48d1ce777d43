"""loft_probe: why LoRA does not behave like full fine-tuning, measured."""

from importlib.metadata import version

from loft_probe.comparison import compare
from loft_probe.diagnosis import diagnose
from loft_probe.lora import LoraLinear, LoraPair, add_lora, lora_pairs
from loft_probe.optim import LoFT
from loft_probe.probe import Gradients, Labels, Snapshots, attach
from loft_probe.run import Run, load_run
from loft_probe.sweeps import sweep

__version__ = version("loft-probe")  # written once, in pyproject.toml


__all__ = [
    "Gradients",
    "Labels",
    "LoFT",
    "LoraLinear",
    "LoraPair",
    "Run",
    "Snapshots",
    "add_lora",
    "attach",
    "compare",
    "diagnose",
    "load_run",
    "lora_pairs",
    "report",
    "study",
    "sweep",
]


def __getattr__(name: str):
    # The report pulls in matplotlib and seaborn (1.5 s): imported on first use, not with the package.
    if name == "report":
        from loft_probe.reporting import report

        return report
    if name == "study":
        from loft_probe.study import study

        return study
    raise AttributeError(f"module 'loft_probe' has no attribute {name!r}")
