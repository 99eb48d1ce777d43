"""The run directory: a documented, versioned format, written crash-safe, read as untrusted input.

Layout (format version 1)::

    RUN/
      meta.json                     what was run: method, optimizer, hyperparameters, probed layers, ...
      metrics/part-000000.parquet   long-form rows (step:int64, layer:str, metric:str, value:float64)
      metrics/part-000001.parquet   one file per flush, each written whole then renamed into place
      snapshots/step-000100.safetensors   top-k singular triplets "<layer>::<what>.U|S|Vh" at a step
      initial.safetensors           full fine-tuning only: the probed weights at attach time (W0)

Every file appears by an atomic rename, so a run killed at any moment (SIGKILL included) leaves only whole
files: :func:`load_run` reads every part flushed so far. Nothing is pickled: JSON, Parquet, safetensors.
The run-level rows (loss, events) use the layer name ``""``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

# Every metric name a probe writes, with its meaning: the one vocabulary shared by compare, report, diagnose.
METRICS = {
    # run-level rows (layer "")
    "loss": "training loss the user (or the Trainer) reported for the step",
    "eval_loss": "held-out loss (built-in tasks)",
    "eval_accuracy": "held-out accuracy (built-in tasks)",
    "skipped_step": "1 when the optimizer step was skipped for non-finite gradients",
    # per layer, every recorded step
    "nonfinite_grad": "1 when the layer's gradient held NaN or Inf (the shadow skipped it)",
    "grad_norm": "‖G‖, the full-weight gradient (W.grad, or the captured G of a LoRA layer)",
    "factor_grad_norm": "sqrt(‖g_A‖² + ‖g_B‖²), the LoRA factor gradients",
    "update_norm": "‖ΔW‖ of this step's effective-weight update",
    "weight_change_norm": "‖W_t − W_0‖, the cumulative change",
    "update_weight_ratio": "‖ΔW‖ / ‖W‖",
    "cos_update_grad": "cos(ΔW, G): −1 is steepest descent",
    "cos_moment_grad": "cos(first moment, gradient), in full space when the optimizer has one",
    "residual_left": "‖(I − P_B)·G‖ / ‖G‖: what no A-step can express",
    "residual_right": "‖G·(I − P_A)‖ / ‖G‖: what no B-step can express",
    "residual_tangent": "‖(I − P_B)·G·(I − P_A)‖ / ‖G‖: what no LoRA step can express",
    "shadow_update_cosine": "cos(ΔW, shadow AdamW update): does the step go where full fine-tuning would?",
    "shadow_update_rel_norm": "‖ΔW‖ / ‖shadow update‖",
    "shadow_m_rel_error": "‖M̂ − M_shadow‖ / ‖M_shadow‖, M̂ the optimizer's full-space first moment",
    "shadow_m_cosine": "cos(M̂, M_shadow)",
    "shadow_v_rel_error": "‖V̂ − V_shadow‖ / ‖V_shadow‖ (LoFT's reconstructed second moment)",
    "shadow_v_cosine": "cos(V̂, V_shadow)",
    "shadow_m_proj_rel_error": "‖M̂ − proj(M_shadow)‖ / ‖proj(M_shadow)‖, the shadow projected on the adapter",
    "shadow_m_proj_cosine": "cos(M̂, proj(M_shadow))",
    "shadow_precond_cosine": "cos of the preconditioned directions M/(sqrt(V)+ε), optimizer vs shadow",
    # per layer, snapshot steps
    "delta_rel_size": "‖ΔW_t‖ / ‖W_0‖ of the cumulative change",
    "delta_stable_rank": "‖ΔW_t‖² / ‖ΔW_t‖₂²",
    "delta_r90": "number of singular values holding 90% of ‖ΔW_t‖²",
    "intruders": "intruder dimensions of W_0 + ΔW_t (top 10 left singular vectors, ε = 0.5)",
}

FORMAT = "loft-probe-run"
VERSION = 1
RUN_LAYER = ""  # the layer name of run-level rows (loss, skipped steps)
COLUMNS = ("step", "layer", "metric", "value")
_PART = re.compile(r"part-(\d{6,})\.parquet")
_SNAPSHOT = re.compile(r"step-(\d{9})\.safetensors")


class RunDirError(ValueError):
    """A run directory that is missing, corrupt or of another format; the message names the file."""


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: readers see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta}
    atomic_write(run_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def next_part_index(run_dir: Path) -> int:
    """The number the next metrics part gets: one after the last present (0 for a new run)."""
    folder = run_dir / "metrics"
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _PART.fullmatch(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def has_records(run_dir: Path) -> bool:
    """True when a run directory already holds metrics or snapshots."""
    return next_part_index(run_dir) > 0 or bool(read_snapshot_steps(run_dir))


def write_metrics_part(run_dir: Path, rows: list[tuple[int, str, str, float]], index: int | None = None) -> Path:
    """Writes one Parquet part, number ``index`` (default: after the last one present); returns its path."""
    folder = run_dir / "metrics"
    folder.mkdir(exist_ok=True)
    path = folder / f"part-{next_part_index(run_dir) if index is None else index:06d}.parquet"
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype(
        {"step": "int64", "layer": "string", "metric": "string", "value": "float64"})
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    return path


def write_snapshot(run_dir: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder = run_dir / "snapshots"
    folder.mkdir(exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(folder / f"step-{step:09d}.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))


def snapshot_key(layer: str, what: str, part: str) -> str:
    """Tensor name in a snapshot file: ``"<layer>::<what>.<part>"``, part in U, S, Vh."""
    return f"{layer}::{what}.{part}"


@dataclass
class Run:
    """A run directory read back: ``meta`` (dict), ``metrics`` (long-form DataFrame), snapshots on demand."""

    path: Path
    meta: dict[str, Any]
    metrics: pd.DataFrame
    snapshot_steps: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    def rows(self, metric: str, layers: Iterable[str] | None = None) -> pd.DataFrame:
        """The long-form rows of one metric, at these layers (every layer when None; ``RUN_LAYER`` for run-level
        rows such as the loss)."""
        rows = self.metrics[self.metrics["metric"] == metric]
        return rows if layers is None else rows[rows["layer"].isin(list(layers))]

    @property
    def last_step(self) -> int:
        """The last step with a complete record (0 when nothing was recorded yet)."""
        return int(self.metrics["step"].max()) if len(self.metrics) else 0

    def snapshot(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {"delta.U": (m,k), "delta.S": (k,), "delta.Vh": (k,n), ...}}`` at a snapshot step."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if step not in self.snapshot_steps:
            raise RunDirError(f"{self.path}: no snapshot at step {step}; snapshots at {self.snapshot_steps}")
        path = self.path / "snapshots" / f"step-{step:09d}.safetensors"
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RunDirError(f"{path}: unreadable snapshot ({exc})") from None
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            layer, sep, what = key.rpartition("::")
            if not sep:
                raise RunDirError(f"{path}: tensor name {key!r} is not '<layer>::<what>'")
            layers.setdefault(layer, {})[what] = tensor
        return layers


def load_run(path: str | os.PathLike) -> Run:
    """Reads a run directory written by a probe; a crashed run reads up to its last flushed part.

    Raises :class:`RunDirError` with a one-line message naming the file for anything missing or corrupt.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a run directory (it does not exist or is not a folder)")
    meta = read_meta(run_dir)
    return Run(run_dir, meta, read_metrics(run_dir), read_snapshot_steps(run_dir))


