"""Opening a run directory for a probe: the meta.json it writes, and the check that a re-opened directory
holds the same run (so that a resumed run continues its own record)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from loft_probe.optim import LoFT
from loft_probe.probe.layers import ProbedLayer, fingerprints
from loft_probe.probe.layouts import layout_of
from loft_probe.probe.options import Labels
from loft_probe.run import RunDirError, RunWriter, load_run
from loft_probe.run.layout import has_records

RECORDING_OPTIONS = ("schedule", "snapshots", "snapshot_k", "shadow", "capture_grad")  # must agree on a resume


def open_run(writer: RunWriter, optimizer: torch.optim.Optimizer, layers: list[ProbedLayer], labels: Labels,
             recording: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Writes a new run's meta.json (and a dense layer's W_0), or re-opens the same run to continue it:
    returns (the run's meta, the step it starts from). Sets each dense layer's ‖W_0‖.

    ``recording``: the method and the recording options, as meta.json names them. A re-opened run must be the
    same run: the same base weights (a dense layer's W_0 is read back from initial.safetensors), layers,
    optimizer class and hyperparameters, recording options and labels; anything else is refused.
    """
    old = writer.existing_meta()
    start = resumed_step(optimizer, writer.run_dir) if old is not None else 0
    dense = [layer for layer in layers if layer.pair is None]
    initial = {layer.name: writer.initial_weight(layer.name) if old is not None else layer.param.detach()
               for layer in dense}  # W_0 itself, also on a resume
    for layer in dense:
        layer.base_norm = float(initial[layer.name].float().norm())
    fingerprint, per_layer = fingerprints(
        layers, lambda layer: layer.base_weight() if layer.pair is not None else initial[layer.name])
    meta = {
        "name": labels.name or writer.run_dir.name, "optimizer": type(optimizer).__name__,
        "hyperparameters": hyperparameters(optimizer), "seed": labels.seed, "data_order": labels.data_order,
        "fingerprint": fingerprint, "layers": [layer.table_entry(per_layer[layer.name]) for layer in layers],
        **recording, "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "closed": False, **labels.extra,
    }
    if old is not None:  # the run's own meta goes on; what this probe was given must agree with it
        given = {"name": labels.name, "seed": labels.seed, "data_order": labels.data_order}
        check_same_run(writer.run_dir, old, meta, start, given, optimizer)
        meta = {key: value for key, value in old.items() if key != "last_step"} | labels.extra | {"closed": False}
        writer.resume_from(start)
    elif dense:
        writer.write_initial({layer.name: layer.param for layer in dense})
    writer.write_meta(meta)
    return meta, start


def hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The first param group's lr, betas, eps, weight decay and LoFT switches (and LoFT's max_grad_norm)."""
    keep = ("lr", "betas", "eps", "weight_decay", *LoFT.switches(), "partner_cutoff")
    group = optimizer.param_groups[0]
    out = {k: (list(group[k]) if isinstance(group[k], tuple) else group[k]) for k in keep if k in group}
    if getattr(optimizer, "max_grad_norm", None) is not None:
        out["max_grad_norm"] = optimizer.max_grad_norm
    return out


def resumed_step(optimizer: torch.optim.Optimizer, run_dir: Path) -> int:
    """The step a probe re-opening ``run_dir`` continues after: the optimizer's own count. One that keeps no
    count (SGD, Lion) continues after the last step the directory holds, with a warning: records after the
    training checkpoint's step would be kept under wrong step numbers unless ``Probe.load_state_dict`` restores
    the probe's state saved with it (which sets the step)."""
    steps = layout_of(optimizer).steps_taken(optimizer)
    if steps is not None:
        return steps
    last = load_run(run_dir).last_step
    warnings.warn(f"{type(optimizer).__name__} keeps no step count: the record in {run_dir} continues after its "
                  f"last step, {last}; restore probe.load_state_dict(...) saved with the checkpoint for an exact "
                  "resume", stacklevel=4)
    return last


def check_same_run(run_dir: Path, old: dict[str, Any], new: dict[str, Any], start: int, given: dict[str, Any],
                   optimizer: torch.optim.Optimizer) -> None:
    """One line naming what differs between the run in the directory (``old`` meta) and this probe's (``new``):
    the base weights, layers, optimizer and its hyperparameters, the recording options, and the labels
    ``given`` (None: the run's own)."""
    where = f"{run_dir}: holds a different run"
    if old.get("fingerprint") != new["fingerprint"] or _without_fingerprints(old["layers"]) != \
            _without_fingerprints(new["layers"]):
        raise RunDirError(f"{where} (base weights or layers differ); choose another run_dir")
    for key in ("method", "optimizer"):
        if old.get(key) != new[key]:
            raise RunDirError(f"{where}: its {key} is {old.get(key)!r}, this probe's {new[key]!r}; "
                              "resume with the run's own optimizer, or choose another run_dir")
    options = {key: new[key] for key in RECORDING_OPTIONS}
    for key, value in [*options.items(), *((k, v) for k, v in given.items() if v is not None)]:
        if key in old and old[key] != value:
            raise RunDirError(f"{where}: its {key} is {old[key]!r}, this probe's {value!r}; resume "
                              "with the run's own options, or choose another run_dir")
    mine, theirs = _comparable(new["hyperparameters"], optimizer), _comparable(old.get("hyperparameters"))
    differ = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
    if differ:
        key = differ[0]
        raise RunDirError(f"{where}: hyperparameter {key} is {theirs.get(key)!r} there, {mine.get(key)!r} here; "
                          "resume with the run's own optimizer settings, or choose another run_dir")
    if start == 0 and has_records(run_dir):
        raise RunDirError(f"{run_dir}: already holds this run's records; to resume, attach with the optimizer "
                          "restored from a checkpoint, or choose another run_dir")


def _comparable(hyper: Any, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Hyperparameters for the same-run check: a scheduler moves lr, so a live optimizer's is its initial_lr."""
    out = dict(hyper) if isinstance(hyper, dict) else {}
    if optimizer is not None and "initial_lr" in optimizer.param_groups[0]:
        out["lr"] = optimizer.param_groups[0]["initial_lr"]
    return out


def _without_fingerprints(table: Any) -> Any:
    if not isinstance(table, list):
        return table
    return [{k: v for k, v in entry.items() if k != "fingerprint"} if isinstance(entry, dict) else entry
            for entry in table]
