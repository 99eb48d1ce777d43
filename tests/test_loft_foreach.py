"""The multi-tensor LoFT step (``foreach=True``) against the per-pair step it batches, and LoFT's symmetries."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.testing import assert_close

from loft_probe.optim import LoFT
from loft_probe.optim import foreach as FE
from loft_probe.optim import functional as F

F64 = torch.float64
# float64: entry by entry. float32 (and bf16 factors, which compute in float32): relative to the tensor's norm,
# since another blocking of the same multiply rounds each entry differently, by up to ~1e-7 of the row's scale.
TOL = {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if dtype == F64:
        assert_close(actual, expected, rtol=TOL[F64], atol=TOL[F64])
    else:
        assert actual.dtype == expected.dtype
        error = float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
        # a state is further from the rounding than a parameter: frames come out of an SVD (a singular
        # vector's sensitivity is 1/gap), second moments are squares
        assert error <= (TOL[dtype] if what == "parameter" else 4 * TOL[dtype]), (what, error)

# (m, n, r, dtype, copies): several pairs per shape so that stacks form, next to singletons
MIXED = [(12, 9, 3, F64, 3), (9, 12, 3, F64, 2), (12, 9, 2, F64, 2), (10, 10, 4, torch.float32, 3),
         (7, 5, 2, torch.bfloat16, 2), (6, 8, 8, F64, 1)]


def make_groups(spec, seed: int, scales=(1.5,), with_bias: bool = True) -> list[dict]:
    """Pair groups with non-zero B (PEFT's B = 0 hides A-side bugs) and an AdamW group of biases."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for m, n, r, dtype, copies in spec:
        for c in range(copies):
            B = torch.randn(m, r, generator=gen, dtype=F64) / r**0.5
            A = torch.randn(r, n, generator=gen, dtype=F64) / n**0.5
            groups.append({"params": [torch.nn.Parameter(B.to(dtype)), torch.nn.Parameter(A.to(dtype))],
                           "lora_scale": scales[c % len(scales)], "name": f"{m}x{n}r{r}#{c}"})
    if with_bias:
        biases = [torch.nn.Parameter(torch.randn(k, generator=gen, dtype=dtype))
                  for k, dtype in ((5, F64), (7, F64), (3, torch.float32), (4, torch.bfloat16))]
        groups.append({"params": biases, "name": "adamw"})
    return groups


def twins(groups: list[dict], **kwargs) -> tuple[LoFT, LoFT]:
    """The same model stepped pair by pair and as stacks."""
    other = copy.deepcopy(groups)
    return LoFT(groups, foreach=False, **kwargs), LoFT(other, foreach=True, **kwargs)


def set_gradients(opts: tuple[LoFT, ...], gen: torch.Generator, skip: frozenset = frozenset()) -> None:
    """The same random gradient on every twin's parameter; parameters whose group name is in ``skip`` get none."""
    for index, group in enumerate(opts[0].param_groups):
        for k, p in enumerate(group["params"]):
            grad = None if group.get("name") in skip else torch.randn(p.shape, generator=gen, dtype=F64)
            for opt in opts:
                twin = opt.param_groups[index]["params"][k]
                twin.grad = None if grad is None else grad.to(twin.dtype, copy=True)  # clipping scales it


def assert_same(per_pair: LoFT, stacked: LoFT) -> None:
    """Parameters and every state tensor agree, at the tolerance of the parameter's dtype."""
    for g1, g2 in zip(per_pair.param_groups, stacked.param_groups, strict=True):
        for p1, p2 in zip(g1["params"], g2["params"], strict=True):
            assert_agree(p2.detach(), p1.detach(), p1.dtype, "parameter")
            s1, s2 = per_pair.state[p1], stacked.state[p2]
            assert s1.keys() == s2.keys()
            for key in s1:
                assert s2[key].dtype == s1[key].dtype and s2[key].device == s1[key].device, key
                assert_agree(s2[key], s1[key], p1.dtype, key)


def run_twins(per_pair: LoFT, stacked: LoFT, steps: int, seed: int, skip_at: dict | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        set_gradients((per_pair, stacked), gen, (skip_at or {}).get(t, frozenset()))
        per_pair.step()
        stacked.step()
        assert_same(per_pair, stacked)


@pytest.mark.parametrize("block", [None, 20, 500], ids=["one block", "2 rows per block", "4 pairs per block"])
def test_stacks_form_and_match_the_per_pair_step_on_mixed_shapes_ranks_and_dtypes(block, monkeypatch):
    if block:  # the reconstruction's blocks split rows, or group whole pairs
        monkeypatch.setitem(FE.STACK_BLOCK_ELEMENTS, "cpu", block)
    per_pair, stacked = twins(make_groups(MIXED, seed=0), lr=3e-2, weight_decay=0.1)
    set_gradients((stacked,), torch.Generator().manual_seed(1))
    sizes = sorted(len(b.groups) for b in stacked._buckets())
    assert sizes == [1, 2, 2, 2, 3, 3], sizes  # one stack per shape, dtype and rank
    assert all(b.stacked for b in stacked._buckets())
    run_twins(per_pair, stacked, steps=6, seed=2)


@pytest.mark.parametrize("switches", [
    dict(zip(LoFT.switches(), values, strict=True))
    for values in itertools.product([True, False], [True, False], [True, False], ["full", "simple"],
                                    [True, False])
    if values[4] or values[3] == "simple"  # the factor-space ablation needs the elementwise second moment
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_switch_combination(switches):
    spec = [(8, 6, 3, F64, 3), (6, 8, 2, F64, 2)]
    per_pair, stacked = twins(make_groups(spec, seed=3), lr=2e-2, weight_decay=0.05, **switches)
    run_twins(per_pair, stacked, steps=4, seed=4)


def test_float32_stacks_match_within_1e6():
    spec = [(48, 40, 8, torch.float32, 4), (40, 48, 4, torch.float32, 3)]
    per_pair, stacked = twins(make_groups(spec, seed=5), lr=1e-2)
    run_twins(per_pair, stacked, steps=6, seed=6)


def test_groups_with_different_hyperparameters_step_apart():
    groups = make_groups([(9, 7, 3, F64, 4)], seed=7, scales=(0.5, 2.0))
    groups[1].update(lr=5e-2, weight_decay=0.2)
    groups[2].update(betas=(0.8, 0.99), eps=1e-6)
    per_pair, stacked = twins(groups, lr=1e-2)
    set_gradients((stacked,), torch.Generator().manual_seed(8))
    # pairs 0 and 2... differ in scale, lr, betas: only the two that agree on everything share a stack
    assert sorted(len(b.groups) for b in stacked._buckets()) == [1, 1, 1, 1]
    run_twins(per_pair, stacked, steps=5, seed=9)


def test_phases_that_differ_between_pairs():
    """A pair without gradients does not step, a group added later starts at B: stacks split by phase and
    step count and stay equal to the per-pair step; a skipped non-finite step changes nothing."""
    per_pair, stacked = twins(make_groups([(9, 7, 3, F64, 4)], seed=10), lr=2e-2)
    run_twins(per_pair, stacked, steps=3, seed=11, skip_at={1: frozenset({"9x7r3#0"})})
    late = make_groups([(9, 7, 3, F64, 2)], seed=12, with_bias=False)
    for opt in (per_pair, stacked):
        for group in copy.deepcopy(late):
            opt.add_param_group(group)
    gen = torch.Generator().manual_seed(13)
    set_gradients((per_pair, stacked), gen)
    phases = sorted(int(stacked.state[g["params"][0]]["phase"]) if stacked.state[g["params"][0]] else 0
                    for g in stacked.param_groups if g["lora_scale"] is not None)
    assert phases == [0, 0, 0, 1, 1, 1]  # #0 (two steps) and the late pairs move B, the others (three) A
    per_pair.step()
    stacked.step()
    assert_same(per_pair, stacked)
    set_gradients((per_pair, stacked), gen)
    for opt in (per_pair, stacked):  # a NaN anywhere: nothing moves in either
        opt.param_groups[0]["params"][0].grad[0, 0] = float("nan")
        opt.step()
    assert_same(per_pair, stacked)
    run_twins(per_pair, stacked, steps=3, seed=14)


@pytest.mark.parametrize("spec, clip", [(MIXED, None), ([s for s in MIXED if s[3] == F64], 0.5)],
                         ids=["mixed dtypes", "float64, clipped"])
def test_after_load_state_dict(spec, clip):
    """Resumed from a state the stacks saved, both paths continue alike. With clipping, one coefficient scales
    every gradient: it is as precise as the least precise gradient, so the model is float64 only."""
    groups = make_groups(spec, seed=15)
    per_pair, stacked = twins(groups, lr=2e-2, max_grad_norm=clip)
    run_twins(per_pair, stacked, steps=3, seed=16)
    saved = copy.deepcopy(stacked.state_dict())
    resumed = [LoFT(copy.deepcopy(groups), foreach=flag, lr=2e-2, max_grad_norm=clip) for flag in (False, True)]
    for opt in resumed:
        for g_new, g_old in zip(opt.param_groups, stacked.param_groups, strict=True):
            for p_new, p_old in zip(g_new["params"], g_old["params"], strict=True):
                p_new.data.copy_(p_old.detach())
        opt.load_state_dict(saved)
    run_twins(*resumed, steps=3, seed=17)


def test_adamw_groups_use_torch_foreach_adamw():
    gen = torch.Generator().manual_seed(18)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=F64)) for shape in ((4, 3), (5,))]
    twin = copy.deepcopy(params)
    ours = LoFT([{"params": params}], lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=True)
    theirs = torch.optim.AdamW(twin, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, foreach=True)
    for _ in range(5):
        for p, q in zip(params, twin, strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        for p, q in zip(params, twin, strict=True):
            assert_close(p.detach(), q.detach(), rtol=1e-14, atol=1e-15)


def test_default_stacks_on_accelerators_only():
    opt = LoFT(make_groups(MIXED, seed=22), lr=1e-2)
    set_gradients((opt,), torch.Generator().manual_seed(23))
    assert not any(b.stacked for b in opt._buckets())  # CPU: one pair's working set stays in cache
    assert [len(b.groups) for b in opt._buckets()] == [1] * sum(spec[-1] for spec in MIXED)


def test_bad_foreach_value():
    with pytest.raises(ValueError, match="foreach must be True, False or None, got 'yes'"):
        LoFT([torch.nn.Parameter(torch.zeros(2))], foreach="yes")


@pytest.mark.parametrize("alternating", [True, False])
def test_step_on_B_A_equals_the_step_on_At_Bt_with_phases_swapped(alternating):
    """``Wᵀ = s·Aᵀ·Bᵀ``: the pair (Aᵀ, Bᵀ) is the same layer transposed. Its state is the original's with the
    sides swapped (m_B' = m_Aᵀ, S_B' = S_A, E_B' = E_A and the converse) and the phase flipped (its B is the
    original A). From any such state, one step of each is the same step."""
    m, n, r, scale = 9, 7, 3, 1.5
    [group] = make_groups([(m, n, r, F64, 1)], seed=19, with_bias=False)
    group["lora_scale"] = scale
    opt = LoFT([group], lr=2e-2, weight_decay=0.1, alternating=alternating, foreach=False)
    B, A = group["params"]
    gen = torch.Generator().manual_seed(20)
    for _ in range(3):  # a state with history, B moved twice and A once
        B.grad, A.grad = (torch.randn(p.shape, generator=gen, dtype=F64) for p in (B, A))
        opt.step()
    Bt, At = torch.nn.Parameter(A.detach().T.clone()), torch.nn.Parameter(B.detach().T.clone())
    mirror = LoFT([{"params": [Bt, At], "lora_scale": scale}], lr=2e-2, weight_decay=0.1, alternating=alternating)
    state_B, state_A = opt.state[B], opt.state[A]
    mirror.state[Bt] = {"step": state_B["step"].clone(), "phase": 1 - state_B["phase"],
                        "exp_avg": state_A["exp_avg"].T.clone(), "exp_avg_sq": state_A["exp_avg_sq"].clone(),
                        "frame": state_A["frame"].clone()}
    mirror.state[At] = {"exp_avg": state_B["exp_avg"].T.clone(), "exp_avg_sq": state_B["exp_avg_sq"].clone(),
                        "frame": state_B["frame"].clone()}
    for _ in range(4):
        G = torch.randn(m, n, generator=gen, dtype=F64)  # one full gradient: g_B = s·G·Aᵀ, g_A = s·Bᵀ·G
        B.grad, A.grad = scale * G @ A.detach().T, scale * B.detach().T @ G
        Bt.grad, At.grad = scale * G.T @ At.detach().T, scale * Bt.detach().T @ G.T
        opt.step()
        mirror.step()
        assert_close(Bt.detach(), A.detach().T, rtol=1e-12, atol=1e-14)
        assert_close(At.detach(), B.detach().T, rtol=1e-12, atol=1e-14)
        assert_close(mirror.state[Bt]["exp_avg"], opt.state[A]["exp_avg"].T, rtol=1e-12, atol=1e-14)
        assert_close(mirror.state[At]["exp_avg_sq"], opt.state[B]["exp_avg_sq"], rtol=1e-12, atol=1e-14)


def _stack_core(B, A, gB, gA, mB, SB, EB, mA, SA, EA, group, basis):
    """The batched step on stacked tensors, frames included: what ``torch.compile`` is asked to trace. Both
    factors move (LoFT without alternation), so both sides transport their second moments."""
    frames = (F.PartnerFrame(A, group["partner_cutoff"]), F.PartnerFrame(B.mT, group["partner_cutoff"]))
    sides = FE.sides_of(B, A, gB, gA, {"exp_avg": mB, "exp_avg_sq": SB, "frame": EB},
                        {"exp_avg": mA, "exp_avg_sq": SA, "frame": EA})
    FE.pair_step_(sides, frames, (0, 1), 3, group, basis, FE.STACK_BLOCK_ELEMENTS["accelerator"])
    return B, A


def test_the_batched_core_compiles_and_matches_eager():
    pytest.importorskip("torch._inductor")
    P, m, n, r = 3, 16, 12, 5  # T = 15: B's 16 rows transport through the (T, T) map, A's 12 unpacked
    gen = torch.Generator().manual_seed(21)
    basis = F.SecondMomentBasis(r, True)
    shapes = ((P, m, r), (P, r, n), (P, m, r), (P, r, n), (P, m, r), (P, m, basis.width), (P, n, r),
              (P, r, n), (P, n, basis.width), (P, m, r))
    inputs = [torch.randn(*s, generator=gen) for s in shapes]
    inputs[5], inputs[8] = inputs[5].abs(), inputs[8].abs()  # second moments: entry-wise sizes of squares
    group = dict(LoFT([torch.nn.Parameter(torch.zeros(1))]).defaults, lora_scale=2.0)
    eager = [t.clone() for t in inputs]
    _stack_core(*eager, group, basis)
    compiled = [t.clone() for t in inputs]
    try:
        torch.compile(_stack_core, dynamic=False)(*compiled, group, basis)
    except Exception as error:  # noqa: BLE001 (a missing C++ toolchain shows as any of several errors)
        pytest.skip(f"torch.compile unavailable here: {type(error).__name__}: {str(error).splitlines()[0]}")
    for c, e in zip(compiled, eager, strict=True):
        assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_gpu_check_parses_imports_and_says_when_there_is_no_gpu():
    """benchmarks/gpu_check.sh runs as is on a CUDA machine; here it can only be parsed, its Python imported,
    and, without CUDA, asked to say so."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    spec = importlib.util.spec_from_file_location("gpu_check", script.with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.equality) and callable(module.step) and callable(module.probe)
    if torch.cuda.is_available():
        return
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "no CUDA device here" in done.stderr, (done.returncode, done.stderr)
