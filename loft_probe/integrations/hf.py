"""A Hugging Face ``TrainerCallback`` that attaches a probe to the Trainer's model and optimizer.

    from loft_probe.integrations.hf import ProbeCallback
    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[ProbeCallback("runs/lora-r8", every=16, shadow=True)])

The probe attaches at ``on_train_begin`` (the optimizer exists by then, LoFT or the Trainer's AdamW), records
the Trainer's logged loss and eval metrics, and closes at ``on_train_end``.

Gradient clipping. The Trainer clips all gradients by their global norm before ``optimizer.step``
(``args.max_grad_norm``, 1.0 by default): recorded factor gradients and dense ``W.grad`` are clipped, a LoRA
layer's captured full gradient G (and so the shadow fed with it) is not. The callback warns once when it
captures G under the Trainer's clipping, and once when LoFT's own ``max_grad_norm`` clips the clipped gradients
again (set ``TrainingArguments(max_grad_norm=0)`` and let LoFT clip). While the Trainer clips, every optimizer
step records ``trainer_clip_coefficient = min(1, max_grad_norm / ‖g‖)`` (a run-level row), ‖g‖ the global
norm before clipping: the factor the step's gradients were scaled by, which G was not.

How ‖g‖ is had: the Trainer passes its pre-clip norm to no callback event. ``on_pre_optimizer_step`` fires after
the clip (its gradients are clipped, and a clipped norm no longer tells how large ‖g‖ was), no event fires
between the last backward and the clip, and the logged ``grad_norm`` exists only at logging steps. So the
callback measures ‖g‖ itself: a post-accumulate-grad hook on each trainable parameter keeps its gradient's
squared norm as the last backward left it (with gradient accumulation, the sum's), and
``on_pre_optimizer_step`` adds them up, divided by the AMP loss scale the Trainer unscales by before clipping.
Under DDP those hooks see a rank's own gradient, not the averaged one the Trainer clips: there the coefficient
comes from the Trainer's logged ``grad_norm`` instead, at logging steps only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from loft_probe.optim import LoFT
from loft_probe.probe import Labels, Probe, ProbeWarning, attach

# The Trainer logs its evaluation's wall time and throughput next to the metrics: they describe the machine,
# not the training, and would read as training metrics in a run's record.
TRAINER_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second")


class ProbeCallback(TrainerCallback):
    """Attach :func:`loft_probe.attach` with ``options`` (its keyword arguments) to a Trainer's run, writing to
    ``run_dir``; the run's seed label defaults to the Trainer's."""

    def __init__(self, run_dir: str | Path, **options: Any) -> None:
        self.run_dir, self.options = Path(run_dir), options
        self.probe: Probe | None = None
        self._norm: PreClipNorm | None = None  # per-step ‖g‖ while the Trainer clips (one process)
        self._coefficient: float | None = None  # this step's, from before the step until it is logged after it
        self._logged_norm = False  # under DDP: the coefficient from the Trainer's logged grad_norm

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # accelerate wraps the optimizer (and, under fp16, its GradScaler): the probe needs the scaler to
        # unscale captured gradients, and hooks the wrapped optimizer, which the wrapper's step() calls
        self.options.setdefault("grad_scaler", getattr(optimizer, "scaler", None))
        optimizer = getattr(optimizer, "optimizer", optimizer)
        labels = self.options.get("labels") or Labels()
        if labels.seed is None:  # the Trainer's seed, unless the caller labelled the run with another
            self.options["labels"] = dataclasses.replace(labels, seed=args.seed)
        self.probe = attach(model, optimizer, self.run_dir, **self.options)
        captures = any(layer.capture is not None for layer in self.probe.layers)
        for message in clipping_warnings(args.max_grad_norm, optimizer, captures):
            warnings.warn(f"loft_probe: {message}", ProbeWarning, stacklevel=2)
        if args.max_grad_norm > 0 and self.probe.world == 1:
            self._norm = PreClipNorm(param for param in model.parameters() if param.requires_grad)
        self._logged_norm = args.max_grad_norm > 0 and self.probe.world > 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._norm is not None:
            scaler = self.options["grad_scaler"]
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
            self._coefficient = clip_coefficient(args.max_grad_norm, self._norm.take() / scale)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._coefficient is not None:  # after the step: the probe's step is now the one just taken
            self.probe.log(trainer_clip_coefficient=self._coefficient)
            self._coefficient = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.probe is None or not logs:
            return
        values = {key: value for key, value in logs.items()
                  if isinstance(value, (int, float)) and (key == "loss" or key.startswith("eval_"))
                  and not key.endswith(TRAINER_TIMINGS)}
        if self._logged_norm and "grad_norm" in logs:
            values["trainer_clip_coefficient"] = clip_coefficient(args.max_grad_norm, float(logs["grad_norm"]))
        if values:
            self.probe.log(**values)

    def on_train_end(self, args, state, control, **kwargs):
        if self._norm is not None:
            self._norm.remove()
            self._norm = None
        if self.probe is not None:
            self.probe.close()


class PreClipNorm:
    """The global norm ‖g‖ of some parameters' gradients as the backward passes left them, before anything
    clips them: a post-accumulate-grad hook keeps each gradient's squared norm (overwritten by every backward,
    so with gradient accumulation it is the accumulated gradient's), :meth:`take` adds them up."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._squares: dict[int, torch.Tensor] = {}  # id(param) -> ‖grad‖², a 0-d tensor on its device
        self._handles = [param.register_post_accumulate_grad_hook(self._keep) for param in params]

    def _keep(self, param: nn.Parameter) -> None:
        self._squares[id(param)] = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32) ** 2

    def take(self) -> float:
        """‖g‖ since the last take (0 without gradients); the next optimizer step's backward starts anew."""
        total = math.sqrt(sum(float(square) for square in self._squares.values()))  # devices may differ
        self._squares.clear()
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def clip_coefficient(max_norm: float, total_norm: float) -> float:
    """``min(1, max_norm / total_norm)``: the factor clipping to ``max_norm`` scales gradients of global norm
    ``total_norm`` by (0 for an infinite norm, NaN for a NaN one)."""
    if math.isnan(total_norm):
        return math.nan
    return max_norm / total_norm if total_norm > max_norm else 1.0


def clipping_warnings(max_grad_norm: float, optimizer: torch.optim.Optimizer, captures: bool) -> list[str]:
    """One line per way the Trainer's clipping (``max_grad_norm`` > 0) makes a probed run differ from what
    the probe records: a second clip by LoFT's own ``max_grad_norm``; a captured G that is never clipped."""
    if not max_grad_norm > 0:
        return []
    messages = []
    if isinstance(optimizer, LoFT) and optimizer.max_grad_norm is not None:
        messages.append(f"the Trainer clips gradients to norm {max_grad_norm:g} and LoFT clips them again to "
                        f"{optimizer.max_grad_norm:g}; set TrainingArguments(max_grad_norm=0) and let LoFT's "
                        "max_grad_norm clip alone")
    if captures:
        messages.append(f"the Trainer clips gradients to norm {max_grad_norm:g} before optimizer.step, the "
                        "captured full gradient G and the shadow fed with it are unclipped "
                        "(trainer_clip_coefficient records by how much); set TrainingArguments(max_grad_norm=0) "
                        "for steps G describes")
    return messages
