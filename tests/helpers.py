"""Small helpers the tests share: float64, tight tolerances, seeded random tensors, the tiny float64 MLP (plain
and with LoRA), a damaged run file; processes forked from one fork server per session: a training process to
kill, distributed jobs on processes started once."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loft_probe import add_lora, lora_pairs

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 math tests


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def damage_a_file(run_dir, which: int, position: float, action: str, data: bytes) -> None:
    """Truncate, bit-flip or overwrite with ``data`` one file of a run directory (the lock file aside): the
    ``which``-th in sorted order (mod their number), at ``position`` (0–1) of its length."""
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")
    victim = files[which % len(files)]
    content = victim.read_bytes()
    cut = int(position * len(content))
    if action == "truncate":
        victim.write_bytes(content[:cut])
    elif action == "flip" and content:
        index = min(cut, len(content) - 1)
        victim.write_bytes(content[:index] + bytes([content[index] ^ 0xFF]) + content[index + 1:])
    else:
        victim.write_bytes(data)


def train(model, optimizer, batches, probe) -> None:
    """A plain loop on (x, y) batches with a squared-error loss, logging the loss to the probe."""
    for x, y in batches:
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        probe.log(loss=loss.item())


@pytest.fixture(params=[False, True], ids=["per-pair", "foreach"])
def both_loft_paths(request, monkeypatch):
    """Runs a test twice: LoFT pair by pair, and as stacks (``foreach=True`` stacks even a lone pair).
    Modules that use it on every test import it and apply it with ``pytestmark``."""
    from loft_probe.optim import LoFT

    monkeypatch.setitem(LoFT.__init__.__kwdefaults__, "foreach", request.param)
    return request.param


def mlp(seed: int = 0, dtype: torch.dtype = F64) -> torch.nn.Module:
    """The tests' tiny model: Linear(8, 12), Tanh, Linear(12, 5), seeded (its layers are named "0" and "2")."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5)).to(dtype)


def lora_mlp(seed: int = 0, rank: int = 2) -> torch.nn.Module:
    """:func:`mlp` with LoRA (α = 2r) on both layers and a non-zero B: PEFT's B = 0 hides every A-side bug."""
    model = add_lora(mlp(seed), rank=rank, alpha=2 * rank, targets=["0", "2"])
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pair in lora_pairs(model):
            pair.B.copy_(0.3 * torch.randn(pair.B.shape, generator=gen, dtype=F64))
    return model


@dataclass
class SpawnedJobs:
    """What :func:`spawn_jobs` left: the jobs every rank finished, and what ended the others."""

    root: Path
    finished: set[str]
    error: str

    def require(self, name: str) -> Path:
        """Job ``name``'s folder; fails the calling test, with the workers' error, unless it finished on every
        rank."""
        if name not in self.finished:
            pytest.fail(f"distributed job {name!r} did not finish on every rank: {self.error}", pytrace=False)
        return self.root / name


def _run_jobs(rank: int, jobs: dict, root: Path) -> None:
    for name, (worker, paths) in jobs.items():
        worker(rank, str(root / name / "init"), *(str(root / name / path) for path in paths))
        (root / name / f"done.{rank}").touch()


def fork_server():
    """The multiprocessing context the tests start processes from: one fork server per pytest process, which
    imported torch, torch._dynamo (the first optimizer built imports it), peft and the sweeps' preload once. A
    process forked from it starts in milliseconds, where a fresh interpreter spends seconds importing those. A
    sweep later in the session forks its workers from this server too (its own preload is then ignored), hence
    the sweeps' preload here. Each child imports the tests' own modules itself: Python 3.11's fork server does
    not take the parent's sys.path, so they cannot be preloaded. Spawn where there is no fork server."""
    import multiprocessing

    from loft_probe.sweeps.pool import fork_server_preload

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_importable([*fork_server_preload(), "peft"]))  # no effect once it runs
    return context


def start(target: Callable, *args, daemon: bool = True, **kwargs):
    """``target(*args, **kwargs)`` in a new process from :func:`fork_server`; the started
    ``multiprocessing.Process`` (``kill()`` SIGKILLs it). A daemon is killed at exit if a test leaves it, but
    cannot start processes of its own."""
    process = fork_server().Process(target=target, args=args, kwargs=kwargs, daemon=daemon)
    process.start()
    return process


def train_until_killed(run_dir: str, snapshots: list[int] | None = None, shadow: bool = False, lr: float = 1e-2,
                       pause: float = 0.0, ready=None) -> None:
    """A kill test's training process: a LoRA MLP (16 → 16 → 4, r = 2) trained by LoFT on random batches under a
    probe that records every step into ``run_dir``, until something kills it. ``snapshots``: the probe's
    snapshot steps (None: its default); ``pause``: seconds between steps; ``ready`` (a queue) gets
    ``(run_dir, pid)`` once the probe is attached."""
    import os

    from loft_probe import LoFT, Snapshots, attach

    torch.manual_seed(0)
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)),
                     rank=2, targets=["0", "2"])
    optimizer = LoFT.from_model(model, lr=lr)
    options = {} if snapshots is None else {"snapshots": Snapshots(snapshots)}
    probe = attach(model, optimizer, run_dir, every=1, shadow=shadow, **options)
    if ready is not None:
        ready.put((run_dir, os.getpid()))
    while True:
        optimizer.zero_grad()
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        probe.log(loss=loss.item())
        time.sleep(pause)


def run_cli(*args: str) -> None:
    """The ``loft-probe`` command with ``args``, as :func:`start`'s target: a real process (its exit code is
    the command's) without an interpreter's imports."""
    from loft_probe import cli

    cli.app(args=list(args), prog_name="loft-probe")


def spawn_jobs(jobs: dict[str, tuple[Callable, tuple[str, ...]]], root: Path, world: int = 2,
               deadline_s: float = 300.0) -> SpawnedJobs:
    """Runs ``worker(rank, init_file, *paths)`` for each job ``name: (worker, paths)``, in order, on ``world``
    processes started once from :func:`fork_server` (a job on the tests' tiny models costs a fraction of a
    process's imports). ``init_file`` (a file:// rendezvous) and ``paths`` lie in ``root / name``; each worker
    sets up and tears down its own process group. A job that raises on a rank ends the processes, and so the
    jobs after it; so does passing ``deadline_s`` (all jobs together: a hung collective). What ended them is the
    result's ``error``, for the tests to report."""
    import torch.multiprocessing as mp

    start_method = fork_server().get_start_method()
    for name in jobs:
        (root / name).mkdir()
    deadline, error = time.monotonic() + deadline_s, ""
    try:
        context = mp.start_processes(_run_jobs, args=(jobs, root), nprocs=world, join=False,
                                     start_method=start_method)
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                error = f"the workers hung: killed after {deadline_s:.0f} s"
                break
    except Exception as exc:  # a worker raised (its traceback) or died, or none could start
        error = f"{type(exc).__name__}: {exc}"
    finished = {name for name in jobs if all((root / name / f"done.{rank}").is_file() for rank in range(world))}
    return SpawnedJobs(root, finished, error)


def _importable(names: list[str]) -> list[str]:
    """The modules among ``names`` that import here without error. A fork server skips a preload that raises
    ImportError but dies of any other error (a version skew between peft and transformers raises RuntimeError),
    and then no job could start."""
    import importlib

    importable = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (whatever it raises, the workers import it themselves if they need it)
            continue
        importable.append(name)
    return importable
