"""Runs killed at random moments: the run directory still reads back, and report and inspect work on it."""

from __future__ import annotations

import contextlib
import queue
import random
import signal
import time

import pytest
from helpers import fork_server, start, train_until_killed
from typer.testing import CliRunner

import loft_probe
from loft_probe import cli

pytestmark = pytest.mark.forks  # starts processes from the tests' fork server

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """{seed: run directory}: one training process per seed, forked from the tests' fork server, each SIGKILLed
    at its own random moment once all are training."""
    root = tmp_path_factory.mktemp("killed")
    ready, processes = fork_server().Queue(), {}
    delays = {seed: random.Random(seed).uniform(0.2, 1.5) for seed in SEEDS}
    try:
        for seed in SEEDS:
            processes[seed] = start(train_until_killed, str(root / str(seed)), snapshots=[2, 6, 10, 14], shadow=True,
                                    ready=ready)
        deadline = time.monotonic() + 60
        for _ in SEEDS:
            while True:
                dead = {seed: p.exitcode for seed, p in processes.items() if not p.is_alive()}
                assert not dead, f"training processes died before they were ready: exit codes {dead}"
                assert time.monotonic() < deadline, "the training processes did not start within 60 s"
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.2)
                    break
        started = time.monotonic()  # the last one is ready: every process is training by now
        for seed in sorted(SEEDS, key=delays.get):
            time.sleep(max(0.0, started + delays[seed] - time.monotonic()))
            processes[seed].kill()  # somewhere in the middle of writing
            processes[seed].join()
    finally:
        for process in processes.values():
            if process.exitcode is None:
                process.kill()
                process.join()
    assert [processes[seed].exitcode for seed in SEEDS] == [-signal.SIGKILL] * len(SEEDS)  # none died before
    return {seed: root / str(seed) for seed in SEEDS}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_moment_leaves_a_readable_run(killed, tmp_path, seed):
    run_dir = killed[seed]
    run = loft_probe.load_run(run_dir)
    assert run.meta["closed"] is False
    steps = sorted(run.metrics.step.unique())
    assert steps == list(range(1, run.last_step + 1))  # every flushed step whole, none half-written
    for step in run.snapshot_steps:
        assert sorted(run.snapshot(step)) == ["0", "2"]  # every snapshot that exists reads, both layers
    page = loft_probe.report([run], tmp_path / "report")
    assert page == tmp_path / "report" / "report.html" and page.is_file()
    assert (tmp_path / "report" / "report.md").is_file()
    result = CliRunner().invoke(cli.app, ["inspect", str(run_dir)])
    assert result.exit_code == 0 and str(run.last_step) in result.stdout
