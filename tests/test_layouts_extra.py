"""Layouts of the third-party optimizers (the ``optimizers`` extra), float64: Lion, transformers' Adafactor,
schedule-free AdamW, GaLore AdamW.

Each layout is held to its optimizer's arithmetic, written out here from the package's documented update;
each optimizer, in a full fine-tuning run, is its own shadow (cosine 1, the same moments); GaLore's moments
are lifted through its projector and its refreshes recorded. A module whose package is missing is skipped.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import F64, lora_mlp, mlp, randn
from torch.testing import assert_close

from loft_probe import attach, load_run
from loft_probe.probe import ProbeWarning
from loft_probe.probe.layouts import Layout, base, layout_of, register_layout

TIGHT = {"rtol": 1e-12, "atol": 1e-15}


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=gen, dtype=F64), torch.randn(16, 5, generator=gen, dtype=F64))
            for _ in range(n)]


def run(model, optimizer, run_dir, steps=6, shadow=True):
    """A probed full fine-tuning run recording every step; returns its metrics and each step's true W.grad."""
    grads = []
    with attach(model, optimizer, run_dir, every=1, shadow=shadow) as probe:
        for x, y in batches(steps):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
            probe.log(loss=1.0)
    return load_run(run_dir).metrics, grads


def values(metrics, name, layer=None):
    rows = metrics[(metrics.metric == name) & ((metrics.layer == layer) if layer is not None else True)]
    return rows.sort_values("step")["value"].reset_index(drop=True)


def assert_own_shadow(metrics, first: bool, second: bool, steps=6):
    """Full fine-tuning with the shadow's class: the same update (cosine 1, same norm) and the same moments."""
    cosines = values(metrics, "shadow_update_cosine")
    assert len(cosines) == steps * 2 and ((cosines - 1).abs() < 1e-10).all()
    assert (values(metrics, "shadow_update_rel_norm") - 1).abs().max() < 1e-10
    for name, kept in (("shadow_m_rel_error", first), ("shadow_v_rel_error", second)):
        assert (len(values(metrics, name)) > 0) == kept
        assert (values(metrics, name) < 1e-10).all()


def step_with(optimizer, param, grads):
    for g in grads:
        param.grad = g.clone()  # schedule-free overwrites p.grad
        optimizer.step()


# ------------------------------------------------------------------ Lion
def lion_reference(W, grads, lr, betas, weight_decay):
    """Lion's update rule (Chen et al. 2023, Algorithm 2) with decoupled decay: (W, m) after the steps."""
    beta1, beta2 = betas
    W, m = W.clone(), torch.zeros_like(W)
    for g in grads:
        W = W * (1 - lr * weight_decay) - lr * torch.sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g
    return W, m


@pytest.mark.parametrize("decoupled", [False, True])
def test_lion_keeps_a_gradient_ema_and_steps_its_sign(decoupled):
    Lion = pytest.importorskip("lion_pytorch").Lion
    param = torch.nn.Parameter(randn(4, 3, seed=0))
    W0 = param.detach().clone()
    optimizer = Lion([param], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1 if not decoupled else 1e-3,
                     decoupled_weight_decay=decoupled)
    grads = [randn(4, 3, seed=t) for t in range(1, 6)]
    step_with(optimizer, param, grads)
    W, m = lion_reference(W0, grads, 0.01, (0.9, 0.99), 0.1)  # decoupled: 1e-3 / lr = 0.1 too
    assert_close(param.detach(), W, **TIGHT)
    layout = layout_of(optimizer)
    moments = layout.moments(optimizer, optimizer.param_groups[0], param)
    assert_close(moments.first, m, **TIGHT)
    assert moments.second is None
    hyper = layout.shadow_hyperparameters(optimizer, optimizer.param_groups[0])
    assert layout.decoupled_decay(hyper) == pytest.approx(0.1, rel=1e-12) and not layout.reads_weight(hyper)


