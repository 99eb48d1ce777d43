"""Property-based tests: LoFT over shapes, ranks, dtypes and scales; the run-directory reader over corrupted files."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import damage_a_file
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from loft_probe import LoFT, Snapshots, add_lora, attach, load_run
from loft_probe.optim.functional import PARTNER_CUTOFF
from loft_probe.run import RunDirError


@st.composite
def pair_problems(draw):
    m, n = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    r = draw(st.integers(1, min(m, n)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.floats(0.05, 20.0))
    init = draw(st.sampled_from(["random", "zero_B", "collapsed_A", "tiny"]))
    second_moment = draw(st.sampled_from(["full", "simple"]))
    seed = draw(st.integers(0, 2**16))
    return m, n, r, dtype, scale, init, second_moment, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair_problems())
def test_loft_stays_finite(problem):
    m, n, r, dtype, scale, init, second_moment, seed = problem
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=gen, dtype=dtype)
    A = torch.randn(r, n, generator=gen, dtype=dtype)
    if init == "zero_B":
        B.zero_()
    elif init == "collapsed_A":
        A = A[:1].repeat(r, 1)
    elif init == "tiny":
        B, A = B * 1e-6, A * 1e-6  # LoFT state scales as 1/‖partner‖²: float32 overflows below ~1e-15
    B, A = torch.nn.Parameter(B), torch.nn.Parameter(A)
    W0 = torch.randn(m, n, generator=gen, dtype=dtype)
    X = torch.randn(n, 7, generator=gen, dtype=dtype)
    opt = LoFT([{"params": [B, A], "lora_scale": scale}], lr=1e-2, second_moment=second_moment, max_grad_norm=1.0)
    for _ in range(6):
        opt.zero_grad()
        ((W0 + scale * B @ A) @ X).pow(2).mean().backward()
        opt.step()
        for tensor in [B, A, *opt.state[B].values(), *opt.state[A].values()]:
            assert torch.isfinite(tensor).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.floats(0.1, 10.0), st.integers(0, 2**16))
def test_square_full_rank_is_adamw(r, scale, seed):
    """Wherever m = n = r with well-conditioned factors, LoFT's s·B·A is AdamW on ΔW.

    Well-conditioned throughout: a trajectory that drives a factor's σ_min below the partner cutoff
    (seed 1960 at r = 4: B's reaches 0.9% of its σ_max at step 11) leaves the exact regime by design,
    because LoFT then treats that direction as absent; such draws are discarded, not loosened for.
    The tolerance is per entry and follows the oracle's conditioning, not LoFT's: Adam's step
    m̂/√v̂ at an entry whose gradient is tiny is ill-conditioned in v. LoFT forms the full-space v
    as quadratic forms whose rounding is absolute, about ε·max|G|², so at entry ij the step can
    differ by lr·ε·max|G|²/v̂_ij (seed 65535 at r = 6: |G_ij| = 1.4e-3 beside max|G| = 20 gives
    2.8e-11 at step 1, inside this bound of 4.2e-10; well-spread gradients agree to 1e-15).
    """
    gen = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    B = torch.nn.Parameter(Q1 * torch.linspace(1, 2, r, dtype=torch.float64))
    A = torch.nn.Parameter(Q2)
    target = torch.randn(r, r, generator=gen, dtype=torch.float64)
    delta = torch.nn.Parameter((scale * B @ A).detach().clone())
    lr, betas = 1e-2, (0.9, 0.999)
    opt = LoFT([{"params": [B, A], "lora_scale": scale}], lr=lr, betas=betas)
    adamw = torch.optim.AdamW([delta], lr=lr, betas=betas, weight_decay=0.0)
    rounding = torch.zeros_like(delta)
    for step in range(1, 13):
        opt.zero_grad()
        (scale * B @ A - target).pow(2).sum().backward()
        opt.step()
        adamw.zero_grad()
        (delta - target).pow(2).sum().backward()
        adamw.step()
        assume(min(_conditioning(B), _conditioning(A)) > 2 * PARTNER_CUTOFF)
        v_hat = adamw.state[delta]["exp_avg_sq"] / (1 - betas[1] ** step)
        rounding += lr * torch.finfo(torch.float64).eps * delta.grad.abs().max() ** 2 / v_hat
    difference = (scale * B.detach() @ A.detach() - delta.detach()).abs()
    allowed = 1e-9 * delta.detach().abs() + 1e-11 + rounding
    assert (difference <= allowed).all(), f"worst excess {(difference - allowed).max():.3g}"


def _conditioning(factor: torch.Tensor) -> float:
    sigma = torch.linalg.svdvals(factor.detach())
    return (sigma[-1] / sigma[0]).item()


@pytest.fixture(scope="module")
def valid_run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = add_lora(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)), rank=2, targets=["0", "1"])
    opt = LoFT.from_model(model, lr=1e-2)
    run_dir = tmp_path_factory.mktemp("valid") / "run"
    with attach(model, opt, run_dir, every=1, snapshots=Snapshots([2]), shadow=True) as probe:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(5, 6)).pow(2).mean().backward()
            opt.step()
            probe.log(loss=1.0)
    return run_dir


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1000), position=st.floats(0, 1), action=st.sampled_from(["truncate", "flip", "garbage"]),
       data=st.binary(min_size=0, max_size=64))
def test_corrupted_run_directories_give_a_one_line_error(valid_run_dir, which, position, action, data):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(valid_run_dir, run_dir)
        damage_a_file(run_dir, which, position, action, data)
        try:
            run = load_run(run_dir)
            for step in run.snapshot_steps:
                run.snapshot(step)
        except RunDirError as exc:
            message = str(exc)
            assert "\n" not in message and str(run_dir) in message
