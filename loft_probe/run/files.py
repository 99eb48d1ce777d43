"""Safe file access for run directories: atomic writes, and reads that treat the directory as untrusted input.

Only regular files inside a run directory are opened (no symbolic links, FIFOs or devices), each under a size
cap checked before reading; every violation is one :class:`RunDirError` line naming the file.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


class RunDirError(ValueError):
    """A run directory that is missing, corrupt or of another format; the message names the file."""


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: readers see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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

