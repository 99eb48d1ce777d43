"""The run directory's one writer: the lock, exact resume after a kill at every phase, compaction, arguments."""

from __future__ import annotations

import atexit
import io
import signal
import time
import warnings

import pandas as pd
import pytest
import torch
from helpers import lora_mlp, mlp, start, train, train_until_killed
from torch.testing import assert_close

from loft_probe import LoFT, add_lora, attach, load_run, lora_pairs
from loft_probe.probe import Labels, ProbeWarning, Snapshots
from loft_probe.run import RunDirError, RunWriter, layout, reader
from loft_probe.run import writer as writer_module
from loft_probe.runner import RunConfig, run

F64 = torch.float64
STEPS = 12
OPTIONS = {"every": 2, "snapshots": Snapshots([4, 8]), "shadow": True, "labels": Labels(seed=0, data_order="test:0")}


@pytest.fixture(autouse=True)
def probe_errors_fail_tests():
    """A probe that disables itself would let a test pass on nothing: make its warning an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=ProbeWarning)
        yield


def setup(method: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A float64 model and optimizer for full fine-tuning, LoRA (AdamW on the factors) or LoFT."""
    if method == "full":
        model = mlp()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)
    model = lora_mlp()
    if method == "loft":
        return model, LoFT.from_model(model, lr=1e-2)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=gen, dtype=F64), torch.randn(16, 5, generator=gen, dtype=F64))
            for _ in range(STEPS)]


def crash(probe) -> None:
    """What a SIGKILL does to a probe: nothing more is written, and the lock dies with its process."""
    atexit.unregister(probe.close)
    probe._writing = False
    probe._remove_hooks()
    probe._writer.release()


def checkpoint(model, optimizer, probe) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "probe": probe.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # the probe's state is plain data: no pickle needed