@pytest.mark.parametrize("decoupled", [False, True])
def test_lion_is_its_own_shadow(tmp_path, decoupled):
    Lion = pytest.importorskip("lion_pytorch").Lion
    model = mlp()
    optimizer = Lion(model.parameters(), lr=1e-2, weight_decay=0.1 if not decoupled else 1e-3,
                     decoupled_weight_decay=decoupled)
    metrics, _ = run(model, optimizer, tmp_path / "run")
    assert_own_shadow(metrics, first=True, second=False)


# ------------------------------------------------------------------ Adafactor
def test_adafactor_second_moment_is_its_rank_one_reconstruction():
    """R, C and the unfactored v are EMAs of G² + ε1 with β2_t = 1 − t^−0.8; the step divides G by sqrt(V̂)
    (checked through the weight: no clipping, fixed lr, no parameter scaling)."""
    Adafactor = pytest.importorskip("transformers.optimization").Adafactor
    weight, bias = torch.nn.Parameter(randn(5, 3, seed=0)), torch.nn.Parameter(randn(5, seed=1))
    optimizer = Adafactor([weight, bias], lr=1e-2, relative_step=False, scale_parameter=False,
                          clip_threshold=1e9, beta1=0.9)
    eps1 = optimizer.param_groups[0]["eps"][0]
    R = C = v = None
    for t in range(1, 5):
        G, g = randn(5, 3, seed=10 + t), randn(5, seed=20 + t)
        W_before = weight.detach().clone()
        weight.grad, bias.grad = G.clone(), g.clone()
        optimizer.step()
        beta2t = 1 - t**-0.8
        R = (1 - beta2t) * (G**2 + eps1).mean(1) if t == 1 else beta2t * R + (1 - beta2t) * (G**2 + eps1).mean(1)
        C = (1 - beta2t) * (G**2 + eps1).mean(0) if t == 1 else beta2t * C + (1 - beta2t) * (G**2 + eps1).mean(0)
        v = (1 - beta2t) * (g**2 + eps1) if t == 1 else beta2t * v + (1 - beta2t) * (g**2 + eps1)
        layout = layout_of(optimizer)
        V = layout.moments(optimizer, optimizer.param_groups[0], weight).second
        assert_close(V, torch.outer(R, C) / R.mean(), **TIGHT)
        if t == 1:  # m = (1 − β1)·lr·G/sqrt(V̂): the update is what V̂ preconditions
            assert_close(W_before - weight.detach(), 0.1 * 1e-2 * G / V.sqrt(), **TIGHT)
    moments = layout.moments(optimizer, optimizer.param_groups[0], bias)
    assert_close(moments.second, v, **TIGHT)
    assert moments.first is None  # exp_avg averages the preconditioned updates, not the gradients


ADAFACTOR = {
    "relative step, parameter scale": dict(),  # transformers' defaults: reads the weight's RMS
    "relative step, decay": dict(scale_parameter=False, weight_decay=0.1),  # decays by ρ·λ: reads the weight
    "lr, decay, beta1, clipping": dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1,
                                       beta1=0.9, clip_threshold=0.5),  # steps a zero weight
}


@pytest.mark.parametrize("name", ADAFACTOR)
def test_adafactor_is_its_own_shadow(tmp_path, name):
    Adafactor = pytest.importorskip("transformers.optimization").Adafactor
    model = mlp()
    optimizer = Adafactor(model.parameters(), **ADAFACTOR[name])
    layout = layout_of(optimizer)
    assert layout.reads_weight(optimizer.param_groups[0]) == (name != "lr, decay, beta1, clipping")
    metrics, _ = run(model, optimizer, tmp_path / "run")
    assert_own_shadow(metrics, first=False, second=True)
    assert ("lr" in set(metrics.metric)) == ("lr" in ADAFACTOR[name])  # a relative step has no group lr


