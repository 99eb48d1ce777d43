"""A Hugging Face ``TrainerCallback`` that attaches a probe to the Trainer's model and optimizer.

    from loft_probe.integrations.hf import ProbeCallback
    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[ProbeCallback("runs/lora-r8", every=16, shadow=True)])

The probe attaches at ``on_train_begin`` (the optimizer exists by then, LoFT or the Trainer's AdamW), records
the Trainer's logged loss and eval metrics, and closes at ``on_train_end``. The Trainer clips gradients
before ``optimizer.step``: recorded factor gradients and dense ``W.grad`` are clipped, a LoRA layer's
captured full gradient G (and so the shadow) is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loft_probe.probe import Probe, attach

# The Trainer logs its evaluation's wall time and throughput next to the metrics: they describe the machine,
# not the training, and would read as training metrics in a run's record.
TRAINER_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second")


class ProbeCallback(TrainerCallback):
    """Attach :func:`loft_probe.attach` with ``options`` to a Trainer's run, writing to ``run_dir``."""

    def __init__(self, run_dir: str | Path, **options: Any) -> None:
        self.run_dir, self.options = Path(run_dir), options
        self.probe: Probe | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # accelerate wraps the optimizer (and, under fp16, its GradScaler): the probe needs the scaler to
        # unscale captured gradients, and hooks the wrapped optimizer, which the wrapper's step() calls
        self.options.setdefault("grad_scaler", getattr(optimizer, "scaler", None))
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.options.setdefault("seed", args.seed)
        self.probe = attach(model, optimizer, self.run_dir, **self.options)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.probe is None or not logs:
            return
        values = {key: value for key, value in logs.items()
                  if isinstance(value, (int, float)) and (key == "loss" or key.startswith("eval_"))
                  and not key.endswith(TRAINER_TIMINGS)}
        if values:
            self.probe.log(**values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.close()
