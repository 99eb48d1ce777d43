"""State layouts and the shadow of the run's own optimizer (float64).

Each layout is held to its optimizer's arithmetic; each shadow, on a full fine-tuning run, to the run itself
(cosine 1, the same moments); the LoRA lift to the truths of docs/metrics-spec.md ("LoRA's moments in full
space"): exact while the partner stands still, invariant to re-parametrising the pair, bounded at rank
deficiency.
"""

from __future__ import annotations

import pytest
import torch
from helpers import F64, lora_mlp, mlp, randn
from torch.testing import assert_close

from loft_probe import LoFT, add_lora, attach, load_run
from loft_probe.lora import lora_pairs
from loft_probe.probe.layouts import Layout, PairSubspaces, layout_of, register_layout
from loft_probe.probe.layouts.pairs import lift_factor_state

OPTIMIZERS = {
    "SGD": (torch.optim.SGD, dict(lr=0.05)),
    "SGD momentum dampening": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "SGD nesterov decay": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "Adam": (torch.optim.Adam, dict(lr=1e-2)),
    "Adam L2 decay": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "AdamW amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "NAdam": (torch.optim.NAdam, dict(lr=1e-2)),
    "RAdam decoupled": (torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "Adamax": (torch.optim.Adamax, dict(lr=1e-2)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-3)),
    "RMSprop centered momentum": (torch.optim.RMSprop, dict(lr=1e-3, centered=True, momentum=0.9)),
}


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=gen, dtype=F64), torch.randn(16, 5, generator=gen, dtype=F64))
            for _ in range(n)]


def run(model, optimizer, run_dir, steps=6, scheduler=None, every=1):
    with attach(model, optimizer, run_dir, every=every, shadow=True) as probe:
        for x, y in batches(steps):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            probe.log(loss=1.0)
    return probe, load_run(run_dir).metrics


def values(metrics, name):
    return metrics[metrics.metric == name]["value"]


# ------------------------------------------------------------------ layouts against their optimizers' arithmetic
def expected_moments(name: str, kwargs: dict, grads: list[torch.Tensor]):
    """The first and second moments each optimizer's documented update keeps, computed here by hand."""
    first = second = v = u = square = None
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    for t, g in enumerate(grads, 1):
        if name.startswith("SGD") and kwargs.get("momentum"):
            first = g.clone() if t == 1 else kwargs["momentum"] * first + (1 - kwargs.get("dampening", 0)) * g
        elif name.startswith(("Adam", "NAdam", "RAdam")) and name != "Adamax":
            first = (1 - beta1) * g if t == 1 else beta1 * first + (1 - beta1) * g
            v = (1 - beta2) * g**2 if t == 1 else beta2 * v + (1 - beta2) * g**2
            second = torch.maximum(second, v) if kwargs.get("amsgrad") and t > 1 else v
        elif name == "Adamax":
            first = (1 - beta1) * g if t == 1 else beta1 * first + (1 - beta1) * g
            u = g.abs() + 1e-8 if t == 1 else torch.maximum(beta2 * u, g.abs() + 1e-8)
            second = u**2
        elif name == "Adagrad":
            second = (kwargs["initial_accumulator_value"] if t == 1 else second) + g**2
        elif name.startswith("RMSprop"):
            square = (1 - 0.99) * g**2 if t == 1 else 0.99 * square + (1 - 0.99) * g**2
            if kwargs.get("centered"):
                first = (1 - 0.99) * g if t == 1 else 0.99 * first + (1 - 0.99) * g
                second = square - first**2
            else:
                second = square
    return first, second


