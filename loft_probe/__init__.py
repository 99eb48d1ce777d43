"""loft_probe: why LoRA does not behave like full fine-tuning, measured."""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING

__version__ = version("loft-probe")  # written once, in pyproject.toml

# Each public name and the module that defines it, imported on first use: `import loft_probe.optim` in a sweep
# worker, a spawned rank or the CLI's --help then pays for torch and LoFT, not for pandas, scipy and seaborn
# (importing everything took 2.3 s, 1.4 s of it beyond torch).
_EXPORTS = {
    "Gradients": "loft_probe.probe",
    "Labels": "loft_probe.probe",
    "LoFT": "loft_probe.optim",
    "LoraLinear": "loft_probe.lora",
    "LoraPair": "loft_probe.lora",
    "Run": "loft_probe.run",
    "Snapshots": "loft_probe.probe",
    "add_lora": "loft_probe.lora",
    "attach": "loft_probe.probe",
    "compare": "loft_probe.comparison",
    "diagnose": "loft_probe.diagnosis",
    "load_run": "loft_probe.run",
    "lora_pairs": "loft_probe.lora",
    "report": "loft_probe.reporting",
    "study": "loft_probe.study",
    "sweep": "loft_probe.sweeps",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time each name is imported by __getattr__
    from loft_probe.comparison import compare
    from loft_probe.diagnosis import diagnose
    from loft_probe.lora import LoraLinear, LoraPair, add_lora, lora_pairs
    from loft_probe.optim import LoFT
    from loft_probe.probe import Gradients, Labels, Snapshots, attach
    from loft_probe.reporting import report
    from loft_probe.run import Run, load_run
    from loft_probe.study import study
    from loft_probe.sweeps import sweep


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loft_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
