"""Probes against oracles: torch.optim.AdamW, a dense autograd gradient, the literal LoFT reference."""

from __future__ import annotations

import atexit
import copy
import signal
import time
import warnings

import pandas as pd
import pytest
import torch
from helpers import F64, lora_mlp, mlp, start, train_until_killed
from torch.testing import assert_close

import loft_probe
from loft_probe import LoFT, add_lora, attach, load_run, lora_pairs
from loft_probe.optim.reference import ReferenceLoFT
from loft_probe.probe import Gradients, Labels, ProbeWarning, Snapshots, at, dense_then_every, every, log_spaced
from loft_probe.probe.recording import all_finite
from loft_probe.run import METRICS, RunDirError
from loft_probe.run import writer as run_writer


def batches(n: int, seed: int = 0, batch: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=gen, dtype=F64), torch.randn(batch, 5, generator=gen, dtype=F64))
            for _ in range(n)]


def train(model, optimizer, data, probe=None):
    for x, y in data:
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        if probe is not None:
            probe.log(loss=loss.item())


def crash(probe) -> None:
    """What a SIGKILL does to a probe: nothing more is written, and its process's lock goes with it."""
    atexit.unregister(probe.close)
    probe._writing = False
    probe._remove_hooks()
    probe._writer.release()


@pytest.fixture(autouse=True)
def probe_errors_fail_tests():
    """A probe that disables itself would let a test pass on nothing: make its warning an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=ProbeWarning)
        yield


def test_shadow_is_adamw_and_full_finetuning_update_cosine_is_one(tmp_path):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    probe = attach(model, opt, tmp_path / "run", every=1, shadow=True)
    train(model, opt, batches(12), probe)
    probe.close()
    for layer in probe.layers:
        state = opt.state[layer.param]
        assert_close(layer.shadow.exp_avg, state["exp_avg"], rtol=0, atol=1e-12)
        assert_close(layer.shadow.exp_avg_sq, state["exp_avg_sq"], rtol=0, atol=1e-12)
    metrics = load_run(tmp_path / "run").metrics
    cos = metrics[metrics.metric == "shadow_update_cosine"]["value"]
    rel = metrics[metrics.metric == "shadow_update_rel_norm"]["value"]
    assert len(cos) == 12 * 2
    assert_close(torch.tensor(cos.to_numpy()), torch.ones(len(cos), dtype=F64), rtol=0, atol=1e-10)
    assert_close(torch.tensor(rel.to_numpy()), torch.ones(len(rel), dtype=F64), rtol=0, atol=1e-10)
    m_err = metrics[metrics.metric == "shadow_m_rel_error"]["value"]
    assert m_err.max() < 1e-12


def test_captured_gradient_equals_dense_autograd(tmp_path):
    model = lora_mlp()
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, tmp_path / "run", every=1, gradients=Gradients(capture=True))
    x, y = batches(1)[0]
    # Dense oracle: the same network with W = W0 + s·B·A as a leaf.
    pairs = lora_pairs(model)
    dense_W = [(p.base_weight() + p.delta_weight()).clone().requires_grad_(True) for p in pairs]
    biases = [model[0].base_layer.bias, model[2].base_layer.bias]
    h = torch.tanh(x @ dense_W[0].T + biases[0])
    ((h @ dense_W[1].T + biases[1] - y).pow(2).mean()).backward()
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    captured = [layer.capture.take().clone() for layer in probe.layers]
    for G, W, pair in zip(captured, dense_W, pairs, strict=True):
        assert_close(G, W.grad, rtol=0, atol=1e-12)
        assert_close(pair.A.grad, pair.scale * pair.B.detach().T @ G, rtol=0, atol=1e-12)  # g_A = s·Bᵀ·G
        assert_close(pair.B.grad, pair.scale * G @ pair.A.detach().T, rtol=0, atol=1e-12)  # g_B = s·G·Aᵀ
    opt.step()
    probe.close()
    metrics = load_run(tmp_path / "run").metrics
    grad_norms = metrics[(metrics.metric == "grad_norm")].set_index("layer")["value"]
    for layer, W in zip(probe.layers, dense_W, strict=True):
        assert grad_norms[layer.name] == pytest.approx(float(W.grad.norm()), rel=1e-12)


def test_recorded_loft_moments_equal_the_reference(tmp_path):
    """The probe's full-space LoFT moments are the literal reference's dense moments."""
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(9, 7, bias=False)).double(), rank=3, targets=["0"])
    pair = lora_pairs(model)[0]
    with torch.no_grad():
        pair.B.copy_(torch.randn(pair.B.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    ref = ReferenceLoFT(pair.B, pair.A, pair.scale, lr=1e-2)
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, tmp_path / "run", every=1, shadow=True)
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 7):
        x = torch.randn(20, 9, generator=gen, dtype=F64)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        ref.step(pair.B.grad.clone(), pair.A.grad.clone())
        opt.step()
        layer = probe.layers[0]
        (side,) = probe.layout.pair_sides(opt, probe.recorder.group(layer), layer.pair, F64)
        first, second = side.first, side.second
        M_B, V_B, M_A, V_A = ref.full_moments()
        moved_B = t % 2 == 1
        assert_close(first, M_B if moved_B else M_A, rtol=1e-10, atol=1e-13)
        assert_close(second, (V_B if moved_B else V_A).clamp_min(0), rtol=1e-10, atol=1e-13)
    probe.close()


def test_probing_does_not_change_training(tmp_path):
    data = batches(9)
    with_probe, without = lora_mlp(), lora_mlp()
    for model, run in ((with_probe, tmp_path / "probed"), (without, None)):
        opt = LoFT.from_model(model, lr=1e-2)
        probe = attach(model, opt, run, every=2, shadow=True) if run else None
        train(model, opt, data, probe)
        if probe:
            probe.close()
    for a, b in zip(with_probe.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_records_once_per_step_on_the_summed_gradient(tmp_path):
    model = lora_mlp()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = attach(model, opt, tmp_path / "run", every=1, gradients=Gradients(capture=True))
    data = batches(6)
    for step in range(3):
        opt.zero_grad()
        dense = [(p.base_weight() + p.delta_weight()).clone().requires_grad_(True) for p in lora_pairs(model)]
        for x, y in data[2 * step: 2 * step + 2]:  # two micro-batches per optimizer step
            (model(x) - y).pow(2).mean().backward()
            h = torch.tanh(x @ dense[0].T + model[0].base_layer.bias)
            ((h @ dense[1].T + model[2].base_layer.bias - y).pow(2).mean()).backward()
        for layer, W in zip(probe.layers, dense, strict=True):
            assert_close(layer.capture.take(), W.grad, rtol=0, atol=1e-12)
        opt.step()
    probe.close()
    steps = sorted(load_run(tmp_path / "run").metrics.query("metric == 'grad_norm'")["step"].unique())
    assert steps == [1, 2, 3]


def test_amp_grad_scaler_records_unscaled_gradients(tmp_path):
    model = lora_mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    probe = attach(model, opt, tmp_path / "run", every=1, gradients=Gradients(capture=True), grad_scaler=scaler)
    x, y = batches(1)[0]
    opt.zero_grad()
    scaler.scale((model(x) - y).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    probe.close()
    recorded = load_run(tmp_path / "run").metrics.query("metric == 'grad_norm'").set_index("layer")["value"]
    # Oracle: the same model, an unscaled backward pass, captured by a probe without a scaler.
    oracle = attach(twin, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad]), tmp_path / "twin",
                    every=1, gradients=Gradients(capture=True))
    (twin(x) - y).pow(2).mean().backward()
    for layer in oracle.layers:
        assert recorded[layer.name] == pytest.approx(float(layer.capture.take().norm()), rel=1e-12)
    oracle.close()


def test_run_directory_round_trip_and_snapshots(tmp_path):
    model = lora_mlp()
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, tmp_path / "run", every=2, snapshots=Snapshots([4]), shadow=True,
                   labels=Labels(seed=3, data_order="test:3", name="loft-r2"))
    train(model, opt, batches(5), probe)
    probe.close()
    run = load_run(tmp_path / "run")
    assert run.meta["method"] == "loft" and run.meta["seed"] == 3 and run.meta["closed"] is True
    assert [layer["name"] for layer in run.meta["layers"]] == ["0", "2"]
    assert run.snapshot_steps == [4, 5]  # the schedule's own, plus the last step
    assert set(run.metrics.metric) >= {"loss", "update_norm", "shadow_update_cosine", "shadow_m_cosine",
                                       "shadow_v_cosine", "residual_tangent", "intruders", "delta_rel_size"}
    assert set(run.metrics.metric) <= set(METRICS)
    assert run.last_step == 5
    snap = run.snapshot(5)
    for pair in lora_pairs(model):
        s = snap[pair.name]
        expected = torch.linalg.svdvals(pair.delta_weight() - _initial_delta(probe, pair.name))
        assert_close(s["delta.S"].double(), expected[: s["delta.S"].numel()], rtol=1e-5, atol=1e-6)
        assert s["adapter.B"].shape == pair.B.shape and s["shadow_m.U"].shape[0] == pair.shape[0]


def _initial_delta(probe, name):
    layer = next(layer for layer in probe.layers if layer.name == name)
    B0, A0 = layer.initial_factors
    return layer.pair.scale * B0 @ A0


def test_resume_appends_and_refuses_another_run(tmp_path):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches(8)
    probe = attach(model, opt, tmp_path / "run", every=1)
    train(model, opt, data[:4], probe)
    probe.close()
    probe = attach(model, opt, tmp_path / "run", every=1)  # re-attach: same base weights, same layers
    assert probe.step == 4
    train(model, opt, data[4:], probe)
    probe.close()
    assert sorted(load_run(tmp_path / "run").metrics.step.unique()) == list(range(1, 9))
    other = mlp(seed=5)
    with pytest.raises(RunDirError, match="different run"):
        attach(other, torch.optim.AdamW(other.parameters()), tmp_path / "run")


def test_unwritable_run_directory_disables_the_probe_not_training(tmp_path, monkeypatch):
    model = lora_mlp()
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, tmp_path / "run", every=1, gradients=Gradients(capture=True))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_writer, "write_metrics_part", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, batches(4), probe)
    assert [str(w.message) for w in caught if issubclass(w.category, ProbeWarning)] == [
        f"loft_probe: probe disabled, training continues: cannot write to {tmp_path / 'run'} "
        "([Errno 28] No space left on device)"]
    assert not probe.layers[0].capture._handle.hooks_dict_ref()  # hooks removed


class SignSGD(torch.optim.Optimizer):
    """An optimizer no layout knows: a sign step with a momentum the probe cannot name."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("velocity", torch.zeros_like(p))
                    buf.mul_(0.9).add_(p.grad)
                    p.sub_(group["lr"] * buf.sign())


