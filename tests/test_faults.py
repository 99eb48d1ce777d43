"""Runs killed at random moments: the run directory still reads back, and report and inspect work on it."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

import loft_probe
from loft_probe import cli

TRAINING = """
import sys, torch
from loft_probe import LoFT, Snapshots, add_lora, attach
torch.manual_seed(0)
model = add_lora(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)),
                 rank=2, targets=["0", "2"])
opt = LoFT.from_model(model, lr=1e-2)
probe = attach(model, opt, sys.argv[1], every=1, snapshots=Snapshots([2, 6, 10, 14]), shadow=True)
print("ready", flush=True)
for step in range(100000):
    opt.zero_grad()
    loss = model(torch.randn(8, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    probe.log(loss=loss.item())
"""


SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """{seed: run directory} of one training process per seed, all started at once (each spends seconds importing
    torch, and they import side by side), each SIGKILLed at its own random moment after it is ready."""
    root = tmp_path_factory.mktemp("killed")
    procs = {seed: subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINING), str(root / str(seed))],
                                    stdout=subprocess.PIPE, text=True) for seed in SEEDS}
    delays = {seed: random.Random(seed).uniform(0.2, 1.5) for seed in SEEDS}
    try:
        assert [proc.stdout.readline().strip() for proc in procs.values()] == ["ready"] * len(SEEDS)
        ready = time.monotonic()  # the last one is ready: every process is training by now
        for seed in sorted(SEEDS, key=delays.get):
            time.sleep(max(0.0, ready + delays[seed] - time.monotonic()))
            procs[seed].send_signal(signal.SIGKILL)  # somewhere in the middle of writing
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
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
