"""LoFT against its oracles: torch.optim.AdamW, the literal reference, closed-form invariants."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import both_loft_paths  # noqa: F401 (a fixture)
from torch.testing import assert_close

from loft_probe.optim import LoFT
from loft_probe.optim import functional as F
from loft_probe.optim.reference import ReferenceLoFT

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("both_loft_paths")  # every test on both LoFT paths


def well_conditioned(rows: int, cols: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    """A random matrix with singular values in [1, 2]."""
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=dtype))
    k = min(rows, cols)
    S = torch.linspace(1, 2, k, dtype=dtype)
    return U[:, :k] @ torch.diag(S) @ V[:, :k].T


class Problem:
    """A least-squares problem on one adapted matrix: loss(W) = ½‖W·X − Y‖² / batch."""

    def __init__(self, m: int, n: int, seed: int = 0, dtype=F64) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.W0 = torch.randn(m, n, generator=gen, dtype=dtype)
        self.X = torch.randn(n, 2 * n, generator=gen, dtype=dtype)
        self.Y = torch.randn(m, 2 * n, generator=gen, dtype=dtype)
        self.gen = gen

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        return 0.5 * (W @ self.X - self.Y).pow(2).sum() / self.X.shape[1]

    def backward_pair(self, B, A, scale):
        for p in (B, A):
            p.grad = None
        self.loss(self.W0 + scale * B @ A).backward()

    def gradient(self, W: torch.Tensor) -> torch.Tensor:
        W = W.detach().requires_grad_(True)
        self.loss(W).backward()
        return W.grad


def pair_params(m, n, r, gen, dtype=F64, zero_B=False):
    B = torch.nn.Parameter(torch.zeros(m, r, dtype=dtype) if zero_B else well_conditioned(m, r, gen, dtype))
    A = torch.nn.Parameter(well_conditioned(r, n, gen, dtype))
    return B, A


def relative(x, y):
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_full_rank_limit_tracks_adamw(weight_decay):
    """m = n = r, well-conditioned factors: s·B·A follows torch.optim.AdamW on ΔW exactly (the published
    code deviates ~6e-2). From B = 0 the first A-step has no history to carry: not exact, by design."""
    m = n = r = 6
    scale, lr = 2.0, 1e-2
    prob = Problem(m, n, seed=1)
    B, A = pair_params(m, n, r, prob.gen)
    opt = LoFT([{"params": [B, A], "lora_scale": scale}], lr=lr, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=weight_decay)
    delta = torch.nn.Parameter((scale * B @ A).detach().clone())
    adamw = torch.optim.AdamW([delta], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    worst = 0.0
    for _ in range(60):
        prob.backward_pair(B, A, scale)
        opt.step()
        delta.grad = prob.gradient(prob.W0 + delta)
        adamw.step()
        worst = max(worst, relative(scale * B.detach() @ A.detach(), delta.detach()))
    assert worst < 1e-10, worst


def test_matches_literal_reference_step_for_step():
    m, n, r, scale = 12, 9, 3, 0.5
    prob = Problem(m, n, seed=2)
    B, A = pair_params(m, n, r, prob.gen)
    ref = ReferenceLoFT(B, A, scale, lr=3e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    opt = LoFT([{"params": [B, A], "lora_scale": scale}], lr=3e-2, betas=(0.8, 0.99), eps=1e-8,
               weight_decay=0.1)
    for _ in range(20):
        prob.backward_pair(B, A, scale)
        ref.step(B.grad.clone(), A.grad.clone())
        opt.step()
        assert_close(B.detach(), ref.B, rtol=1e-10, atol=1e-12)
        assert_close(A.detach(), ref.A, rtol=1e-10, atol=1e-12)
    # The stored states reconstruct the reference's dense full-space moments.
    state_B, state_A = opt.state[B], opt.state[A]
    basis = F.SecondMomentBasis(r, full=True)
    M_B, V_B, M_A, V_A = ref.full_moments()
    got_MB, got_VB = F.reconstruct_moments(state_B["exp_avg"], state_B["exp_avg_sq"], state_B["frame"], basis)
    got_MA, got_VA = F.reconstruct_moments(state_A["exp_avg"].T, state_A["exp_avg_sq"], state_A["frame"], basis)
    assert_close(got_MB, M_B, rtol=1e-10, atol=1e-12)
    assert_close(got_VB, V_B.clamp_min(0), rtol=1e-10, atol=1e-12)
    assert_close(got_MA.T, M_A, rtol=1e-10, atol=1e-12)
    assert_close(got_VA.T, V_A.clamp_min(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factor_coordinates", [False, True])
def test_transport_keeps_full_space_moments(factor_coordinates):
    """Re-parametrising the partner (A → T·A, same row space) leaves the full-space M and V unchanged, in the
    orthonormal frame and in raw factor coordinates alike."""
    gen = torch.Generator().manual_seed(3)
    m, n, r = 7, 10, 4
    A = well_conditioned(r, n, gen)
    T = well_conditioned(r, r, gen)
    basis = F.SecondMomentBasis(r, full=True)
    h = torch.randn(20, m, r, generator=gen, dtype=F64)
    exp_avg = h.mean(0)  # (m, r)
    exp_avg_sq = torch.stack([basis.features(x) for x in h]).mean(0)  # (m, T), per-row PSD S_i
    old, new = F.PartnerFrame(A), F.PartnerFrame(T @ A)
    E_old, E_new = old.matrix(factor_coordinates), new.matrix(factor_coordinates)
    C = F.transport_matrix(E_old, new, factor_coordinates)
    if not factor_coordinates:
        assert float(torch.linalg.matrix_norm(C, ord=2)) <= 1 + 1e-12  # a contraction: nothing is amplified
    before = F.reconstruct_moments(exp_avg, exp_avg_sq, E_old, basis)
    after = F.reconstruct_moments(exp_avg @ C, basis.transport_(exp_avg_sq.clone(), C), E_new, basis)
    assert_close(after[0], before[0], rtol=0, atol=1e-12)
    assert_close(after[1], before[1], rtol=0, atol=1e-12)
    # The published code's transposed form C·S·Cᵀ breaks the invariant: the test can fail.
    wrong = F.reconstruct_moments(exp_avg @ C, exp_avg_sq @ basis.transport(C.T), E_new, basis)
    assert (wrong[1] - before[1]).abs().max() > 1e-3


@pytest.mark.parametrize("rows", [3, 20], ids=["unpacked rows (k < T)", "the map's matrix (k >= T)"])
def test_packed_transport_equals_dense_congruence(rows):
    gen = torch.Generator().manual_seed(4)
    r = 5  # T = 15 stored entries per row of a full second moment
    basis = F.SecondMomentBasis(r, full=True)
    S = torch.randn(2, rows, r, r, generator=gen, dtype=F64)  # a stack of two pairs' states
    S = S + S.mT
    C = torch.randn(2, r, r, generator=gen, dtype=F64)  # each pair's own transport
    p, q = basis.p, basis.q
    dense = C.mT[:, None] @ S @ C[:, None]
    assert_close(basis.transport_(S[..., p, q].clone(), C), dense[..., p, q], rtol=0, atol=1e-12)
    assert_close(S[0][:, p, q] @ basis.transport(C[0]), dense[0][:, p, q], rtol=0, atol=1e-12)
    simple = F.SecondMomentBasis(r, full=False)
    diag = torch.diagonal(S, dim1=-2, dim2=-1)
    expected = torch.diagonal(C.mT[:, None] @ torch.diag_embed(diag) @ C[:, None], dim1=-2, dim2=-1)
    assert_close(simple.transport_(diag.clone(), C), expected, rtol=0, atol=1e-12)


def test_rectangular_full_rank_square_partner_step_is_exact():
    """m = 8, n = 5, r = 5: every B-step (A square) applies exactly AdamW's direction for the same G's."""
    m, n, r, scale, lr = 8, 5, 5, 1.0, 1e-2
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    prob = Problem(m, n, seed=5)
    B, A = pair_params(m, n, r, prob.gen)
    opt = LoFT([{"params": [B, A], "lora_scale": scale}], lr=lr, betas=(beta1, beta2), eps=eps)
    shadow_m, shadow_v = torch.zeros(m, n, dtype=F64), torch.zeros(m, n, dtype=F64)
    a_step_errors = []
    for t in range(1, 21):
        W_before = (scale * B @ A).detach().clone()
        prob.backward_pair(B, A, scale)
        G = prob.gradient(W_before + prob.W0)
        shadow_m.lerp_(G, 1 - beta1)
        shadow_v.mul_(beta2).addcmul_(G, G, value=1 - beta2)
        full_step = -lr * (shadow_m / (1 - beta1**t)) / ((shadow_v / (1 - beta2**t)).sqrt() + eps)
        opt.step()
        applied = (scale * B @ A).detach() - W_before
        if t % 2 == 1:  # B-step: the fixed factor A is square and invertible
            assert_close(applied, full_step, rtol=1e-9, atol=1e-13)
        else:
            a_step_errors.append(relative(applied, full_step))
    assert min(a_step_errors) > 1e-3  # the A-steps are projected (B is 8×5): not full fine-tuning


def test_alpha_invariance():
    """α = r and α = 4r (s = 1 and 4) give the same effective-weight trajectory from B = 0."""
    m, n, r = 10, 8, 3
    trajectories = []
    for scale in (1.0, 4.0):
        prob = Problem(m, n, seed=6)
        B, A = pair_params(m, n, r, prob.gen, zero_B=True)
        opt = LoFT([{"params": [B, A], "lora_scale": scale}], lr=1e-2, weight_decay=0.05)
        trajectory = []
        for _ in range(15):
            prob.backward_pair(B, A, scale)
            opt.step()
            trajectory.append((scale * B @ A).detach().clone())
        trajectories.append(torch.stack(trajectory))
    assert_close(trajectories[0], trajectories[1], rtol=1e-10, atol=1e-12)


PLAIN = dict(alternating=False, scale_gradients=False, transport=False, second_moment="simple",
             projected_update=False)


def test_every_switch_off_is_adamw_on_the_factors():
    m, n, r, scale = 9, 7, 3, 2.0
    prob = Problem(m, n, seed=7)
    B, A = pair_params(m, n, r, prob.gen)
    bias = torch.nn.Parameter(torch.randn(m, 1, generator=prob.gen, dtype=F64))
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (B, A, bias)]
    opt = LoFT([{"params": [B, A], "lora_scale": scale}, {"params": [bias]}], lr=1e-2, weight_decay=0.1,
               **PLAIN)
    adamw = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(30):
        for params, optimizer in (((B, A, bias), opt), (twins, adamw)):
            for p in params:
                p.grad = None
            Bp, Ap, bp = params
            prob.loss(prob.W0 + scale * Bp @ Ap + bp).backward()
            optimizer.step()
    for mine, theirs in zip((B, A, bias), twins, strict=True):
        assert_close(mine.detach(), theirs.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_exact(dtype):
    m, n, r = 10, 6, 2

    def build(gen_seed):
        gen = torch.Generator().manual_seed(gen_seed)
        B = torch.nn.Parameter(torch.randn(m, r, generator=gen).to(dtype))
        A = torch.nn.Parameter(torch.randn(r, n, generator=gen).to(dtype))
        bias = torch.nn.Parameter(torch.zeros(m, dtype=dtype))
        opt = LoFT([{"params": [B, A], "lora_scale": 2.0}, {"params": [bias]}], lr=1e-2, weight_decay=0.01)
        return (B, A, bias), opt

    X = torch.randn(n, 12, generator=torch.Generator().manual_seed(9))

    def train(params, opt, steps):
        B, A, bias = params
        for _ in range(steps):
            opt.zero_grad()
            out = (2.0 * B.float() @ A.float()) @ X + bias.float()[:, None]
            out.pow(2).mean().backward()
            opt.step()

    params, opt = build(0)
    train(params, opt, 7)  # odd: resume in the middle of an alternation
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    train(params, opt, 8)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, fresh_opt = build(123)
    with torch.no_grad():
        for p, value in zip(fresh, saved["params"], strict=True):
            p.copy_(value)
    fresh_opt.load_state_dict(saved["opt"])
    train(fresh, fresh_opt, 8)
    for a, b in zip(params, fresh, strict=True):
        assert torch.equal(a, b)


def test_zero_B_and_singular_factors_stay_finite():
    m, n, r = 12, 10, 4
    gen = torch.Generator().manual_seed(10)
    prob = Problem(m, n, seed=10, dtype=torch.float32)
    cases = {
        "B = 0": (torch.zeros(m, r), torch.randn(r, n, generator=gen)),
        "collapsed A": (torch.randn(m, r, generator=gen), torch.randn(1, n, generator=gen).repeat(r, 1)),
        "rank 2 < r": (torch.randn(m, 2, generator=gen) @ torch.randn(2, r, generator=gen),
                       torch.randn(r, 2, generator=gen) @ torch.randn(2, n, generator=gen)),
        "both zero": (torch.zeros(m, r), torch.zeros(r, n)),
    }
    for name, (B0, A0) in cases.items():
        B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
        opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2)
        for _ in range(6):
            prob.backward_pair(B, A, 1.0)
            opt.step()
            for tensor in [B, A, *opt.state[B].values(), *opt.state[A].values()]:
                assert torch.isfinite(tensor).all(), name


def test_bf16_factors_follow_float32():
    m, n, r = 16, 12, 4
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        prob = Problem(m, n, seed=11, dtype=torch.float32)
        B0, A0 = pair_params(m, n, r, prob.gen, dtype=torch.float32)
        B, A = torch.nn.Parameter(B0.detach().to(dtype)), torch.nn.Parameter(A0.detach().to(dtype))
        opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2)
        for _ in range(10):
            for p in (B, A):
                p.grad = None
            prob.loss(prob.W0 + B.float() @ A.float()).backward()
            opt.step()
        assert B.dtype == dtype and opt.state[B]["exp_avg"].dtype == torch.float32
        results.append((B.float() @ A.float()).detach())
    assert relative(results[1], results[0]) < 2e-2


def test_closure_runs_with_gradients():
    prob = Problem(6, 5, seed=12)
    B, A = pair_params(6, 5, 2, prob.gen)
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = prob.loss(prob.W0 + B @ A)
        loss.backward()
        return loss

    before = B.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not torch.equal(before, B.detach())


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = LoFT(emb.parameters(), lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
        (dict(betas=(0.9, 1.2)), r"betas must be two numbers in \[0, 1\), got \(0.9, 1.2\)"),
        (dict(eps=-1e-8), "eps must be >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(second_moment="diag"), "second_moment must be one of"),
        (dict(projected_update=False), "projected_update=False needs second_moment='simple'"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    B, A = pair_params(4, 4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        LoFT([{"params": [B, A], "lora_scale": 1.0}], **kwargs)


def test_bad_pair_groups():
    B, A = pair_params(4, 5, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exactly"):
        LoFT([{"params": [B], "lora_scale": 1.0}])
    with pytest.raises(ValueError, match=r"shapes \(4, 2\) and \(5, 2\)"):
        LoFT([{"params": [B, A.T.detach().clone().requires_grad_()], "lora_scale": 1.0}])
    with pytest.raises(ValueError, match="lora_scale must be > 0"):
        LoFT([{"params": [B, A], "lora_scale": 0.0}])
    zero3 = torch.nn.Parameter(torch.empty(0))  # DeepSpeed ZeRO-3 empties a partitioned parameter and tags it
    zero3.ds_id = 0
    with pytest.raises(ValueError, match="DeepSpeed ZeRO partitioned parameters are not supported"):
        LoFT([{"params": [zero3, A], "lora_scale": 1.0}])
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}])
    with pytest.raises(ValueError, match="exactly"):  # groups added later are checked too
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 2))], "lora_scale": 1.0})


def test_clip_norm_is_the_full_space_norm_of_the_moving_factor():
    m, n, r, scale = 9, 7, 3, 1.5
    prob = Problem(m, n, seed=13)
    B, A = pair_params(m, n, r, prob.gen)
    bias = torch.nn.Parameter(torch.randn(m, 1, generator=prob.gen, dtype=F64))
    opt = LoFT([{"params": [B, A], "lora_scale": scale}, {"params": [bias]}], lr=1e-2)
    for p in (B, A, bias):
        p.grad = None
    W = (prob.W0 + scale * B @ A).detach().requires_grad_(True)
    prob.loss(W + bias).backward()
    G = W.grad  # dense oracle for the full-weight gradient
    prob.loss(prob.W0 + scale * B @ A + bias).backward()
    A0 = A.detach()
    P_A = A0.T @ torch.linalg.solve(A0 @ A0.T, A0)  # (n, n) dense projector
    expected = torch.sqrt((G @ P_A).pow(2).sum() + bias.grad.pow(2).sum())
    grads = [p.grad.clone() for p in (B, A, bias)]
    norm = opt.clip_grad_norm_(max_norm=float(expected) / 4)
    assert_close(norm, expected.float(), rtol=1e-6, atol=0)
    for p, g in zip((B, A, bias), grads, strict=True):
        assert_close(p.grad, g * (float(expected) / 4) / (float(expected) + 1e-6), rtol=1e-6, atol=0)


def test_max_grad_norm_equals_clip_then_step():
    prob = Problem(8, 6, seed=14)
    B, A = pair_params(8, 6, 2, prob.gen)
    twin = [torch.nn.Parameter(t.detach().clone()) for t in (B, A)]
    clipped = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2, max_grad_norm=0.1)
    manual = LoFT([{"params": twin, "lora_scale": 1.0}], lr=1e-2)
    for _ in range(6):
        prob.backward_pair(B, A, 1.0)
        clipped.step()
        prob.backward_pair(*twin, 1.0)
        manual.clip_grad_norm_(0.1)
        manual.step()
    assert_close(B.detach(), twin[0].detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant", [
    dict(alternating=False), dict(scale_gradients=False), dict(transport=False),
    dict(second_moment="simple"), dict(second_moment="simple", projected_update=False),
])
def test_ablations_run_and_reduce_the_loss(variant):
    prob = Problem(12, 10, seed=15)
    B, A = pair_params(12, 10, 3, prob.gen)
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2, **variant)
    first = float(prob.loss(prob.W0 + B @ A).detach())
    for _ in range(30):
        prob.backward_pair(B, A, 1.0)
        opt.step()
    assert float(prob.loss(prob.W0 + B @ A).detach()) < first


def test_deepcopy_and_param_group_api():
    prob = Problem(5, 4, seed=16)
    B, A = pair_params(5, 4, 2, prob.gen)
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2)
    prob.backward_pair(B, A, 1.0)
    opt.step()
    clone = copy.deepcopy(opt)
    assert torch.equal(clone.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    results = []
    for device in ("cpu", "cuda"):
        prob = Problem(16, 12, seed=17)
        B, A = pair_params(16, 12, 4, prob.gen)
        B, A = (torch.nn.Parameter(t.detach().to(device)) for t in (B, A))
        prob.W0, prob.X, prob.Y = (t.to(device) for t in (prob.W0, prob.X, prob.Y))
        opt = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2)
        for _ in range(10):
            prob.backward_pair(B, A, 1.0)
            opt.step()
        results.append((B @ A).detach().cpu())
    assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def test_from_model_alpha_invariance_through_add_lora():
    """α = r and α = 4r give the same effective weights when LoFT steps an add_lora model."""
    from loft_probe import add_lora, lora_pairs

    X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    effective = []
    for alpha in (2.0, 8.0):
        model = add_lora(_mlp(0), rank=2, alpha=alpha, targets=["0", "2"])
        opt = LoFT.from_model(model, lr=1e-2, weight_decay=0.01)
        assert [g["lora_scale"] for g in opt.param_groups] == [alpha / 2, alpha / 2]
        for _ in range(12):
            opt.zero_grad()
            model(X).pow(2).mean().backward()
            opt.step()
        weights = [pair.base_weight() + pair.delta_weight() for pair in lora_pairs(model)]
        effective.append(torch.cat([w.flatten() for w in weights]))
    assert_close(effective[0], effective[1], rtol=1e-10, atol=1e-12)


def test_from_model_gives_other_trainable_parameters_adamw():
    from loft_probe import add_lora

    model = add_lora(_mlp(1), rank=2, targets=["0"])
    model[2].weight.requires_grad_(True)  # a trainable head, as PEFT's modules_to_save
    opt = LoFT.from_model(model, lr=1e-2)
    pair_group, rest = opt.param_groups
    assert pair_group["params"] == [model[0].lora_B.weight, model[0].lora_A.weight]
    assert rest["lora_scale"] is None and rest["params"] == [model[2].weight]


def test_from_model_without_lora_warns_and_is_adamw():
    model = _mlp(2)
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no trainable LoRA pairs"):
        opt = LoFT.from_model(model, lr=1e-2)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    for net, optimizer in ((model, opt), (twin, adamw)):
        for _ in range(5):
            optimizer.zero_grad()
            net(X).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(a, b, rtol=0, atol=1e-14)


def test_nonfinite_gradient_skips_the_step_and_keeps_the_state_clean():
    prob = Problem(8, 6, seed=18)
    B, A = pair_params(8, 6, 2, prob.gen)
    bias = torch.nn.Parameter(torch.zeros(8, 1, dtype=F64))
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}, {"params": [bias]}], lr=1e-2)
    for _ in range(3):
        for p in (B, A, bias):
            p.grad = None
        prob.loss(prob.W0 + B @ A + bias).backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    params = [p.detach().clone() for p in (B, A, bias)]
    for bad in (float("nan"), float("inf")):
        A.grad[0, 0] = bad
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, (B, A, bias), strict=True))
    assert all(torch.equal(v, opt.state_dict()["state"][0][k]) for k, v in before.items())
    assert [g["skipped_steps"] for g in opt.param_groups] == [2, 2]
    prob.backward_pair(B, A, 1.0)
    opt.step()  # training goes on: this step moves A (B moved at steps 1 and 3)
    assert torch.isfinite(A).all() and not torch.equal(A.detach(), params[1])
    strict = LoFT([{"params": [B, A], "lora_scale": 1.0}], lr=1e-2, nonfinite="raise")
    A.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        strict.step()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        LoFT([{"params": [B, A], "lora_scale": 1.0}], nonfinite="ignore")