def read_meta(run_dir: Path) -> dict[str, Any]:
    meta_path = run_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{meta_path}: missing; is {run_dir} a loft-probe run directory?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunDirError(f"{meta_path}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise RunDirError(f"{meta_path}: format version {meta.get('version')!r}, "
                          f"this loft_probe reads {VERSION}")
    for key, kind in (("method", str), ("layers", list)):
        if not isinstance(meta.get(key), kind):
            raise RunDirError(f"{meta_path}: field {key!r} missing or not a {kind.__name__}")
    for entry in meta["layers"]:
        if not _valid_layer(entry):
            raise RunDirError(f"{meta_path}: a layers entry is not {{name: str, shape: [m, n], kind: lora|full, "
                              f"rank: int|null}}: {str(entry)[:80]}")
    return meta


def _valid_layer(entry: Any) -> bool:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    return (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2
            and all(is_int(d) and d > 0 for d in entry["shape"])
            and entry.get("kind") in ("lora", "full") and (entry.get("rank") is None or is_int(entry["rank"])))


def read_metrics(run_dir: Path) -> pd.DataFrame:
    folder = run_dir / "metrics"
    parts = [p for p in folder.iterdir() if _PART.fullmatch(p.name)] if folder.is_dir() else []
    parts.sort(key=lambda p: int(_PART.fullmatch(p.name).group(1)))  # numerically: part-1000000 after 999999
    frames = []
    for part in parts:
        try:
            frame = pd.read_parquet(part)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise RunDirError(f"{part}: unreadable metrics part ({type(exc).__name__})") from None
        if tuple(frame.columns) != COLUMNS:
            raise RunDirError(f"{part}: columns {list(frame.columns)}, expected {list(COLUMNS)}")
        frames.append(frame)
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype="string"),
                             "metric": pd.Series(dtype="string"), "value": pd.Series(dtype="float64")})
    try:
        metrics = pd.concat(frames, ignore_index=True).astype(
            {"step": "int64", "layer": "string", "metric": "string", "value": "float64"})
    except (ValueError, TypeError) as exc:
        raise RunDirError(f"{folder}: metrics of the wrong type ({exc})") from None
    # A run resumed from a checkpoint records some steps again: the later part wins.
    return metrics.drop_duplicates(["step", "layer", "metric"], keep="last").reset_index(drop=True)


def read_snapshot_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "snapshots"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SNAPSHOT.fullmatch(p.name)))
