"""The run directory: a documented, versioned format, written crash-safe, read as untrusted input.

Layout (format version 1)::

    RUN/
      meta.json                     what was run: method, optimizer, hyperparameters, probed layers, ...
      metrics/part-000000-000000-1f3a9c2e.parquet   long-form rows (step:int64, layer:str, metric:str,
      metrics/part-000001-000001-1f3a9c2e.parquet   value:float64): one part per flush, "part-FIRST-LAST-TOKEN"
      metrics/part-000000-000002-77b0d4a1.parquet   a compacted part: replaces every part inside [FIRST, LAST]
      snapshots/step-000000100.safetensors   top-k singular triplets "<layer>::<what>.U|S|Vh" at a step
      initial.safetensors           full fine-tuning only: the probed weights at attach time (W0)
      .lock                         the writer's lock (see :mod:`loft_probe.probe.writer`); readers ignore it

Every file appears by an atomic rename, so a run killed at any moment (SIGKILL included) leaves only whole
files: :func:`load_run` reads every part flushed so far. A compacted part is renamed into place before the
parts it replaces are removed, so a kill in between leaves both, and readers skip the replaced ones. Rows are
read in part order; a (step, layer, metric) recorded twice keeps the later value. Nothing is pickled: JSON,
Parquet, safetensors. The run-level rows (loss, events) use the layer name ``""``. The token (random per
writer) keeps two writers' part names apart even where the writer's lock does not hold (a network file
system); the old name ``part-NNNNNN.parquet`` still reads, as the part [N, N].

Reading treats the directory as untrusted input: only regular files inside it are opened (no symbolic links,
FIFOs or devices; ``metrics/`` and ``snapshots/`` must be real folders), each under a size cap checked before
reading, meta.json against :mod:`loft_probe.probe.schema`, snapshot tensors against the layer table
(names, shapes, finite values). Every violation is one :class:`RunDirError` line naming the file.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from loft_probe.probe import schema

# Every metric name a probe writes, with its meaning: the one vocabulary shared by compare, report, diagnose.
METRICS = {
    # run-level rows (layer "")
    "loss": "training loss the user (or the Trainer) reported for the step",
    "eval_loss": "held-out loss (built-in tasks)",
    "eval_loss_se": "standard error of eval_loss, std(per-example loss)/sqrt(n): how far it would move on "
                    "another held-out set of the same size (built-in classifier tasks)",
    "eval_accuracy": "held-out accuracy (built-in tasks)",
    "skipped_step": "1 when the optimizer step was skipped for non-finite gradients (the step still counts: "
                    "each call of optimizer.step() is one step of the record)",
    "trainer_clip_coefficient": "min(1, max_grad_norm / ‖g‖), ‖g‖ the global gradient norm before the HF "
                                "Trainer's clipping: the factor its clip scaled the step's gradients by (the "
                                "captured G and the shadow are unscaled)",
    "lr": "the learning rate of the step (the param group of the first probed layer; a schedule shows here)",
    "beta1": "Adam's β1 of the step (same group)",
    "beta2": "Adam's β2 of the step (same group)",
    # per layer, every recorded step. A value undefined at its input (a cosine with a zero vector, a residual
    # of G = 0, a ratio to a zero) is a missing row: NaN in a record always means training went non-finite.
    "nonfinite_grad": "1 when the layer's gradient held NaN or Inf (the shadow skipped it)",
    "grad_norm": "‖G‖, the full-weight gradient (W.grad, or the captured G of a LoRA layer)",
    "factor_grad_norm": "sqrt(‖g_A‖² + ‖g_B‖²), the LoRA factor gradients",
    "update_norm": "‖ΔW‖ of this step's effective-weight update",
    "weight_change_norm": "‖W_t − W_0‖, the cumulative change",
    "update_weight_ratio": "‖ΔW‖ / ‖W‖",
    "update_lr_ratio": "‖ΔW‖ / (lr·sqrt(m·n)) with the step's lr: ≤ K(t) (→ 7.3) for every Adam-like step, LoFT's too",
    "factor_b_change_norm": "‖B_t − B_0‖, how far the LoRA factor B has moved since attach (0: it never trained)",
    "factor_a_change_norm": "‖A_t − A_0‖, the same for A",
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
DTYPES = {"step": "int64", "layer": "string", "metric": "string", "value": "float64"}
SCHEMA = pa.schema([("step", pa.int64()), ("layer", pa.string()), ("metric", pa.string()), ("value", pa.float64())])
_PART = re.compile(r"part-(\d{6,})(?:-(\d{6,})-([0-9a-f]{8}))?\.parquet")
_SNAPSHOT = re.compile(r"step-(\d{9})\.safetensors")
SNAPSHOT_WHATS = ("delta", "adapter", "shadow_m")  # "<layer>::<what>.<part>" in a snapshot file
# Size caps, checked (fstat) before a file is read: far above what a probe writes, far below a machine's memory.
MAX_PART_BYTES = 4 << 30  # the writer merges parts up to ~67M rows, ~0.5 GB (writer.MAX_MERGED_ROWS)
MAX_SNAPSHOT_BYTES = 4 << 30  # 200 layers of 4096×4096 at k = 32 (U, Vh, the adapter, the shadow) ~0.5 GB
MAX_INITIAL_BYTES = 64 << 30  # full fine-tuning's W0: the probed weights themselves


class RunDirError(ValueError):
    """A run directory that is missing, corrupt or of another format; the message names the file."""


class Part(NamedTuple):
    """A metrics part: its file and the range [first, last] of part numbers it holds."""

    path: Path
    first: int
    last: int


# ---------------------------------------------------------------------------------------------- writing
def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: readers see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    atomic_write(run_dir / "meta.json", lambda p: p.write_text(text))


def write_metrics_part(run_dir: Path, rows: list[tuple[int, str, str, float]] | pd.DataFrame,
                       first: int | None = None, last: int | None = None, token: str | None = None) -> Path:
    """Writes one Parquet part holding part numbers [first, last] (default: one number after the last present)
    under the writer's ``token`` (default: a fresh one); returns its path."""
    folder = run_dir / "metrics"
    folder.mkdir(exist_ok=True)
    first = next_part_index(run_dir) if first is None else first
    last = first if last is None else last
    path = folder / f"part-{first:06d}-{last:06d}-{token or new_token()}.parquet"
    if isinstance(rows, pd.DataFrame):
        table = pa.Table.from_pandas(rows.astype(DTYPES), schema=SCHEMA, preserve_index=False)
    else:  # straight to Arrow: a pandas round trip costs ten times the write itself
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in COLUMNS]
        table = pa.table([pa.array(column, type=field.type) for column, field in zip(columns, SCHEMA, strict=True)],
                         schema=SCHEMA)
    atomic_write(path, lambda p: pq.write_table(table, p))
    return path