@pytest.mark.parametrize("name", [n for n, (_, kw) in OPTIMIZERS.items() if not kw.get("weight_decay")])
def test_each_layout_reads_its_optimizers_moments(name):
    cls, kwargs = OPTIMIZERS[name]
    param = torch.nn.Parameter(randn(4, 3, seed=0))
    optimizer = cls([param], **kwargs)
    grads = [randn(4, 3, seed=t) for t in range(1, 5)]
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    moments = layout_of(optimizer).moments(optimizer, optimizer.param_groups[0], param)
    first, second = expected_moments(name, kwargs, grads)
    for got, want in ((moments.first if moments else None, first), (moments.second if moments else None, second)):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ the shadow is the run's own optimizer
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_full_fine_tuning_is_its_own_shadow(tmp_path, name):
    cls, kwargs = OPTIMIZERS[name]
    model = mlp()
    probe, metrics = run(model, cls(model.parameters(), **kwargs), tmp_path / "run")
    cosines = values(metrics, "shadow_update_cosine")
    assert len(cosines) == 6 * 2 and ((cosines - 1).abs() < 1e-10).all()
    assert (values(metrics, "shadow_update_rel_norm") - 1).abs().max() < 1e-10
    for moment in ("shadow_m_rel_error", "shadow_v_rel_error"):
        assert (values(metrics, moment) < 1e-10).all()
    first, second = expected_moments(name, kwargs, [torch.zeros(1)])  # which moments this optimizer keeps
    assert (len(values(metrics, "shadow_m_rel_error")) > 0) == (first is not None)
    assert (len(values(metrics, "shadow_v_rel_error")) > 0) == (second is not None)


@pytest.mark.parametrize("cls, kwargs", [(torch.optim.AdamW, dict(lr=1e-2)),
                                         (torch.optim.SGD, dict(lr=0.05, momentum=0.9))])
def test_the_shadow_follows_a_schedule_that_changes_betas_and_momentum(tmp_path, cls, kwargs):
    """OneCycleLR cycles lr and AdamW's beta1 / SGD's momentum every step; the shadow steps with each step's."""
    model = mlp()
    optimizer = cls(model.parameters(), **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=8)
    _, metrics = run(model, optimizer, tmp_path / "run", steps=8, scheduler=scheduler)
    assert ((values(metrics, "shadow_update_cosine") - 1).abs() < 1e-10).all()
    assert len(set(values(metrics, "beta1" if cls is torch.optim.AdamW else "lr"))) > 4


def test_loft_is_shadowed_by_adamw_and_a_lora_sgd_run_by_sgd(tmp_path):
    model = lora_mlp()
    with attach(model, LoFT.from_model(model, lr=1e-2), tmp_path / "loft", shadow=True) as probe:
        assert {type(layer.shadow).__name__ for layer in probe.layers} == {"ShadowAdamW"}
    model = lora_mlp()
    with attach(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), tmp_path / "sgd",
                shadow=True) as probe:
        assert {type(layer.shadow.optimizer).__name__ for layer in probe.layers} == {"SGD"}
        assert probe.method == "lora"


def test_register_layout_describes_another_optimizer():
    class Velocity(torch.optim.SGD):
        pass

    class VelocityLayout(Layout):
        first_key = "momentum_buffer"

    assert type(layout_of(Velocity)).__name__ == "SGDLayout"  # inherits its base's
    register_layout(Velocity, VelocityLayout())
    assert isinstance(layout_of(Velocity), VelocityLayout)
    with pytest.raises(ValueError, match="torch.optim.Optimizer subclass"):
        register_layout(dict, VelocityLayout())


# ------------------------------------------------------------------ LoRA's moments in full space
def test_with_a_frozen_partner_the_lift_is_the_shadow_moment_projected(tmp_path):
    """B-only training under AdamW (A has a gradient but no optimizer moves it): M_B = EMA(G)·P_A exactly."""
    model = lora_mlp()
    optimizer = torch.optim.AdamW([pair.B for pair in lora_pairs(model)], lr=1e-2, weight_decay=0.0)
    probe, metrics = run(model, optimizer, tmp_path / "run")
    for name in ("shadow_m_proj_cosine_b", "shadow_m_proj_cosine"):
        assert len(values(metrics, name)) == 12 and ((values(metrics, name) - 1).abs() < 1e-10).all()
    assert (values(metrics, "shadow_m_proj_rel_error") < 1e-10).all()
    assert "shadow_m_proj_cosine_a" not in set(metrics.metric)  # A has no moments: no side


