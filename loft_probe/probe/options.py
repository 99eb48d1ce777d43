"""The less common settings of :func:`loft_probe.attach`, grouped in small option objects, each checked when
built so that a mistake is one line at the call, not an error steps into training."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from loft_probe.probe.recording import INTRUDER_MODES
from loft_probe.probe.schedule import Schedule, as_schedule
from loft_probe.run import meta as schema

SHADOW_DTYPES = (None, torch.float32, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Snapshots:
    """When the cumulative ΔW is photographed, and how much of it.

    schedule: the snapshot steps (an int k, a list of steps, or a :class:`Schedule`); default every 4th
        recorded step. The last step is always photographed at close.
    k: singular triplets kept per layer and snapshot.
    intruders: intruder-dimension counts (an SVD of W_0 per layer) at the ``"last"`` step, at ``"all"``
        snapshots, or ``"none"``.
    """

    schedule: int | Iterable[int] | Schedule | None = None
    k: int = 32
    intruders: str = "last"

    def __post_init__(self) -> None:
        if self.schedule is not None:
            object.__setattr__(self, "schedule", as_schedule(self.schedule))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Snapshots.k must be an integer >= 1, got {self.k!r}")
        if self.intruders not in INTRUDER_MODES:
            raise ValueError(f"Snapshots.intruders must be one of {INTRUDER_MODES}, got {self.intruders!r}")


@dataclass(frozen=True)
class Gradients:
    """How the true gradient is taken and the shadow kept.

    capture: capture LoRA layers' full-weight gradient G = ∂L/∂W (costs activation memory); default: when a
        shadow is kept (which needs it).
    shadow_dtype: the shadow's storage dtype; ``torch.bfloat16`` halves its memory (an AdamW shadow computes
        in float32 and stores bfloat16; another class steps in that dtype). Default: the layer's compute dtype.
    """

    capture: bool | None = None
    shadow_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.capture not in (None, True, False):
            raise ValueError(f"Gradients.capture must be True, False or None, got {self.capture!r}")
        if self.shadow_dtype not in SHADOW_DTYPES:
            raise ValueError(f"Gradients.shadow_dtype must be None, float32, bfloat16 or float64, got "
                             f"{self.shadow_dtype}")


@dataclass(frozen=True)
class Labels:
    """What meta.json says about the run beyond what the probe sees: runs compare only with equal seed and
    data order.

    seed: the training seed. data_order: a label of the order the data was seen in. name: the run's name
    (default: the run directory's). extra: more plain-JSON fields (not the ones the probe writes itself).
    """

    seed: int | None = None
    data_order: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"Labels.seed must be an integer or None, got {self.seed!r}")
        for key, value in (("name", self.name), ("data_order", self.data_order)):
            if value is not None and (not isinstance(value, str) or len(value) > schema.MAX_RUN_NAME):
                raise ValueError(f"Labels.{key} must be a string of at most {schema.MAX_RUN_NAME} characters or "
                                 f"None, got {str(value)[:40]!r}" + ("..." if len(str(value)) > 40 else ""))
        _check_extra(self.extra)


def _check_extra(extra: Any) -> None:
    """Extra meta.json fields as given: checked here, so that load_run never refuses them."""
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise ValueError(f"Labels.extra must be a dict with string keys, got {type(extra).__name__}")
    reserved = sorted(set(extra) & set(schema.RESERVED))
    if reserved:
        raise ValueError(f"Labels.extra may not set {reserved}: the probe writes those itself")
    try:
        json.loads(json.dumps(extra, allow_nan=False))
        schema.check_json_value(extra, "extra")
        schema.check_meta({"method": "other", "layers": [{"name": "x", "shape": [1, 1], "kind": "full"}], **extra})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Labels.extra must be plain JSON within meta.json's limits: {exc}") from None
