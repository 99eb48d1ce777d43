"""Run cells in worker processes, one BLAS thread each; a worker that dies costs only the cell it was running.

Each worker is a process that trains one cell at a time with `loft_probe.runner.run` and answers on its own
pipe. Workers fork from a fork server that imported torch and the runner once (spawn where there is no
fork server): a worker starts in a fraction of a second instead of the seconds an import of torch takes.
The parent waits on the pipes and on the processes' sentinels together, so a worker killed mid-cell
(SIGKILL, out of memory) is noticed at once: its cell is reported failed and a fresh worker takes its
place. A worker also exits when the sweep's process dies, so a killed sweep leaves no orphan writing into a
run directory that the next run of the sweep will redo.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import connection, get_all_start_methods, get_context, parent_process
from pathlib import Path

from loft_probe.runner import RunConfig
from loft_probe.tasks import Task, build_task

STOP = None  # sent to a worker: no more cells
JOIN_TIMEOUT_S = 5.0  # a stopped worker that has not exited by then is terminated
# Imported once by the fork server: torch and the runner, the digits data, and torch._dynamo, which torch.optim
# imports when the first optimizer is built (1.4 s of a worker's 1.65 s on its first digits cell, measured).
PRELOAD = ["loft_probe.runner", "sklearn.datasets", "torch._dynamo"]


@dataclass
class Outcome:
    """What became of one cell: ``error`` is one line (empty when ok), ``detail`` the traceback if any;
    ``cpu_seconds`` is the worker's CPU time on the cell (NaN when it died): on a shared machine, the cost of
    the cell that wall time, stretched by other jobs, does not give."""

    name: str
    ok: bool
    seconds: float
    error: str = ""
    detail: str = ""
    cpu_seconds: float = math.nan


@dataclass
class _Worker:
    process: object  # multiprocessing's SpawnProcess
    conn: connection.Connection
    cell: str | None = None
    started: float = 0.0


def run_cells(jobs: Sequence[tuple[str, RunConfig]], workers: int, on_start: Callable[[str], None],
              on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
    """Train every ``(name, config)`` on at most ``workers`` processes; returns the outcomes in finishing order.

    ``on_start(name)`` and ``on_outcome(outcome)`` are called in this process as cells start and end.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {workers!r}")
    pending = deque(jobs)
    context = _context()
    pool: list[_Worker] = []
    outcomes: list[Outcome] = []

    def start_worker() -> _Worker:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_serve, args=(child_end,), daemon=True)
        with _one_thread_env():
            process.start()
        child_end.close()  # only the worker holds it now: the parent reads EOF when the worker dies
        worker = _Worker(process, parent_end)
        pool.append(worker)
        return worker

    try:
        idle = [start_worker() for _ in range(min(workers, len(pending)))]
        busy: list[_Worker] = []
        while pending or busy:
            while idle and pending:
                worker = idle.pop()
                worker.cell, config = pending.popleft()
                worker.started = time.perf_counter()
                on_start(worker.cell)
                try:
                    worker.conn.send((worker.cell, config))
                except OSError:  # it died while idle: the cell fails like one it died in; a fresh worker goes on
                    worker.process.join(JOIN_TIMEOUT_S)
                    worker.conn.close()
                    outcome = Outcome(worker.cell, False, 0.0, f"the worker process died before the cell started "
                                                               f"({_exit(worker.process)})")
                    outcomes.append(outcome)
                    on_outcome(outcome)
                    if pending:
                        idle.append(start_worker())
                    continue
                busy.append(worker)
            ready = set(connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in [w for w in busy if w.conn in ready or w.process.sentinel in ready]:
                busy.remove(worker)
                outcome = _answer(worker)
                if outcome is None:  # the worker died mid-cell
                    outcome = Outcome(worker.cell, False, time.perf_counter() - worker.started,
                                      f"the worker process died while running the cell ({_exit(worker.process)})")
                    worker.conn.close()
                    if pending:
                        idle.append(start_worker())
                else:
                    idle.append(worker)
                outcomes.append(outcome)
                on_outcome(outcome)
    finally:
        _stop(pool)
    return outcomes


def _context():
    """forkserver where there is one (a plain fork would copy the parent's torch threads and locks), else spawn."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(fork_server_preload())  # imported once by the server; an ImportError is skipped
    return context


def fork_server_preload() -> list[str]:
    """PRELOAD, without loft_probe's own modules when the working directory holds another copy of loft_probe:
    the fork server starts with the working directory first on its path (Python 3.11 does not give it the
    parent's sys.path), so it would preload that copy and the workers would run its code. Without the preload
    they import loft_probe through the parent's path, as a spawned process does."""
    here = Path(__file__).resolve().parents[1]  # the loft_probe package this process runs
    there = Path.cwd() / "loft_probe"
    if there.is_dir() and there.resolve() != here:
        return [name for name in PRELOAD if name.split(".")[0] != "loft_probe"]
    return PRELOAD


def _answer(worker: _Worker) -> Outcome | None:
    """The worker's outcome, or None when its pipe is closed (the process died)."""
    try:
        if worker.conn.poll():
            return worker.conn.recv()
    except (EOFError, OSError):
        pass
    worker.process.join(JOIN_TIMEOUT_S)
    return None


def _exit(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _stop(pool: list[_Worker]) -> None:
    for worker in pool:
        try:
            worker.conn.send(STOP)
        except (OSError, ValueError):
            pass  # dead already, or its pipe closed
    for worker in pool:
        worker.process.join(JOIN_TIMEOUT_S)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join()
        worker.conn.close()


@contextmanager
def _one_thread_env() -> Iterator[None]:
    """OMP_NUM_THREADS=1 while a worker starts (it inherits the environment), then the caller's again."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _exit_with_the_sweep() -> None:
    """Exit the moment the sweep's process dies. A fork server's children keep it alive, and it is their
    parent, so neither waits for the other: a thread watches the sweep's own sentinel instead (it reads end
    of file when the sweep dies) and ends the worker, mid-cell too, whatever the start method."""
    sweep = parent_process()
    if sweep is not None:
        watch = threading.Thread(target=lambda: (connection.wait([sweep.sentinel]), os._exit(1)), daemon=True)
        watch.start()


def _fresh_task(config: RunConfig, built: dict[tuple, Task]) -> Task:
    """The cell's task with an untouched copy of its model. The last task built is kept: a grid's cells come
    seed by seed, so consecutive cells share it and the task (digits pretrains, MiniLM loads and tokenises)
    is built once per seed and worker instead of once per cell."""
    key = (config.task, config.seed, json.dumps(config.task_options, sort_keys=True))
    if key not in built:
        built.clear()
        built[key] = build_task(config.task, seed=config.seed, **config.task_options)
    task = built[key]
    return replace(task, model=copy.deepcopy(task.model))


def _serve(conn: connection.Connection) -> None:
    """A worker's life: train the cells it is sent, one at a time, answering each with an `Outcome`."""
    _exit_with_the_sweep()
    import torch

    from loft_probe.runner import run

    torch.set_num_threads(1)
    built: dict[tuple, Task] = {}
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is STOP:
            return
        name, config = job
        start, cpu = time.perf_counter(), time.process_time()
        try:
            run(config, task=_fresh_task(config, built))
            outcome = Outcome(name, True, time.perf_counter() - start)
        except Exception as exc:  # any error of one cell is that cell's result; the sweep goes on
            error = " ".join(str(exc).split()) or type(exc).__name__
            outcome = Outcome(name, False, time.perf_counter() - start, f"{type(exc).__name__}: {error}",
                              traceback.format_exc())
        outcome.cpu_seconds = time.process_time() - cpu
        conn.send(outcome)
