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


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_leaves_a_readable_run(tmp_path, seed):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINING), str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.Random(seed).uniform(0.2, 1.5))  # somewhere in the middle of writing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = loft_probe.load_run(run_dir)
    assert run.meta["closed"] is False
    steps = sorted(run.metrics.step.unique())
    assert steps == list(range(1, run.last_step + 1))  # every flushed step whole, none half-written
    for step in run.snapshot_steps:
        assert run.snapshot(step)  # every snapshot that exists reads
    page = loft_probe.report([run], tmp_path / "report")
    assert page.is_file() and (tmp_path / "report" / "report.md").is_file()
    result = CliRunner().invoke(cli.app, ["inspect", str(run_dir)])
    assert result.exit_code == 0 and str(run.last_step) in result.stdout