def test_unknown_optimizer_is_probed_for_gradients_and_updates_with_one_warning(tmp_path):
    model = mlp()
    opt = SignSGD(model.parameters())
    with pytest.warns(ProbeWarning, match="register_layout"):
        probe = attach(model, opt, tmp_path / "run", every=1, shadow=True)
    train(model, opt, batches(3), probe)
    probe.close()
    metrics = set(load_run(tmp_path / "run").metrics.metric)
    assert {"update_norm", "grad_norm", "shadow_update_cosine"} <= metrics  # its own class shadows it
    assert not {"cos_moment_grad", "shadow_m_cosine"} & metrics


@pytest.mark.forks
def test_killed_run_leaves_a_readable_directory(tmp_path):
    run_dir = tmp_path / "killed"
    process = start(train_until_killed, str(run_dir), snapshots=[3], shadow=True, pause=0.01)
    try:
        deadline = time.time() + 60
        parts = run_dir / "metrics"
        while process.is_alive() and time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 8:
            time.sleep(0.05)
    finally:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL  # it was still training when killed
    run = load_run(run_dir)
    assert run.meta["closed"] is False
    assert run.last_step >= 8
    assert set(run.metrics.groupby("step").size().index) == set(range(1, run.last_step + 1))
    assert 3 in run.snapshot_steps


