"""Runs killed at random moments: the run directory still reads back, and report and inspect work on it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import loft_probe
from loft_probe import cli

TRAINING = """
import os, sys, torch, torch._dynamo  # the first optimizer built imports torch._dynamo: here, before the forks
from loft_probe import LoFT, Snapshots, add_lora, attach

def train(run_dir):
    torch.manual_seed(0)
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)),
                     rank=2, targets=["0", "2"])
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, run_dir, every=1, snapshots=Snapshots([2, 6, 10, 14]), shadow=True)
    os.write(1, f"ready {os.getpid()} {run_dir}\\n".encode())  # one write: the three share the pipe
    for step in range(100000):
        opt.zero_grad()
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        probe.log(loss=loss.item())

for run_dir in sys.argv[1:]:  # one forked process per run: torch is imported once, as a fork server does
    if os.fork() == 0:
        train(run_dir)
        os._exit(0)
while True:  # until every run's process is gone
    try:
        os.wait()
    except ChildProcessError:
        break
"""


SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """{seed: run directory}: one training process per seed, forked together from one that imported torch and
    loft_probe (seconds each time), each SIGKILLed at its own random moment once all are training."""
    root = tmp_path_factory.mktemp("killed")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINING), *(str(root / str(s)) for s in SEEDS)],
                              stdout=subprocess.PIPE, text=True)
    pids, delays = {}, {seed: random.Random(seed).uniform(0.2, 1.5) for seed in SEEDS}
    try:
        for _ in SEEDS:
            word, pid, run_dir = parent.stdout.readline().split()
            assert word == "ready"
            pids[int(Path(run_dir).name)] = int(pid)
        ready = time.monotonic()  # the last one is ready: every process is training by now
        for seed in sorted(SEEDS, key=delays.get):
            time.sleep(max(0.0, ready + delays[seed] - time.monotonic()))
            os.kill(pids[seed], signal.SIGKILL)  # somewhere in the middle of writing
        assert parent.wait(timeout=60) == 0  # it reaped its three killed children and returned
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert sorted(pids) == list(SEEDS)
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