def new_token() -> str:
    """The random part of a writer's part names (8 hex digits)."""
    return secrets.token_hex(4)


def write_snapshot(run_dir: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder = run_dir / "snapshots"
    folder.mkdir(exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(folder / f"step-{step:09d}.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))


def snapshot_key(layer: str, what: str, part: str) -> str:
    """Tensor name in a snapshot file: ``"<layer>::<what>.<part>"``, part in U, S, Vh (B, A for the adapter)."""
    return f"{layer}::{what}.{part}"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / "snapshots" / f"step-{step:09d}.safetensors"


# ---------------------------------------------------------------------------------------------- safe reading
def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symbolic link, FIFO or device) of at most ``limit``
    bytes; :class:`RunDirError` otherwise. FileNotFoundError passes through (callers say what is missing)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
    except FileNotFoundError:
        raise
    except OSError as exc:
        if path.is_symlink():
            raise RunDirError(f"{path}: a symbolic link; run files must be regular files inside the run "
                              "directory") from None
        raise RunDirError(f"{path}: cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RunDirError(f"{path}: not a regular file (a FIFO, device or folder); run files must be "
                              "regular files")
        if info.st_size > limit:
            raise RunDirError(f"{path}: {info.st_size} bytes, more than the {limit} allowed for this file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)  # the file may grow after fstat: read no more than the cap
        if len(data) > limit:
            raise RunDirError(f"{path}: more than the {limit} bytes allowed for this file")
        return data
    finally:
        os.close(fd)


def run_folder(run_dir: Path, name: str) -> Path | None:
    """``run_dir/name`` when it is a real folder, None when absent; a link or a file there is an error."""
    path = run_dir / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise RunDirError(f"{path}: a symbolic link; {name}/ must be a folder inside the run directory")
    if not stat.S_ISDIR(info.st_mode):
        raise RunDirError(f"{path}: not a folder")
    return path


# ---------------------------------------------------------------------------------------------- parts
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


def empty_metrics() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in DTYPES.items()})


# ---------------------------------------------------------------------------------------------- reading
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


def read_snapshot_steps(run_dir: Path) -> list[int]:
    folder = run_folder(run_dir, "snapshots")
    if folder is None:
        return []
    return sorted(int(m.group(1)) for entry in os.scandir(folder) if (m := _SNAPSHOT.fullmatch(entry.name)))


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