def assert_same_record(path_a, path_b) -> None:
    """Equal rows, values to 1e-12, equal snapshots and meta (but its creation time)."""
    a, b = load_run(path_a), load_run(path_b)
    rows_a, rows_b = (run.metrics.sort_values(["step", "layer", "metric"]).reset_index(drop=True) for run in (a, b))
    assert rows_a[["step", "layer", "metric"]].equals(rows_b[["step", "layer", "metric"]])
    assert_close(torch.tensor(rows_b.value.to_numpy()), torch.tensor(rows_a.value.to_numpy()), rtol=1e-12,
                 atol=1e-12)
    assert a.snapshot_steps == b.snapshot_steps
    for step in a.snapshot_steps:
        snap_a, snap_b = a.snapshot(step), b.snapshot(step)
        assert snap_a.keys() == snap_b.keys()
        for layer in snap_a:
            assert snap_a[layer].keys() == snap_b[layer].keys()
            for what in snap_a[layer]:
                assert_close(snap_b[layer][what], snap_a[layer][what], rtol=1e-12, atol=1e-12)
    drop = ("created", "name")
    assert {k: v for k, v in a.meta.items() if k not in drop} == {k: v for k, v in b.meta.items() if k not in drop}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The whole run of each method, never interrupted."""
    paths = {}
    for method in ("full", "lora", "loft"):
        paths[method] = tmp_path_factory.mktemp("whole") / method
        model, opt = setup(method)
        with attach(model, opt, paths[method], **OPTIONS) as probe:
            train(model, opt, data(), probe)
    return paths


# (checkpoint step, step at which the process dies): rows pending at the kill (every=2 flushes at even steps),
# a flush just done, a snapshot next (at 8), a snapshot just written, and a kill while the checkpoint of step 9
# was being saved: the run resumes from step 5, the directory holds steps 6-9 and the snapshot at 8, and those
# differ from what the resumed run records (the dead process met a NaN batch at step 7: skipped or flagged).
PHASES = {"before_flush": (5, 5), "after_flush": (6, 6), "before_snapshot": (7, 7), "after_snapshot": (8, 8),
          "mid_checkpoint": (5, 9)}
POISONED = 7  # mid_checkpoint: the batch the dead process saw at this step held NaN


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("method", ["full", "lora", "loft"])
def test_resume_after_a_kill_at_every_phase_equals_the_uninterrupted_run(tmp_path, uninterrupted, method, phase):
    saved_at, killed_at = PHASES[phase]
    batches = data()
    model, opt = setup(method)
    probe = attach(model, opt, tmp_path / method, **OPTIONS)
    train(model, opt, batches[:saved_at], probe)
    state = checkpoint(model, opt, probe)
    seen = [(x * float("nan") if step == POISONED else x, y)
            for step, (x, y) in enumerate(batches[saved_at:killed_at], saved_at + 1)]
    train(model, opt, seen, probe)
    crash(probe)

    model, opt = setup(method)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    probe = attach(model, opt, tmp_path / method, **OPTIONS)
    probe.load_state_dict(state["probe"])
    train(model, opt, batches[saved_at:], probe)
    probe.close()
    assert_same_record(uninterrupted[method], tmp_path / method)


def test_a_second_writer_is_refused_and_the_first_keeps_every_row(tmp_path):
    model, opt = setup("lora")
    probe = attach(model, opt, tmp_path / "run", every=4)
    train(model, opt, data()[:3], probe)  # nothing flushed yet
    other_model, other_opt = setup("lora")
    with pytest.raises(RunDirError, match=r"another probe is writing to it \('pid \d+ on .*only one writer"):
        attach(other_model, other_opt, tmp_path / "run", every=4)
    train(model, opt, data()[3:], probe)
    probe.close()
    assert sorted(load_run(tmp_path / "run").rows("loss").step) == list(range(1, STEPS + 1))
    with _opened(tmp_path / "run"):
        pass  # closed: the lock is free again


class _opened:
    """A RunWriter for a with-block (tests only)."""

    def __init__(self, path) -> None:
        self.writer = RunWriter.open(path)

    def __enter__(self) -> RunWriter:
        return self.writer

    def __exit__(self, *exc) -> None:
        self.writer.release()


@pytest.mark.forks
def test_the_lock_refuses_another_process_and_dies_with_a_sigkilled_writer(tmp_path):
    run_dir = tmp_path / "run"
    process = start(train_until_killed, str(run_dir), lr=0.01, pause=0.01)
    try:
        deadline = time.time() + 60
        while process.is_alive() and time.time() < deadline and (not run_dir.is_dir()
                                                                  or len(layout.list_parts(run_dir)) < 2):
            time.sleep(0.05)
        with pytest.raises(RunDirError, match=f"another probe is writing to it \\('pid {process.pid} "):
            RunWriter.open(run_dir)
    finally:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL  # it held the lock until killed
    with _opened(run_dir) as writer:  # the kill released the lock: a resume is never blocked
        assert writer.existing_meta()["hyperparameters"]["lr"] == 0.01


def test_a_checkpoint_of_another_optimizer_or_learning_rate_is_refused(tmp_path):
    model, opt = setup("lora")
    probe = attach(model, opt, tmp_path / "run", every=2)
    train(model, opt, data()[:4], probe)
    crash(probe)
    model, loft = setup("loft")
    train(model, loft, data()[:4], attach(model, loft, tmp_path / "loft", every=2))  # a LoFT state at step 4
    with pytest.raises(RunDirError, match="holds a different run: its method is 'lora', this probe's 'loft'"):
        attach(model, loft, tmp_path / "run", every=2)
    model, opt = setup("lora")
    opt.param_groups[0]["lr"] = 5e-2
    train(model, opt, data()[:4], attach(model, opt, tmp_path / "fast", every=2))
    with pytest.raises(RunDirError, match="hyperparameter lr is 0.01 there, 0.05 here"):
        attach(model, opt, tmp_path / "run", every=2)
    model, opt = setup("lora")
    train(model, opt, data()[:4], attach(model, opt, tmp_path / "same", every=2))
    with pytest.raises(RunDirError, match="its schedule is 'every 2', this probe's 'every 3'"):
        attach(model, opt, tmp_path / "run", every=3)
    with pytest.raises(RunDirError, match="its name is 'run', this probe's 'other'"):
        attach(model, opt, tmp_path / "run", every=2, labels=Labels(name="other"))
    assert load_run(tmp_path / "run").meta["method"] == "lora"  # not relabelled


def test_full_finetuning_resume_measures_delta_from_the_stored_w0(tmp_path):
    """‖W_0‖ of a dense layer comes from initial.safetensors on a resume, not from the moved weights."""
    model, opt = setup("full")
    probe = attach(model, opt, tmp_path / "run", every=2)
    norms = [layer.base_norm for layer in probe.layers]
    train(model, opt, data()[:6], probe)
    crash(probe)
    resumed = attach(model, opt, tmp_path / "run", every=2)
    assert [layer.base_norm for layer in resumed.layers] == norms
    resumed.close()


def test_compaction_keeps_parts_few_and_rows_whole(tmp_path, monkeypatch):
    fanout = 4  # the default 16 needs 16² flushes to reach the second level: 4 shows every level sooner
    monkeypatch.setattr(writer_module, "COMPACT_FANOUT", fanout)
    writer = _opened(tmp_path / "run").writer
    writer_module.write_meta(tmp_path / "run", {"method": "other", "layers": [{"name": "l", "shape": [2, 2],
                                                                          "kind": "full"}]})
    flushes = 100  # 2 rows each: levels 0 (< 4 rows) to 3 (64-255 rows)
    for step in range(1, flushes + 1):
        writer.append([(step, "", "loss", float(step)), (step, "l", "update_norm", 1.0 / step)])
        assert len(layout.list_parts(tmp_path / "run")) <= (fanout - 1) * 4 + 1  # < fanout per level, 4 levels
    run = load_run(tmp_path / "run")
    assert sorted(run.rows("loss").step) == list(range(1, flushes + 1))
    assert_close(torch.tensor(run.rows("loss").sort_values("step").value.to_numpy()),
                 torch.arange(1, flushes + 1, dtype=F64), rtol=0, atol=0)
    writer.finish({"method": "other", "layers": [{"name": "l", "shape": [2, 2], "kind": "full"}], "closed": True})
    assert len(layout.list_parts(tmp_path / "run")) == 1
    closed = load_run(tmp_path / "run").metrics
    assert closed.sort_values(["step", "layer"]).reset_index(drop=True).equals(
        run.metrics.sort_values(["step", "layer"]).reset_index(drop=True))


def test_no_merge_outgrows_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "COMPACT_FANOUT", 2)
    monkeypatch.setattr(writer_module, "MAX_MERGED_ROWS", 8)
    meta = {"method": "other", "layers": [{"name": "l", "shape": [2, 2], "kind": "full"}]}
    writer = _opened(tmp_path / "run").writer
    writer.write_meta(meta)
    for step in range(1, 21):
        writer.append([(step, "", "loss", float(step)), (step, "l", "update_norm", 1.0)])
    writer.finish(meta)
    sizes = [reader.read_part(part).num_rows for part in layout.list_parts(tmp_path / "run")]
    assert max(sizes) <= 8 and sum(sizes) == 40


def test_parts_a_compaction_replaced_are_skipped_when_a_kill_left_them(tmp_path):
    """A merged part is renamed into place before the parts it replaces are removed: a kill in between
    leaves both, and readers take the merged one (here it dropped step 3, as a resume truncation does)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer_module.write_meta(run_dir, {"method": "other", "layers": [{"name": "l", "shape": [2, 2], "kind": "full"}]})
    for step in (1, 2, 3):
        writer_module.write_metrics_part(run_dir, [(step, "", "loss", float(step))], step - 1, step - 1, "aaaaaaaa")
    writer_module.write_metrics_part(run_dir, [(1, "", "loss", 1.0), (2, "", "loss", 2.0)], 0, 3, "bbbbbbbb")
    assert sorted(load_run(run_dir).metrics.step) == [1, 2]
    with _opened(run_dir) as writer:
        writer.append([(3, "", "loss", 30.0)])  # the writer removes the leftovers first
    assert [p.path.name for p in layout.list_parts(run_dir)][0].startswith("part-000000-000003-bbbbbbbb")
    assert len(layout.list_parts(run_dir)) == 2
    assert load_run(run_dir).rows("loss").set_index("step")["value"].to_dict() == {1: 1.0, 2: 2.0, 3: 30.0}