def test_at_full_rank_loft_stays_aligned_and_lora_does_not(tmp_path):
    def square(seed):
        model = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)).double(), rank=4, targets=["0"])
        with torch.no_grad():
            for pair in lora_pairs(model):
                pair.B.copy_(randn(*pair.B.shape, seed=seed))
        return model

    def trial(model, optimizer, run_dir):
        with attach(model, optimizer, run_dir, every=1, shadow=True) as probe:
            for t in range(10):
                x = randn(8, 4, seed=t)
                optimizer.zero_grad()
                (model(x) - x.flip(1)).pow(2).mean().backward()
                optimizer.step()
                probe.log(loss=1.0)
        return values(load_run(run_dir).metrics, "shadow_m_proj_cosine")

    loft = trial(model := square(1), LoFT.from_model(model, lr=1e-2), tmp_path / "loft")
    lora = trial(model := square(1), torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0), tmp_path / "l")
    assert ((loft - 1).abs() < 1e-10).all()
    assert lora.iloc[-1] < 0.999  # both factors move: the lifted moments drift from full fine-tuning's


def test_the_lift_is_invariant_to_reparametrising_the_pair():
    """(B·T, T⁻¹·A) is the same adapter; its factor gradients, and so moments, are g_B·T⁻ᵀ and Tᵀ·g_A."""
    B, A, m_B, m_A = randn(7, 3, seed=1), randn(3, 5, seed=2), randn(7, 3, seed=3), randn(3, 5, seed=4)
    T = randn(3, 3, seed=5) + 3 * torch.eye(3, dtype=F64)
    T_inv = torch.linalg.inv(T)
    spaces, moved = PairSubspaces(B, A, 2.0), PairSubspaces(B @ T, T_inv @ A, 2.0)
    assert_close(moved.lift_b(m_B @ T_inv.T), spaces.lift_b(m_B), rtol=1e-10, atol=1e-12)
    assert_close(moved.lift_a(T.T @ m_A), spaces.lift_a(m_A), rtol=1e-10, atol=1e-12)
    X = randn(7, 5, seed=6)
    assert_close(moved.subspace_b().project(X), spaces.subspace_b().project(X), rtol=1e-10, atol=1e-12)
    assert_close(moved.subspace_a().project(X), spaces.subspace_a().project(X), rtol=1e-10, atol=1e-12)


def test_the_lift_is_bounded_at_a_rank_deficient_partner():
    """PEFT's B = 0 has nothing to lift through (0, never NaN); a graded B (singular values down to 1e-9 of
    the largest, as after Adam's first sign-like step) gains at most 1/(cutoff·σ₁), never 1/σ_min."""
    A, m_A = randn(3, 5, seed=2), randn(3, 5, seed=4)
    assert PairSubspaces(torch.zeros(7, 3, dtype=F64), A, 2.0).lift_a(m_A).abs().max() == 0
    U, _ = torch.linalg.qr(randn(7, 3, seed=7))
    graded = U * torch.tensor([1.0, 1e-5, 1e-9], dtype=F64)
    lifted = PairSubspaces(graded, A, 2.0).lift_a(m_A)
    assert torch.isfinite(lifted).all() and lifted.norm() <= m_A.norm() / (2.0 * 1e-2 * 1.0) * (1 + 1e-12)


def test_the_lifted_direction_is_the_shadows_where_the_preconditioner_commutes():
    """A frozen A that selects input coordinates commutes with an elementwise preconditioner: the B side's
    lifted m/(sqrt(v)+ε) is the full direction's restriction (cosine 1). A rotated A does not commute."""
    grads = [randn(6, 5, seed=t) for t in range(1, 6)]

    def cosine_for(A):
        m_B = v_B = m = v = None
        for t, G in enumerate(grads, 1):
            g_B = G @ A.T  # s = 1
            m_B = 0.1 * g_B if t == 1 else 0.9 * m_B + 0.1 * g_B
            v_B = 1e-3 * g_B**2 if t == 1 else 0.999 * v_B + 1e-3 * g_B**2
            m = 0.1 * G if t == 1 else 0.9 * m + 0.1 * G
            v = 1e-3 * G**2 if t == 1 else 0.999 * v + 1e-3 * G**2
        (side,) = lift_factor_state(randn(6, 2, seed=9), A, 1.0, [m_B, None], [v_B, None], eps=1e-8)
        target = side.subspace.project(m / (v.sqrt() + 1e-8))
        return torch.nn.functional.cosine_similarity(side.direction.flatten(), target.flatten(), dim=0).item()

    selection = torch.zeros(2, 5, dtype=F64)
    selection[0, 1] = selection[1, 3] = 1.0
    rotation, _ = torch.linalg.qr(randn(5, 2, seed=8))
    assert cosine_for(selection) == pytest.approx(1.0, abs=1e-12)
    assert cosine_for(rotation.T) < 0.99