# ------------------------------------------------------------------ schedule-free AdamW
@pytest.mark.parametrize("reference", [False, True])
def test_schedule_free_holds_y_and_keeps_the_true_gradients_second_moment(reference):
    """The parameter is y = (1 − β1)·z + β1·x, z the base sequence, x its average; exp_avg_sq is EMA(g²) of
    the true gradients although AdamWScheduleFree overwrites p.grad."""
    schedulefree = pytest.importorskip("schedulefree")
    cls = schedulefree.AdamWScheduleFreeReference if reference else schedulefree.AdamWScheduleFree
    param = torch.nn.Parameter(randn(4, 3, seed=0))
    lr, (beta1, beta2), eps, decay, warmup = 1e-2, (0.9, 0.999), 1e-8, 0.1, 2
    optimizer = cls([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay, warmup_steps=warmup)
    optimizer.train()
    grads = [randn(4, 3, seed=t) for t in range(1, 6)]
    z = x = param.detach().clone()
    v, weight_sum = torch.zeros_like(z), 0.0
    lr_max = -1.0
    for k, g in enumerate(grads):
        y = (1 - beta1) * z + beta1 * x
        step_lr = lr * min(1.0, (k + 1) / warmup)
        lr_max = max(lr_max, step_lr)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        v = beta2 * v + (1 - beta2) * g**2
        z = z - step_lr * (g / ((v / (1 - beta2 ** (k + 1))).sqrt() + eps) + decay * y)
        x = (1 - c) * x + c * z
    step_with(optimizer, param, grads)
    assert_close(param.detach(), (1 - beta1) * z + beta1 * x, rtol=1e-12, atol=1e-14)
    assert_close(optimizer.state[param]["z"], z, rtol=1e-12, atol=1e-14)
    moments = layout_of(optimizer).moments(optimizer, optimizer.param_groups[0], param)
    assert moments.first is None
    assert_close(moments.second, v, **TIGHT)


@pytest.mark.parametrize("reference", [False, True])
def test_schedule_free_is_its_own_shadow_and_the_probe_sees_the_true_gradient(tmp_path, reference):
    schedulefree = pytest.importorskip("schedulefree")
    cls = schedulefree.AdamWScheduleFreeReference if reference else schedulefree.AdamWScheduleFree
    model = mlp()
    optimizer = cls(model.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=3)
    optimizer.train()
    metrics, grads = run(model, optimizer, tmp_path / "run")
    assert_own_shadow(metrics, first=False, second=True)
    true_norms = torch.tensor([float(g["0.weight"].norm()) for g in grads], dtype=F64)
    assert_close(torch.tensor(values(metrics, "grad_norm", "0").to_numpy()), true_norms, **TIGHT)


# ------------------------------------------------------------------ GaLore AdamW
def galore_reference(grads, rank, gap, beta1=0.9):
    """GaLore's r-space first moment of one weight, lifted by hand: P refreshed from the SVD (float32, as GaLore)
    of G at steps 1, gap + 1, ...; right projection (g = G·Pᵀ) for m ≥ n, left (g = Pᵀ·G) otherwise. Per step:
    (the lifted moment before the step through the P the step starts with, or None, the lifted moment after,
    the projection X ↦ X·PᵀP or P·PᵀX onto the subspace the step took)."""
    m = P = None
    out = []
    for t, G in enumerate(grads, 1):
        right = G.shape[0] >= G.shape[1]
        lift = (lambda X, P: X @ P) if right else (lambda X, P: P @ X)
        before = lift(m, P) if m is not None else None
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
            P = (Vh[:rank] if right else U[:, :rank]).to(F64)
        g = G @ P.T if right else P.T @ G
        m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
        out.append((before, lift(m, P), (lambda X, P=P: X @ P.T @ P) if right else (lambda X, P=P: P @ P.T @ X)))
    return out


def galore(model, rank=2, gap=3, **kwargs):
    GaLoreAdamW = pytest.importorskip("galore_torch").GaLoreAdamW
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return GaLoreAdamW([{"params": others}, {"params": weights, "rank": rank, "update_proj_gap": gap,
                                             "scale": 0.5, "proj_type": "std"}],
                       lr=1e-2, no_deprecation_warning=True, **kwargs)


def test_galore_moments_are_lifted_through_its_projector():
    model = mlp()
    optimizer = galore(model)
    grads = {p: [randn(*p.shape, seed=10 * i + t) for t in range(7)] for i, p in enumerate(model.parameters())}
    for t in range(7):
        for p in model.parameters():
            p.grad = grads[p][t].clone()
        optimizer.step()
    layout = layout_of(optimizer)
    for p in model.parameters():
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        moments = layout.moments(optimizer, group, p)
        if p.dim() == 2:  # 12×8: right projection; 5×12: left
            assert_close(moments.first, galore_reference(grads[p], 2, 3)[-1][1], **TIGHT)
            assert moments.second is None  # r-space elementwise v: no full-space image
        else:  # a weight GaLore does not project is plain (this class's) AdamW
            assert moments.first is optimizer.state[p]["exp_avg"]
            assert moments.second is optimizer.state[p]["exp_avg_sq"]


def test_galore_records_its_refreshes_and_the_moment_around_each(tmp_path):
    model = mlp()
    metrics, grads = run(model, galore(model, weight_decay=0.1), tmp_path / "run", steps=7)
    for layer in ("0", "2"):
        reference = galore_reference([g[f"{layer}.weight"] for g in grads], 2, 3)
        assert values(metrics, "galore_refresh_age", layer).tolist() == [0, 1, 2, 0, 1, 2, 0]
        after = values(metrics, "galore_cos_after_refresh", layer)
        before = values(metrics, "galore_cos_before_refresh", layer)
        assert len(after) == 3 and len(before) == 2  # steps 1, 4, 7; nothing before the first step
        for i, t in enumerate((1, 4, 7)):
            G = grads[t - 1][f"{layer}.weight"]
            cos = [float(torch.nn.functional.cosine_similarity(X.flatten(), G.flatten(), dim=0))
                   for X in reference[t - 1][:2] if X is not None]
            assert after[i] == pytest.approx(cos[-1], abs=1e-12)
            if t > 1:
                assert before[i - 1] == pytest.approx(cos[0], abs=1e-12)
        assert_close(torch.tensor(values(metrics, "cos_moment_grad", layer).to_numpy()),
                     torch.tensor([float(torch.nn.functional.cosine_similarity(
                         lifted.flatten(), G.flatten(), dim=0)) for (_, lifted, _), G in
                         zip(reference, [g[f"{layer}.weight"] for g in grads], strict=True)], dtype=F64), **TIGHT)


def test_galore_moment_against_the_shadow_projected_onto_its_subspace(tmp_path):
    """shadow_m_proj_cosine of a projected weight: cos(P-lifted m, the shadow's EMA(G) projected onto P's
    subspace); 1 until the first refresh, below 1 from the refresh that reads stale coordinates."""
    model = mlp()
    metrics, grads = run(model, galore(model), tmp_path / "run", steps=7)
    for layer in ("0", "2"):
        G = [g[f"{layer}.weight"] for g in grads]
        shadow_m = [0.1 * G[0]]
        for g in G[1:]:
            shadow_m.append(0.9 * shadow_m[-1] + 0.1 * g)
        expected = [float(torch.nn.functional.cosine_similarity(lifted.flatten(), project(M).flatten(), dim=0))
                    for (_, lifted, project), M in zip(galore_reference(G, 2, 3), shadow_m, strict=True)]
        recorded = values(metrics, "shadow_m_proj_cosine", layer)
        assert_close(torch.tensor(recorded.to_numpy()), torch.tensor(expected, dtype=F64), **TIGHT)
        assert (recorded[:3] - 1).abs().max() < 1e-12 and recorded[3] < 1 - 1e-6
        assert len(values(metrics, "shadow_m_proj_rel_error", layer)) == 7
        assert not len(values(metrics, "shadow_m_proj_cosine_b", layer))  # a dense weight has no factor sides


def test_galore_without_projection_is_its_own_shadow(tmp_path):
    """The shadow is GaLore's class less its projection keys: a weight it does not project is stepped alike
    (ε before the bias correction, decay after the step; torch's AdamW would differ)."""
    GaLoreAdamW = pytest.importorskip("galore_torch").GaLoreAdamW
    model = mlp()
    optimizer = GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, no_deprecation_warning=True)
    metrics, _ = run(model, optimizer, tmp_path / "run")
    assert_own_shadow(metrics, first=True, second=True)
    model = mlp()
    with attach(model, galore(model), tmp_path / "projected", shadow=True) as probe:
        for layer in probe.layers:
            assert type(layer.shadow.optimizer) is GaLoreAdamW and "rank" not in layer.shadow.group