def test_schedules():
    assert [t for t in range(1, 13) if every(4)(t)] == [4, 8, 12]
    assert [t for t in range(1, 13) if dense_then_every(3, 5)(t)] == [1, 2, 3, 5, 10]
    assert [t for t in range(1, 13) if at([2, 11])(t)] == [2, 11]
    steps = [t for t in range(1, 1001) if log_spaced(5)(t)]
    assert steps[:3] == [1, 2, 3] and len(steps) == 16
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            every(bad)


def test_bad_arguments(tmp_path):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="needs Gradients\\(capture=True\\)"):
        attach(model, opt, tmp_path / "a", shadow=True, gradients=Gradients(capture=False))
    with pytest.raises(ValueError, match="no layer to probe"):
        attach(model, opt, tmp_path / "b", layers="nothing*")
    with pytest.raises(ValueError, match="Snapshots.k must be an integer >= 1, got 0"):
        attach(model, opt, tmp_path / "c", snapshots=Snapshots(k=0))
    with pytest.raises(ValueError, match="not optimized by the given optimizer"):
        attach(model, torch.optim.AdamW(model[0].parameters()), tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a run directory"):
        attach(model, opt, tmp_path / "e")
    assert loft_probe.load_run is load_run


def test_checkpoint_resume_continues_the_record_exactly(tmp_path):
    """Optimizer + probe checkpoint mid-run → fresh objects → the same metrics as an uninterrupted run."""
    data = batches(10)
    model = lora_mlp()
    opt = LoFT.from_model(model, lr=1e-2)
    with attach(model, opt, tmp_path / "whole", every=2, shadow=True) as probe:
        train(model, opt, data, probe)

    model = lora_mlp()
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, tmp_path / "resumed", every=2, shadow=True)
    train(model, opt, data[:5], probe)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "probe": probe.state_dict()},
               tmp_path / "ckpt.pt")
    probe._flush()  # a crash right after the checkpoint: nothing else written, the probe is never closed
    crash(probe)

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = lora_mlp(seed=0)
    model.load_state_dict(checkpoint["model"])
    opt = LoFT.from_model(model, lr=1e-2)
    opt.load_state_dict(checkpoint["opt"])
    probe = attach(model, opt, tmp_path / "resumed", every=2, shadow=True)  # appends to the same directory
    probe.load_state_dict(checkpoint["probe"])
    train(model, opt, data[5:], probe)
    probe.close()

    whole, resumed = (load_run(tmp_path / name).metrics.sort_values(["step", "layer", "metric"])
                      .reset_index(drop=True) for name in ("whole", "resumed"))
    assert whole[["step", "layer", "metric"]].equals(resumed[["step", "layer", "metric"]])
    assert_close(torch.tensor(resumed.value.to_numpy()), torch.tensor(whole.value.to_numpy()), rtol=1e-12,
                 atol=1e-14)