def third_party(name: str):
    """A third-party optimizer class by name, or a skip when its package is missing."""
    if name == "Lion":
        return pytest.importorskip("lion_pytorch").Lion, dict(lr=1e-3, weight_decay=0.1)
    if name == "Adafactor":
        return pytest.importorskip("transformers.optimization").Adafactor, dict(lr=1e-3, relative_step=False)
    if name == "GaLoreAdamW":  # no `rank` group: GaLore's AdamW, which the factors get
        return pytest.importorskip("galore_torch").GaLoreAdamW, dict(lr=1e-3, no_deprecation_warning=True)
    return pytest.importorskip("schedulefree").AdamWScheduleFree, dict(lr=1e-3)


@pytest.mark.parametrize("name", ["AdamW", "SGD momentum dampening", "RMSprop centered momentum", "Adagrad", "LoFT",
                                  "Lion", "Adafactor", "GaLoreAdamW", "AdamWScheduleFree"])
def test_gpt2_conv1d_adapters_with_every_layout(tmp_path, name):
    """PEFT on GPT-2's Conv1D (fan_in_fan_out: the base weight is stored n×m): every layout reads its pairs, and
    with A frozen the B side's lift is the shadow's projected moment exactly, as for nn.Linear."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=8)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.GPT2Model(config).double(),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True))
    pairs = lora_pairs(model)
    with torch.no_grad():
        for pair in pairs:
            pair.B.copy_(0.1 * randn(*pair.B.shape, seed=1))
    if name == "LoFT":
        optimizer = LoFT.from_model(model, lr=1e-3)
    else:
        cls, kwargs = OPTIMIZERS[name] if name in OPTIMIZERS else third_party(name)
        optimizer = cls([pair.B for pair in pairs], **{**kwargs, "lr": 1e-3})  # A frozen: B-only training
        if name == "AdamWScheduleFree":
            optimizer.train()
    tokens = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(2))
    with attach(model, optimizer, tmp_path / "run", every=1, shadow=True) as probe:
        for _ in range(4):
            optimizer.zero_grad()
            model(input_ids=tokens).last_hidden_state.pow(2).mean().backward()
            optimizer.step()
            probe.log(loss=1.0)
    metrics = load_run(tmp_path / "run").metrics
    assert len(set(metrics.layer) - {""}) == len(pairs) == 2
    assert len(values(metrics, "shadow_update_cosine")) == 8
    cosines = values(metrics, "shadow_m_proj_cosine_b")
    if name in ("Adagrad", "Adafactor", "AdamWScheduleFree"):  # no first moment to lift
        assert cosines.empty
    elif name == "LoFT":
        assert (values(metrics, "shadow_m_proj_cosine") > 0.9).all()
    else:
        assert len(cosines) == 8 and ((cosines - 1).abs() < 1e-10).all()


def test_loft_factor_state_is_never_read_as_adam_moments(tmp_path):
    """LoFT's factor state is in frame coordinates: without a captured G (no full-space cosine to record) the
    probe records no cos_moment_grad for its pairs rather than one over those coordinates."""
    model = lora_mlp()
    optimizer = LoFT.from_model(model, lr=1e-2)
    with attach(model, optimizer, tmp_path / "light", every=1) as probe:
        for x, y in batches(3):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            probe.log(loss=1.0)
    recorded = set(load_run(tmp_path / "light").metrics.metric)
    assert "update_norm" in recorded and "cos_moment_grad" not in recorded