# ------------------------------------------------------------------ LoRA runs
@pytest.mark.parametrize("name", ["lion", "adafactor", "schedulefree"])
def test_a_lora_run_with_each_is_probed_whole(tmp_path, name):
    """No probe warning (an error in measuring disables the probe with one); Lion's factor moments lift."""
    model = lora_mlp()
    if name == "lion":
        optimizer = pytest.importorskip("lion_pytorch").Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    elif name == "adafactor":
        optimizer = pytest.importorskip("transformers.optimization").Adafactor(model.parameters())
    else:
        optimizer = pytest.importorskip("schedulefree").AdamWScheduleFree(model.parameters(), lr=1e-2)
        optimizer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeWarning)
        metrics, _ = run(model, optimizer, tmp_path / "run", steps=3)
    assert len(values(metrics, "shadow_update_cosine")) == 3 * 2
    assert (len(values(metrics, "shadow_m_proj_cosine_a")) > 0) == (name == "lion")


# ------------------------------------------------------------------ resuming
def _optimizer(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    if name == "lion":
        return pytest.importorskip("lion_pytorch").Lion(model.parameters(), lr=1e-3)
    optimizer = pytest.importorskip("schedulefree").AdamWScheduleFree(model.parameters(), lr=1e-2)
    optimizer.train()
    return optimizer


@pytest.mark.parametrize("name", ["sgd", "lion", "schedulefree"])
def test_a_resume_keeps_the_record_whether_or_not_the_optimizer_counts_steps(tmp_path, name):
    """SGD and Lion keep no step count (a resume continues after the directory's last step, with a warning);
    schedule-free AdamW keeps its count in the group. No record is dropped, and the steps run on."""
    model = mlp()
    optimizer = _optimizer(name, model)
    data = batches(7)

    def train(probe, part):
        for x, y in part:
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            probe.log(loss=1.0)

    with attach(model, optimizer, tmp_path / "run", every=1) as probe:
        train(probe, data[:4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = attach(model, optimizer, tmp_path / "run", every=1)
    said = [str(w.message) for w in caught if "step count" in str(w.message)]
    assert said == ([] if name == "schedulefree" else [
        f"{type(optimizer).__name__} keeps no step count: the record in {tmp_path / 'run'} continues after its "
        "last step, 4; restore probe.load_state_dict(...) saved with the checkpoint for an exact resume"])
    assert probe.step == 4
    with probe:
        train(probe, data[4:])
    assert sorted(load_run(tmp_path / "run").metrics.step.unique()) == list(range(1, 8))


# ------------------------------------------------------------------ registration
def test_third_party_layouts_load_on_first_lookup_and_defer_to_a_users(monkeypatch):
    """Importing loft_probe imports none of these packages; a layout registered first is kept."""
    imported = subprocess.run([sys.executable, "-c", "import sys, loft_probe, loft_probe.probe; print(sorted(m for m "
                               "in ('galore_torch', 'lion_pytorch', 'schedulefree', 'transformers') "
                               "if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
    schedulefree = pytest.importorskip("schedulefree")
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # this test's own, as if freshly imported
    monkeypatch.setattr(base, "_DEFERRED", dict(base._DEFERRED))
    for cls in (schedulefree.AdamWScheduleFree, schedulefree.AdamWScheduleFreeReference):
        base._REGISTRY.pop(cls, None)
        base.defer_layout(f"{cls.__module__}.{cls.__qualname__}", "loft_probe.probe.layouts.schedule_free")

    class Mine(Layout):
        second_key = "exp_avg_sq"

    register_layout(schedulefree.AdamWScheduleFreeReference, mine := Mine())
    assert layout_of(schedulefree.AdamWScheduleFree).overwrites_grad  # loads the module's layouts
    assert layout_of(schedulefree.AdamWScheduleFreeReference) is mine