def test_nonfinite_gradient_is_recorded_and_kept_out_of_the_shadow(tmp_path):
    data = batches(4)
    x, y = data[2]
    bad = (x.clone().index_fill_(1, torch.tensor([0]), float("nan")), y)  # every gradient becomes NaN
    # LoFT skips the step: the probe records the skip as step 3, with its own (NaN) loss, and feeds no shadow.
    model = lora_mlp()
    opt = LoFT.from_model(model, lr=1e-2)
    probe = attach(model, opt, tmp_path / "loft", every=1, shadow=True)
    train(model, opt, data[:2], probe)
    shadows = [(layer.shadow.exp_avg.clone(), layer.shadow.step) for layer in probe.layers]
    train(model, opt, [bad], probe)
    for layer, (exp_avg, step) in zip(probe.layers, shadows, strict=True):
        assert torch.equal(layer.shadow.exp_avg, exp_avg) and layer.shadow.step == step
    assert probe.step == 3
    train(model, opt, data[3:], probe)
    probe.close()
    metrics = load_run(tmp_path / "loft").metrics
    assert metrics.query("metric == 'skipped_step'")[["step", "layer"]].values.tolist() == [[3, ""]]
    loss = metrics.query("metric == 'loss'").set_index("step")["value"]
    assert sorted(loss.index) == [1, 2, 3, 4] and loss[[1, 2, 4]].notna().all() and pd.isna(loss[3])
    assert metrics.query("step == 3 and layer != ''").empty  # nothing moved: no layer rows at the skipped step
    assert torch.isfinite(torch.tensor(metrics.query("step == 4 and layer != ''").value.to_numpy())).all()
    # AdamW takes the step: the probe flags each layer's gradient and keeps it out of the shadow.
    model = lora_mlp()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = attach(model, opt, tmp_path / "adamw", every=1, shadow=True)
    train(model, opt, data[:2], probe)
    shadows = [layer.shadow.exp_avg.clone() for layer in probe.layers]
    train(model, opt, [bad], probe)
    assert all(torch.equal(layer.shadow.exp_avg, m) for layer, m in zip(probe.layers, shadows, strict=True))
    probe.close()
    flagged = load_run(tmp_path / "adamw").metrics.query("metric == 'nonfinite_grad'")
    assert sorted(flagged.layer) == ["0", "2"] and set(flagged.step) == {3}


