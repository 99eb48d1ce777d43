"""The run directory's layout: format name and version, the frame schema (column dtypes, written once), the
names of metric parts and snapshot files, and listing them. See :mod:`loft_probe.run` for the whole format."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from loft_probe.run.files import run_folder

FORMAT = "loft-probe-run"
VERSION = 1
RUN_LAYER = ""  # the layer name of run-level rows (loss, skipped steps)
# The frame schema, written once: the long-form rows' columns and pandas dtypes; Arrow's schema follows from it.
DTYPES = {"step": "int64", "layer": "string", "metric": "string", "value": "float64"}
COLUMNS = tuple(DTYPES)
SCHEMA = pa.schema([(name, pa.string() if dtype == "string" else pa.from_numpy_dtype(np.dtype(dtype)))
                    for name, dtype in DTYPES.items()])
_PART = re.compile(r"part-(\d{6,})(?:-(\d{6,})-([0-9a-f]{8}))?\.parquet")
_SNAPSHOT = re.compile(r"step-(\d{9})\.safetensors")
SNAPSHOT_WHATS = ("delta", "adapter", "shadow_m")  # "<layer>::<what>.<part>" in a snapshot file
# Size caps, checked (fstat) before a file is read: far above what a probe writes, far below a machine's memory.
MAX_PART_BYTES = 4 << 30  # the writer merges parts up to ~67M rows, ~0.5 GB (writer.MAX_MERGED_ROWS)
MAX_SNAPSHOT_BYTES = 4 << 30  # 200 layers of 4096×4096 at k = 32 (U, Vh, the adapter, the shadow) ~0.5 GB
MAX_INITIAL_BYTES = 64 << 30  # full fine-tuning's W0: the probed weights themselves


class Part(NamedTuple):
    """A metrics part: its file and the range [first, last] of part numbers it holds."""

    path: Path
    first: int
    last: int


def new_token() -> str:
    """The random part of a writer's part names (8 hex digits)."""
    return secrets.token_hex(4)


def snapshot_key(layer: str, what: str, part: str) -> str:
    """Tensor name in a snapshot file: ``"<layer>::<what>.<part>"``, part in U, S, Vh (B, A for the adapter)."""
    return f"{layer}::{what}.{part}"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / "snapshots" / f"step-{step:09d}.safetensors"


def list_parts(run_dir: Path) -> list[Part]:
    """Every metrics part file present, in part order (first number, then the widest range first)."""
    folder = run_folder(run_dir, "metrics")
    if folder is None:
        return []
    parts = []
    for entry in os.scandir(folder):
        if match := _PART.fullmatch(entry.name):
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) else first
            if last >= first:
                parts.append(Part(Path(entry.path), first, last))
    return sorted(parts, key=lambda p: (p.first, -p.last, p.path.name))


def live_parts(parts: list[Part]) -> tuple[list[Part], list[Part]]:
    """(the parts to read, the parts a compacted part replaces): a part inside the range of a wider one was
    compacted into it (and survived a kill before its removal)."""
    live, replaced = [], []
    cover: tuple[int, int] = (-1, -1)
    for part in parts:  # sorted by first, widest first: a covering part comes before what it covers
        if part.last <= cover[1] and (part.first, part.last) != cover:
            replaced.append(part)
            continue
        live.append(part)
        if part.last > cover[1]:
            cover = (part.first, part.last)
    return live, replaced


def next_part_index(run_dir: Path) -> int:
    """The number the next metrics part gets: one after the last present (0 for a new run)."""
    return max((part.last for part in list_parts(run_dir)), default=-1) + 1


def has_records(run_dir: Path) -> bool:
    """True when a run directory already holds metrics or snapshots."""
    return bool(list_parts(run_dir)) or bool(read_snapshot_steps(run_dir))


def empty_metrics() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in DTYPES.items()})


def read_snapshot_steps(run_dir: Path) -> list[int]:
    folder = run_folder(run_dir, "snapshots")
    if folder is None:
        return []
    return sorted(int(m.group(1)) for entry in os.scandir(folder) if (m := _SNAPSHOT.fullmatch(entry.name)))