def test_old_part_names_still_read(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer_module.write_meta(run_dir, {"method": "other", "layers": [{"name": "l", "shape": [2, 2], "kind": "full"}]})
    frame = pd.DataFrame([(1, "", "loss", 1.0)], columns=list(layout.COLUMNS))
    (run_dir / "metrics").mkdir()
    frame.to_parquet(run_dir / "metrics" / "part-000000.parquet", index=False)
    assert load_run(run_dir).rows("loss").value.tolist() == [1.0]


# ---------------------------------------------------------------------------------------------- arguments
def _loft_groups(model, swap=False, scale=True):
    pairs = lora_pairs(model)
    groups = [{"params": [p.A, p.B] if swap else [p.B, p.A], **({"lora_scale": p.scale} if scale else {})}
              for p in pairs]
    return groups


@pytest.mark.parametrize("build, message", [
    (lambda: (*setup("lora"), {"every": "12"}), "a schedule is an int, a list of steps or a Schedule, got '12'"),
    (lambda: (*setup("lora"), {"every": [2, 4.5]}), "integer steps >= 1, got \\[2, 4.5\\]"),
    (lambda: (*setup("lora"), {"labels": Labels(extra={"layers": []})}), "Labels.extra may not set \\['layers'\\]"),
    (lambda: (*setup("lora"), {"labels": Labels(name="x" * 300)}), "name must be a string of at most 256 characters"),
    (lambda: (*setup("lora"), {"labels": Labels(seed=-0.5)}), "Labels.seed must be an integer or None"),
    (lambda: (*setup("lora"), {"snapshots": [4]}), "snapshots must be a loft_probe.probe.Snapshots, got list"),
])
def test_bad_attach_arguments_are_refused_and_leave_nothing(tmp_path, build, message):
    with pytest.raises(ValueError, match=message):  # an option object refuses a bad value when it is built
        model, opt, options = build()
        attach(model, opt, tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("swap, scale, message", [
    (False, False, "its LoFT param group has no lora_scale, so LoFT would step it as plain AdamW"),
    (True, True, "must hold \\[B, A\\] of that layer in this order"),
])
def test_loft_groups_the_probe_would_mislabel_are_refused(tmp_path, swap, scale, message):
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(6, 6)).to(F64), rank=2, targets=["0"])  # square: A·B fits
    opt = LoFT(_loft_groups(model, swap, scale), lr=1e-2)
    with pytest.raises(ValueError, match=message):
        attach(model, opt, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_step_leaves_nothing(tmp_path, monkeypatch):
    from loft_probe import runner
    from loft_probe.tasks import build_task

    def broken(name, seed=0, **options):
        task = build_task(name, seed, **options)

        def loss(model, batch):
            raise RuntimeError("the first batch is bad")

        task.loss = loss
        return task

    monkeypatch.setattr(runner, "build_task", broken)
    with pytest.raises(RuntimeError, match="the first batch is bad"):
        run(RunConfig(task="matfact", method="lora", out=tmp_path / "run", steps=3, every=1,
                      task_options={"m": 8, "n": 6, "target_rank": 2}))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- divergence
def test_a_diverged_run_compares_and_is_diagnosed_as_diverged(tmp_path, uninterrupted):
    """AdamW takes a NaN step at 6: every later weight is NaN. compare answers (missing values), diagnose
    names the step and the layers, and the loss rows of each step are that step's own."""
    from typer.testing import CliRunner

    from loft_probe import cli

    model, opt = setup("lora")
    batches = [(x * float("nan") if step == 6 else x, y) for step, (x, y) in enumerate(data(), 1)]
    with attach(model, opt, tmp_path / "lora", **OPTIONS) as probe:
        train(model, opt, batches, probe)
    loss = load_run(tmp_path / "lora").rows("loss").set_index("step")["value"]
    assert loss[:5].notna().all() and loss[6:].isna().all()
    result = CliRunner().invoke(cli.app, ["compare", str(uninterrupted["full"]), str(tmp_path / "lora")])
    assert result.exit_code == 0, result.stderr
    result = CliRunner().invoke(cli.app, ["diagnose", str(tmp_path / "lora"), "--reference",
                                          str(uninterrupted["full"])])
    assert result.exit_code == 0 and "[warning] diverged: The run diverged at step 6, in layers 0, 2" in result.stdout
    assert "No loss gap to close" not in result.stdout
