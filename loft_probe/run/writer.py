"""``RunWriter``: the one writer of a run directory (format in :mod:`loft_probe.run`).

It opens a directory (or refuses it), holds an exclusive lock for its whole life, writes the initial
weights, metric parts, snapshots and meta.json, compacts parts as they accumulate, and on a resume drops what
the interrupted run recorded after the step it resumes from.

- **One writer.** ``RUN/.lock`` is locked with ``flock``: an OS-level lock that dies with its process, so a
  SIGKILLed writer never blocks a resume, while a second writer (another process, or another probe in this
  one) is refused with one line naming the holder.
- **Compaction.** Part ``i`` holds ``rows_i`` rows, at level ``floor(log16 rows_i)``. After each flush, the
  longest tail of parts at level ≤ L is merged into one part as soon as it has 16 parts (L = 0, 1, ...): a run
  keeps fewer than 16 parts per level (a few dozen for 10⁵ flushes), each row is rewritten once per level, and
  :meth:`finish` leaves one part (no merge makes a part of more than ``MAX_MERGED_ROWS`` rows). A merged part
  is renamed into place before the parts it replaces are removed (readers skip replaced parts that a kill left
  behind).
- **Resume.** :meth:`resume_from` names the step the run continues from; before the next write the records
  after it (rows and snapshots of the interrupted run, which the resumed run records again) are dropped: the
  last parts holding later steps are merged, without those rows, into one part that replaces them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from loft_probe.run import layout, reader
from loft_probe.run.files import RunDirError, atomic_write
from loft_probe.run.layout import COLUMNS, DTYPES, FORMAT, SCHEMA, VERSION, Part

LOCK = ".lock"
COMPACT_FANOUT = 16
MAX_MERGED_ROWS = 1 << 26  # ~67M rows (~0.5 GB of Parquet): a merge stops there, far below the reader's size cap


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
    first = layout.next_part_index(run_dir) if first is None else first
    last = first if last is None else last
    path = folder / f"part-{first:06d}-{last:06d}-{token or layout.new_token()}.parquet"
    if isinstance(rows, pd.DataFrame):
        table = pa.Table.from_pandas(rows.astype(DTYPES), schema=SCHEMA, preserve_index=False)
    else:  # straight to Arrow: a pandas round trip costs ten times the write itself
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in COLUMNS]
        table = pa.table([pa.array(column, type=field.type) for column, field in zip(columns, SCHEMA, strict=True)],
                         schema=SCHEMA)
    atomic_write(path, lambda p: pq.write_table(table, p))
    return path


def write_snapshot(run_dir: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder = run_dir / "snapshots"
    folder.mkdir(exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write(folder / f"step-{step:09d}.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))


class RunWriter:
    """Writes one run directory; create with :meth:`open`, end with :meth:`finish` (or :meth:`release`)."""

    def __init__(self, run_dir: Path, lock_fd: int, created: bool = False) -> None:
        self.run_dir = run_dir
        self.created = created  # this writer made the folder: a failed start removes it again
        self.new_run = not (run_dir / "meta.json").exists()  # not a resume: a failed start removes its files
        self.token = layout.new_token()  # this writer's part names: never those of another writer
        self._lock_fd: int | None = lock_fd
        self._tail: list[tuple[Part, int]] = []  # live parts in order, with their row counts
        self._next = 0  # the next part number
        self._resume_step: int | None = None  # drop records after this step before the next write
        self._settled = False  # the directory's parts are known (listed at the first write)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> RunWriter:
        """Locks ``run_dir`` (created if missing) for writing; refuses a folder that holds other files, and a
        run directory another writer holds, each with a one-line :class:`~loft_probe.run.files.RunDirError`."""
        run_dir = Path(run_dir)
        if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
            raise RunDirError(f"{run_dir}: not a folder; choose another run_dir")
        if run_dir.is_dir() and not (run_dir / "meta.json").exists() and any(
                entry.name != LOCK for entry in run_dir.iterdir()):
            raise RunDirError(f"{run_dir}: exists and is not a run directory; choose another")
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return cls(run_dir, _lock(run_dir), created)
        except BaseException:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def existing_meta(self) -> dict[str, Any] | None:
        """The meta.json of the run already in the directory (None for a new run)."""
        return reader.read_meta(self.run_dir) if (self.run_dir / "meta.json").exists() else None

    def resume_from(self, step: int) -> None:
        """The run continues after ``step``: records of later steps are dropped before the next write."""
        self._resume_step = step

    # ------------------------------------------------------------------ writing
    def write_meta(self, meta: dict[str, Any]) -> None:
        write_meta(self.run_dir, meta)

    def write_initial(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        atomic_write(self.run_dir / "initial.safetensors", lambda p: save_file(tensors, str(p)))

    def initial_weight(self, name: str) -> torch.Tensor:
        """One layer's W0 from initial.safetensors (memory-mapped: only that tensor is read)."""
        from safetensors import safe_open

        path = self.run_dir / "initial.safetensors"
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            regular = False
        if not regular:
            raise RunDirError(f"{path}: missing or not a regular file; a full fine-tuning run keeps its "
                                     "initial weights there")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def append(self, rows: list[tuple[int, str, str, float]]) -> None:
        """One flush: a part of ``rows``, then whatever compaction is due."""
        self._settle()
        path = write_metrics_part(self.run_dir, rows, self._next, self._next, self.token)
        self._tail.append((Part(path, self._next, self._next), len(rows)))
        self._next += 1
        while self._compact_due():
            pass

    def write_snapshot(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        self._settle()
        write_snapshot(self.run_dir, step, tensors)

    def snapshot_steps(self) -> list[int]:
        self._settle()
        return layout.read_snapshot_steps(self.run_dir)

    def finish(self, meta: dict[str, Any]) -> None:
        """Compacts every part into one, writes the closing meta.json and releases the lock."""
        try:
            self._settle()
            size = _fitting_tail([rows for _, rows in self._tail])
            if size > 1:
                self._merge(size)
            self.write_meta(meta)
        finally:
            self.release()

    def abandon(self) -> None:
        """A start that failed: release the lock and remove what this writer wrote for a new run (the folder
        too when it created it); a resumed run's directory is left as it was."""
        if self._lock_fd is None:
            return
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.new_run:
            for name in ("metrics", "snapshots"):
                if (self.run_dir / name).is_dir() and not (self.run_dir / name).is_symlink():
                    shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for name in ("meta.json", "initial.safetensors", LOCK):
                (self.run_dir / name).unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Gives the directory up without writing (what a process's death does)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ compaction
    def _settle(self) -> None:
        """Before the first write: find the parts, remove a killed writer's leftovers; before the first write
        after :meth:`resume_from`: drop the later records."""
        if self._lock_fd is None:
            raise RunDirError(f"{self.run_dir}: this writer has released the directory")
        if not self._settled:
            self._settled = True
            parts = layout.list_parts(self.run_dir)
            live, replaced = layout.live_parts(parts)
            for part in replaced:  # compacted into a live part before a kill: their rows are there
                part.path.unlink(missing_ok=True)
            self._next = max((part.last for part in parts), default=-1) + 1
            self._tail = [(part, _row_count(part)) for part in live]
            _remove_temporaries(self.run_dir)
        if self._resume_step is not None:
            step, self._resume_step = self._resume_step, None
            self._drop_after(step)

    def _drop_after(self, step: int) -> None:
        for later in [s for s in layout.read_snapshot_steps(self.run_dir) if s > step]:
            layout.snapshot_path(self.run_dir, later).unlink()
        size = 0  # parts are in step order: the later records sit in the last parts, read from the end
        while size < len(self._tail):
            table = reader.read_part(self._tail[-1 - size][0])
            if not table.num_rows or pc.max(table["step"]).as_py() <= step:
                break
            size += 1
        if size:
            self._merge(size, keep=lambda rows: rows[rows["step"] <= step])

    def _compact_due(self) -> bool:
        levels = [_level(rows) for _, rows in self._tail]
        for level in sorted(set(levels)):
            size = 0
            while size < len(levels) and levels[-1 - size] <= level:
                size += 1
            size = min(size, _fitting_tail([rows for _, rows in self._tail]))
            if size >= COMPACT_FANOUT:
                self._merge(size)
                return True
        return False

    def _merge(self, size: int, keep=None) -> None:
        """Replaces the last ``size`` parts by one part [first of them, a fresh number]: renamed into place
        first, then the old parts removed."""
        group = self._tail[len(self._tail) - size:]
        rows = reader.merge_rows([reader.read_part(part) for part, _ in group])
        if keep is not None:
            rows = keep(rows)
        first, last = group[0][0].first, self._next
        path = write_metrics_part(self.run_dir, rows, first, last, self.token)
        self._next += 1
        for part, _ in group:
            part.path.unlink(missing_ok=True)
        self._tail[len(self._tail) - size:] = [(Part(path, first, last), len(rows))]


def _lock(run_dir: Path) -> int:
    """An exclusive flock on RUN/.lock, or a one-line refusal naming the process that holds it."""
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(f"{run_dir}: another probe is writing to it ({holder!r}); only one writer per "
                                 "run directory: wait for it to close, or choose another run_dir") from None
    except OSError:
        os.close(fd)
        raise
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def _row_count(part: Part) -> int:
    try:
        return pq.read_metadata(part.path).num_rows
    except Exception:  # a damaged part: count it as small; reading it says what is wrong
        return 0


def _fitting_tail(rows: list[int]) -> int:
    """How many of the last parts (row counts ``rows``) merge into one of at most MAX_MERGED_ROWS rows."""
    total = size = 0
    for count in reversed(rows):
        if total + count > MAX_MERGED_ROWS:
            break
        total, size = total + count, size + 1
    return size


def _level(rows: int) -> int:
    """floor(log16 rows), in integers (0 for 0 rows)."""
    level = 0
    while rows >= COMPACT_FANOUT:
        rows //= COMPACT_FANOUT
        level += 1
    return level


def _remove_temporaries(run_dir: Path) -> None:
    """Half-written files of a killed writer (".NAME.tmp-PID-TOKEN"): never read, removed under the lock."""
    for folder in (run_dir, run_dir / "metrics", run_dir / "snapshots"):
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    entry.unlink(missing_ok=True)