@pytest.mark.parametrize("build", ["own", "peft"])
def test_lora_dropout_warns_once_at_attach_when_g_is_captured(tmp_path, build):
    """With LoRA dropout the factors see a dropped-out input, the captured G the whole layer's: one warning."""
    def model_with(dropout: float) -> torch.nn.Module:
        if build == "own":
            return add_lora(mlp(), rank=2, targets=["0", "2"], dropout=dropout)
        peft = pytest.importorskip("peft")
        return peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=dropout))

    def probe_of(model, run: str, **options):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return attach(model, optimizer, tmp_path / run, every=1, **options)

    model = model_with(0.1)
    with pytest.warns(ProbeWarning) as caught:
        probe = probe_of(model, "dropout", shadow=True)
        train(model, probe.optimizer, batches(2), probe)
        probe.close()
    assert [str(w.message) for w in caught] == [
        "loft_probe: 2 of 2 LoRA layer(s) have dropout p=0.1: their factors see a dropped-out input, the captured "
        "G the whole layer's, so the projection residuals and the shadow (fed G) match the factors' gradients "
        "only in expectation; train with LoRA dropout 0 for an exact comparison"]
    probe_of(model, "no_capture").close()  # no captured G: nothing to warn about (warnings are errors here)
    probe_of(model_with(0.0), "no_dropout", shadow=True).close()


# ---------------------------------------------------------------------------------------------- step size, schedule
def test_lr_schedule_and_step_size_are_recorded_with_the_steps_own_lr(tmp_path):
    """The lr a step was taken with (a scheduler changes it after optimizer.step), and ‖ΔW‖/(lr·sqrt(mn)) from it;
    AdamW's first step moves every entry by lr (|m̂|/sqrt(v̂) = 1), so that ratio is 1 up to eps."""
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-12)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    with attach(model, optimizer, tmp_path / "run", every=1):
        for x, y in batches(4):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
    run = load_run(tmp_path / "run")
    lr = run.rows("lr", [""]).set_index("step")["value"]
    assert lr.to_dict() == pytest.approx({1: 1e-2, 2: 5e-3, 3: 2.5e-3, 4: 1.25e-3})
    assert set(run.rows("beta1", [""])["value"]) == {0.9} and set(run.rows("beta2", [""])["value"]) == {0.999}
    ratio = run.rows("update_lr_ratio").set_index(["step", "layer"])["value"]
    assert ratio.loc[(1, "0")] == pytest.approx(1.0, rel=1e-6) and ratio.loc[(1, "2")] == pytest.approx(1.0, rel=1e-6)
    assert (ratio <= loft_probe.optim.functional.adam_ratio_bound(4, (0.9, 0.999)) + 1e-9).all()


def test_undefined_metrics_are_missing_rows_never_numbers(tmp_path):
    """A layer whose input is zeroed has G = 0: its cosines and residuals are undefined, so absent; a frozen
    factor's movement is a real 0."""
    model = lora_mlp()
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 0.0,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    with attach(model, optimizer, tmp_path / "run", every=1, shadow=True):  # no decay: ΔW = 0 in the dead layer
        next(pair for pair in lora_pairs(model) if pair.name == "2").A.requires_grad_(False)  # frozen after attach
        train(model, optimizer, batches(3))
    metrics = load_run(tmp_path / "run").metrics
    assert not metrics["value"].isna().any()
    dead = metrics[metrics["layer"] == "0"]
    assert set(dead.loc[dead["metric"] == "grad_norm", "value"]) == {0.0}
    for undefined in ("residual_tangent", "cos_update_grad", "shadow_update_cosine", "cos_moment_grad"):
        assert undefined not in set(dead["metric"]), undefined
    alive = metrics[metrics["layer"] == "2"]
    assert set(alive.loc[alive["metric"] == "factor_a_change_norm", "value"]) == {0.0}
    assert (alive.loc[alive["metric"] == "factor_b_change_norm", "value"] > 0).all()
    assert {"residual_tangent", "shadow_update_cosine"} <= set(alive["metric"])


def test_the_finite_check_is_exact_where_the_fast_sum_overflows():
    big = torch.full((4, 4), 3e38)  # finite entries, an infinite float32 sum
    assert all_finite(big) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(4, 4, dtype=F64)
        x[2, 3] = bad
        assert not all_finite(x)
    x = big.clone()
    x[0, 0] = -float("inf")
    assert not all_finite(x)


def test_deepspeed_zero3_parameters_are_refused_with_one_line(tmp_path):
    model = mlp()
    model[0].weight.ds_id = 0  # how DeepSpeed ZeRO-3 tags a partitioned parameter
    with pytest.raises(ValueError, match="DeepSpeed ZeRO partitioned parameters are not supported"):
        attach(model, torch.optim.AdamW(model.parameters()), tmp_path / "run")
    assert not (tmp_path / "run").exists()
