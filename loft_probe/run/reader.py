"""Reading a run directory back: :func:`load_run` and :class:`Run`, every file checked as untrusted input
(meta.json against :mod:`loft_probe.run.meta`, parts against the frame schema, snapshot tensors against the
layer table)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from loft_probe.run import meta as schema
from loft_probe.run.files import RunDirError, read_regular
from loft_probe.run.layout import (
    COLUMNS,
    FORMAT,
    MAX_INITIAL_BYTES,
    MAX_PART_BYTES,
    MAX_SNAPSHOT_BYTES,
    SCHEMA,
    SNAPSHOT_WHATS,
    VERSION,
    Part,
    empty_metrics,
    list_parts,
    live_parts,
    read_snapshot_steps,
    snapshot_path,
)


def read_part(part: Part) -> pa.Table:
    """One part's rows as an Arrow table of :data:`SCHEMA`. FileNotFoundError when it is gone (compacted since
    it was listed)."""
    data = read_regular(part.path, MAX_PART_BYTES)
    try:
        table = pq.read_table(io.BytesIO(data))
        names = tuple(table.column_names)  # a flipped byte in a column name fails to decode only here
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RunDirError(f"{part.path}: unreadable metrics part ({type(exc).__name__})") from None
    if names != COLUMNS:
        raise RunDirError(f"{part.path}: columns {table.column_names[:8]}, expected {list(COLUMNS)}")
    try:
        return table.cast(SCHEMA)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise RunDirError(f"{part.path}: metrics of the wrong type ({str(exc)[:120]})") from None


def merge_rows(tables: list[pa.Table]) -> pd.DataFrame:
    """Parts' rows in part order as one frame; a (step, layer, metric) recorded twice keeps the later row."""
    tables = [table for table in tables if table.num_rows]
    if not tables:
        return empty_metrics()
    metrics = pa.concat_tables(tables).to_pandas(types_mapper={pa.string(): pd.StringDtype()}.get)
    return metrics.drop_duplicates(["step", "layer", "metric"], keep="last").reset_index(drop=True)


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
        """``{layer: {"delta.U": (m,k), "delta.S": (k,), "delta.Vh": (k,n), ...}}`` at a snapshot step, each
        tensor checked against the layer table: a known layer, the shape its (m, n) and rank imply, finite."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        if step not in self.snapshot_steps:
            raise RunDirError(f"{self.path}: no snapshot at step {step}; snapshots at {self.snapshot_steps[:20]}")
        path = snapshot_path(self.path, step)
        try:
            flat = load(read_regular(path, MAX_SNAPSHOT_BYTES))
        except FileNotFoundError:
            raise RunDirError(f"{path}: missing") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, RunDirError):
                raise
            raise RunDirError(f"{path}: unreadable snapshot ({str(exc)[:120]})") from None
        shapes = {str(layer["name"]): layer for layer in self.meta["layers"]}
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            layer, sep, what = key.rpartition("::")
            if not sep or layer not in shapes:
                raise RunDirError(f"{path}: tensor {key[:120]!r} is not '<layer>::<what>' of a layer in meta.json")
            layers.setdefault(layer, {})[what] = tensor
        for layer, tensors in layers.items():
            _check_snapshot_layer(path, layer, shapes[layer], tensors)
        return layers


def _check_snapshot_layer(path: Path, layer: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A layer's snapshot tensors: known names, the shapes (m, k), (k,), (k, n) of one k for each SVD,
    (m, r), (r, n) for the adapter, floating and finite."""
    m, n = entry["shape"]
    for what, tensor in tensors.items():
        base, _, part = what.partition(".")
        if base not in SNAPSHOT_WHATS or part not in (("B", "A") if base == "adapter" else ("U", "S", "Vh")):
            raise RunDirError(f"{path}: tensor {what[:80]!r} of layer {layer[:80]!r} is not one of "
                              "delta|shadow_m.U|S|Vh, adapter.B|A")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise RunDirError(f"{path}: tensor {what!r} of layer {layer[:80]!r} is not finite floating point")
    for base in ("delta", "shadow_m"):
        parts = [tensors.get(f"{base}.{p}") for p in ("U", "S", "Vh")]
        if all(t is None for t in parts):
            continue
        U, S, Vh = parts
        k = S.shape[0] if S is not None and S.dim() == 1 else -1
        if U is None or Vh is None or not (0 <= k <= min(m, n)) or U.shape != (m, k) or Vh.shape != (k, n):
            raise RunDirError(f"{path}: {base}.U|S|Vh of layer {layer[:80]!r} are not (m, k), (k,), (k, n) with "
                              f"(m, n) = ({m}, {n}) and k <= {min(m, n)}; got "
                              + ", ".join(str(tuple(t.shape)) if t is not None else "none" for t in parts))
    if "adapter.B" in tensors or "adapter.A" in tensors:
        B, A = tensors.get("adapter.B"), tensors.get("adapter.A")
        r = entry.get("rank") or (B.shape[-1] if B is not None and B.dim() == 2 else None)  # meta may omit it
        if r is None or B is None or A is None or B.shape != (m, r) or A.shape != (r, n):
            raise RunDirError(f"{path}: adapter.B|A of layer {layer[:80]!r} are not ({m}, {r}), ({r}, {n}); got "
                              + ", ".join(str(tuple(t.shape)) if t is not None else "none" for t in (B, A)))


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
        text = read_regular(meta_path, schema.MAX_META_BYTES).decode("utf-8")
        meta = json.loads(text, object_pairs_hook=schema.reject_duplicate_keys)
    except FileNotFoundError:
        raise RunDirError(f"{meta_path}: missing; is {run_dir} a loft-probe run directory?") from None
    except RecursionError:
        raise RunDirError(f"{meta_path}: nested deeper than {schema.MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError, schema.SchemaError) as exc:
        raise RunDirError(f"{meta_path}: unreadable ({str(exc)[:160]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunDirError(f"{meta_path}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise RunDirError(f"{meta_path}: format version {str(meta.get('version'))[:40]!r}, "
                          f"this loft_probe reads {VERSION}")
    try:
        schema.check_meta(meta)
    except schema.SchemaError as exc:
        raise RunDirError(f"{meta_path}: {exc}") from None
    return meta


def read_metrics(run_dir: Path) -> pd.DataFrame:
    for _ in range(3):  # a writer compacting while we read removes parts we listed: list again
        live, _ = live_parts(list_parts(run_dir))
        try:
            return merge_rows([read_part(part) for part in live])
        except FileNotFoundError:
            continue
    raise RunDirError(f"{run_dir / 'metrics'}: parts keep disappearing while read (a writer compacting?); "
                      "try again")


def read_initial(run_dir: Path) -> dict[str, torch.Tensor]:
    """initial.safetensors (full fine-tuning's W0 per probed layer)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = run_dir / "initial.safetensors"
    try:
        return load(read_regular(path, MAX_INITIAL_BYTES))
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing; a full fine-tuning run keeps its initial weights there") from None
    except (SafetensorError, ValueError) as exc:
        if isinstance(exc, RunDirError):
            raise
        raise RunDirError(f"{path}: unreadable ({str(exc)[:120]})") from None
