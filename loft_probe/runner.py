"""Fine-tune a built-in task one way (full, LoRA or LoFT) with a probe attached, into a run directory.

Runs of one task share everything a comparison needs: the starting model and LoRA initialisation (seeded),
the data order (``task.batches(seed)``), and the probed layer names (a full fine-tuning run probes exactly
the ``nn.Linear`` layers the adapters wrap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loft_probe.lora import add_lora, matches_target
from loft_probe.optim import LoFT
from loft_probe.probe import Labels, attach
from loft_probe.tasks import Task, build_task

METHODS = ("full", "lora", "loft")


@dataclass
class RunConfig:
    task: str = "digits"  # one of loft_probe.tasks.TASKS
    method: str = "loft"  # full | lora | loft
    out: Path = Path("runs/run")  # the run directory to write
    rank: int | None = None  # LoRA rank; None: the task's default
    alpha: float | None = None  # LoRA alpha; None: the task's default, else = rank (scale 1)
    lr: float | None = None  # None: the task's default for the method
    steps: int | None = None  # optimizer steps; None: the task's default
    every: int = 10  # record every k steps (snapshots every 4k, and at the last step)
    evals: int = 5  # held-out evaluations spread over the run (the last one at the final step)
    shadow: bool = True  # shadow full fine-tuning AdamW on the adapted layers
    seed: int = 0  # model initialisation, LoRA initialisation and data order
    max_grad_norm: float | None = None  # LoFT's full-space clipping (LoFT only)
    task_options: dict[str, Any] = field(default_factory=dict)  # passed to build_task
    loft_options: dict[str, Any] = field(default_factory=dict)  # LoFT ablation switches (LoFT.switches())
    name: str | None = None  # run name in reports; default "<method>"
    meta: dict[str, Any] = field(default_factory=dict)  # more meta.json fields (a sweep records its cell here)


def check_config(config: RunConfig) -> None:
    """Raise ValueError naming the first bad field of ``config``."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; allowed: {', '.join(METHODS)}")
    for name in ("rank", "steps", "every", "evals"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {config.seed!r}")
    for name in ("lr", "alpha", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    unknown = sorted(set(config.loft_options) - set(LoFT.switches()))
    if unknown:
        raise ValueError(f"unknown LoFT switch(es) {unknown}; allowed: {list(LoFT.switches())}")
    if (config.loft_options or config.max_grad_norm) and config.method != "loft":
        raise ValueError(f"LoFT switches and max_grad_norm apply to method 'loft', not {config.method!r}")


def run(config: RunConfig, on_step: Callable[[int, float], None] | None = None, task: Task | None = None) -> Path:
    """Train ``config.task`` with ``config.method`` and a probe; returns the run directory.

    ``on_step(step, loss)`` is called after every optimizer step (progress bars). ``task``: the task as
    ``build_task(config.task, seed=config.seed, **config.task_options)`` returns it, with a model no run has
    touched (a sweep's worker builds it once and passes copies); default: built here.
    """
    check_config(config)
    if task is None:
        task = build_task(config.task, seed=config.seed, **config.task_options)
    defaults = task.defaults
    steps = config.steps or defaults["steps"]
    lr = config.lr or defaults["lr"][config.method]
    rank = config.rank or defaults["rank"]
    alpha = config.alpha or (defaults.get("alpha") if config.rank is None else None) or rank
    hyper = {"betas": tuple(defaults.get("betas", (0.9, 0.999))), "eps": defaults.get("eps", 1e-8),
             "weight_decay": defaults.get("weight_decay", 0.0)}
    model = task.model
    layer_names = [name for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and any(matches_target(name, t) for t in task.lora_targets)]
    if config.method != "full":
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)  # LoRA's A initialisation: the same for LoRA and LoFT runs
            add_lora(model, rank, alpha, targets=task.lora_targets)
        for name, module in model.named_modules():
            if any(name == p or name.startswith(p + ".") for p in task.trainable_extra):
                module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.method == "loft":
        optimizer = LoFT.from_model(model, lr=lr, max_grad_norm=config.max_grad_norm, **hyper,
                                    **config.loft_options)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, **hyper)

    extra = {"task": {"name": config.task, "options": config.task_options, "steps": steps},
             "rank": rank if config.method != "full" else None, "alpha": alpha if config.method != "full" else None,
             **config.meta}
    eval_steps = {max(1, round(steps * (i + 1) / config.evals)) for i in range(config.evals)}
    batches = task.batches(config.seed)
    with attach(model, optimizer, config.out, every=config.every, shadow=config.shadow,
                layers=layer_names, labels=Labels(seed=config.seed, data_order=f"{config.task}:seed={config.seed}",
                                                  name=config.name or config.method, extra=extra)) as probe:
        try:
            probe.log(**{f"eval_{k}": v for k, v in task.evaluate(model).items()})  # step 0: the start
            for step in range(1, steps + 1):
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model, next(batches))
                loss.backward()
                optimizer.step()
                probe.log(loss=loss.item())
                if step in eval_steps:
                    probe.log(**{f"eval_{k}": v for k, v in task.evaluate(model).items()})
                if on_step is not None:
                    on_step(step, loss.item())
        except BaseException:
            if probe.step == 0:  # failed before its first step: no "closed" run that blocks a rerun
                probe.abandon()
            raise
    return Path(config.out)
