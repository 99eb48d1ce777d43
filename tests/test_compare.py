"""Cross-run comparison on synthetic run directories whose answers are known in closed form.

The full run's ΔW = U·diag(s)·Vᵀ is built from random orthogonal U, V; each adapter run's factors are
B = X·C, A = D·Yᵀ with X = cos θ·U[:, :r] + sin θ·U[:, r:2r] (Y likewise with V): its principal angles to
the full run's top-r subspaces are exactly θ, whatever the invertible C, D. Snapshots are stored in
float32, so the tolerances are 1e-5 except for the float32-exact construction at the end.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import F64, gen
from torch.testing import assert_close

from loft_probe.comparison import (
    COLUMNS,
    COMPARE_METRICS,
    WORSE_IS_HIGHER,
    IncompatibleRunsError,
    IncompatibleRunsWarning,
    RunSelectionError,
    check_compatible,
    compare,
    phi_grid,
)
from loft_probe.run import load_run, snapshot_key, write_meta, write_metrics_part, write_snapshot
from loft_probe.summary import COMPARISON_TABLE_COLUMNS, comparison_table

M, N = 24, 20
R = 3  # adapter rank
K = 8  # singular triplets kept by the full run's snapshots
SCALE = 2.0  # LoRA s
RANKS = {"l0": 6, "l1": 12}  # rank of the full ΔW per layer: l0 fits in k (exact), l1 is truncated
STEPS = (10, 20)  # the full run's snapshots; the adapter runs also have one at 30
TOL = {"rtol": 1e-5, "atol": 1e-5}
# Rotation angles per layer, left and right; l1 is the worse layer everywhere.
ROTATED = {"l0": ([0.1, 0.4, 0.9], [0.2, 0.6, 1.2]), "l1": ([0.3, 0.6, 1.1], [0.4, 0.8, 1.4])}


def orthogonal(d: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64)).Q


def full_layer(layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (M, M), V (N, N), ΔW (M, N)) with ΔW = U·diag(s)·Vᵀ of rank RANKS[layer], s distinct."""
    seed = int(layer[1:])
    U, V = orthogonal(M, 10 + seed), orthogonal(N, 20 + seed)
    s = torch.linspace(4.0, 0.5, RANKS[layer], dtype=F64)
    return U, V, (U[:, : len(s)] * s) @ V[:, : len(s)].T


def rotated(Q: torch.Tensor, thetas: list[float]) -> torch.Tensor:
    """(d, r) basis at principal angles `thetas` from Q[:, :r], rotating into Q[:, r:2r]."""
    t = torch.tensor(thetas, dtype=F64)
    return torch.cos(t) * Q[:, :R] + torch.sin(t) * Q[:, R : 2 * R]


def adapter(layer: str, left: list[float], right: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """B (M, R), A (R, N) whose spans sit at the given angles from the full run's top-R subspaces."""
    U, V, _ = full_layer(layer)
    g = gen(30 + int(layer[1:]))
    C = torch.randn(R, R, generator=g, dtype=F64) + 3 * torch.eye(R, dtype=F64)  # a change of basis
    D = torch.randn(R, R, generator=g, dtype=F64) + 3 * torch.eye(R, dtype=F64)
    return rotated(U, left) @ C, D @ rotated(V, right).T


def initial_factors(layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """B_0 (M, R), A_0 (R, N): non-zero, so that ΔW = s·(B·A − B_0·A_0) has rank 2r, not the span of B."""
    g = gen(40 + int(layer[1:]))
    return 0.3 * torch.randn(M, R, generator=g, dtype=F64), torch.randn(R, N, generator=g, dtype=F64)


def top(dW: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return {"delta.U": U[:, :k], "delta.S": S[:k], "delta.Vh": Vh[:k]}


def layer_meta(name: str, shape, kind: str) -> dict:
    return {"name": name, "shape": list(shape), "kind": kind, "rank": R if kind == "lora" else None,
            "scale": SCALE if kind == "lora" else None, "fingerprint": f"sha-{name}"}


def write_run(path: Path, name: str, method: str, layers: list[dict], snapshots: dict, rows=(), **meta):
    """A run directory written with the rundir helpers; snapshots {step: {layer: {"delta.U": ..., ...}}}."""
    path.mkdir()
    write_meta(path, {"name": name, "method": method, "seed": 0, "data_order": "digits:seed=0",
                      "fingerprint": "ab" * 32, "layers": layers, "hyperparameters": {"lr": 1e-3},
                      "schedule": "every 2", **meta})
    if rows:
        write_metrics_part(path, list(rows))
    for step, tensors in snapshots.items():
        write_snapshot(path, step, {snapshot_key(layer, *what.split(".")): t
                                    for layer, parts in tensors.items() for what, t in parts.items()})
    return load_run(path)


def full_run(tmp_path: Path, name: str = "full", **meta):
    deltas = {"l0": full_layer("l0")[2], "l1": full_layer("l1")[2],
              "l2": torch.randn(16, 12, generator=gen(5), dtype=F64)}
    # ΔW grows linearly in the step: the subspaces stay, the norms change.
    snapshots = {step: {layer: top(step / 20 * dW, K) for layer, dW in deltas.items()} for step in STEPS}
    rows = [(t, "", "loss", 2.0 - 0.05 * t) for t in range(1, 21)]
    rows += [(t, layer, "intruders", float(t // 10 + i)) for t in STEPS for i, layer in enumerate(deltas)]
    return write_run(tmp_path / name, name, "full", full_layers(), snapshots, rows, **meta)


def full_layers() -> list[dict]:
    return [layer_meta("l0", (M, N), "full"), layer_meta("l1", (M, N), "full"),
            layer_meta("l2", (16, 12), "full")]


def lora_run(tmp_path: Path, name: str, angles: dict, layers=None, extra=None, **meta):
    """A LoRA run with factors at `angles` {layer: (left θ, right θ)} and snapshots at steps 10, 20, 30
    (plus the `extra` {layer: tensors} in each)."""
    snapshots = {}
    for step in (*STEPS, 30):
        snapshots[step] = dict(extra or {})
        for layer, (left, right) in angles.items():
            B, A = adapter(layer, left, right)
            B = step / 20 * B
            B0, A0 = initial_factors(layer)
            # k = 2r like the probe: ΔW = s·(B·A − B_0·A_0) has rank 2r, its snapshot is exact.
            snapshots[step][layer] = {**top(SCALE * (B @ A - B0 @ A0), 2 * R), "adapter.B": B, "adapter.A": A}
    layers = layers or [layer_meta(layer, (M, N), "lora") for layer in angles]
    rows = [(t, "", "loss", 2.5 - 0.04 * t) for t in range(2, 31, 2)]
    rows += [(t, layer, "intruders", 7.0 + t) for t in (*STEPS, 30) for layer in angles]
    return write_run(tmp_path / name, name, "lora", layers, snapshots, rows, **meta)


@pytest.fixture
def runs(tmp_path):
    zero = {layer: ([0.0] * R, [0.0] * R) for layer in RANKS}
    right_angle = {layer: ([math.pi / 2] * R, [math.pi / 2] * R) for layer in RANKS}
    # A run without adapter factors (method "other"): its ΔW is the full run's top-r truncation, padded to 2r.
    other = {step: {layer: top(step / 20 * full_layer(layer)[2], R) for layer in RANKS} for step in STEPS}
    for parts in other.values():
        for layer, t in parts.items():
            parts[layer] = {"delta.U": torch.cat([t["delta.U"], full_layer(layer)[0][:, -R:]], 1),
                            "delta.S": torch.cat([t["delta.S"], torch.zeros(R, dtype=F64)]),
                            "delta.Vh": torch.cat([t["delta.Vh"], full_layer(layer)[1][:, -R:].T])}
    return {
        "full": full_run(tmp_path),
        "aligned": lora_run(tmp_path, "aligned", zero),
        "orthogonal": lora_run(tmp_path, "orthogonal", right_angle),
        "rotated": lora_run(tmp_path, "rotated", ROTATED),
        "other": write_run(tmp_path / "other", "other", "other",
                           [layer_meta(layer, (M, N), "full") for layer in RANKS], other),
    }


def values(frame: pd.DataFrame, run: str, metric: str, step: int = 20) -> dict[str, float]:
    rows = frame[(frame.run == run) & (frame.metric == metric) & (frame.step == step)]
    return dict(zip(rows.layer, rows.value, strict=True))


def test_frame_shape_and_vocabulary(runs):
    frame = compare(runs.values())
    assert tuple(frame.columns) == COLUMNS
    assert set(frame.metric) == set(COMPARE_METRICS) == set(WORSE_IS_HIGHER)
    assert set(frame.reference) == {"full"}
    assert dict(zip(frame.run, frame.method, strict=True)) == {
        "full": "full", "aligned": "lora", "orthogonal": "lora", "rotated": "lora", "other": "other"}
    snap = frame[frame.metric == "phi_left"]
    assert set(snap.step) == set(STEPS), "only snapshot steps common to run and reference (not 30)"
    assert set(snap.layer) == {"l0", "l1"}, "l2 is only in the full run"
    assert frame.dtypes["step"] == "int64" and frame.dtypes["value"] == "float64"


@pytest.mark.parametrize("name", ["aligned", "orthogonal", "rotated"])
def test_angles_grassmann_phi_closed_form(runs, name):
    frame = compare(runs.values())
    for layer in RANKS:
        for side, thetas in zip(("left", "right"), ROTATED[layer] if name == "rotated" else ([0.0] * R,) * 2,
                                strict=True):
            theta = torch.tensor(thetas, dtype=F64) + (math.pi / 2 if name == "orthogonal" else 0.0)
            expected = {f"angle_{side}_max": theta.max(), f"angle_{side}_mean": theta.mean(),
                        f"grassmann_{side}": theta.norm(), f"phi_{side}": torch.cos(theta).square().mean()}
            for step in STEPS:
                got = torch.tensor([values(frame, name, key, step)[layer] for key in expected], dtype=F64)
                assert_close(got, torch.stack(list(expected.values())), **TOL,
                             msg=f"{name} {layer} {side} step {step}")


def test_run_without_adapter_uses_its_own_delta(runs):
    """The 'other' run's ΔW spans the full run's top-r subspaces: its zero-padded directions do not count."""
    frame = compare(runs.values())
    for layer in RANKS:
        for side in ("left", "right"):
            assert values(frame, "other", f"phi_{side}")[layer] == pytest.approx(1.0, abs=1e-5)
            assert values(frame, "other", f"angle_{side}_max")[layer] == pytest.approx(0.0, abs=1e-5)


def dense_cosine(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (X * Y).sum() / (X.norm() * Y.norm())


def truncated(dW: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("name", ["aligned", "orthogonal", "rotated"])
def test_delta_cosine_and_norm_match_dense(runs, name):
    """Against dense m×n products; l1's full ΔW (rank 12 > k = 8) is compared as its top-k truncation."""
    frame = compare(runs.values())
    angles = {"aligned": {layer: ([0.0] * R,) * 2 for layer in RANKS},
              "orthogonal": {layer: ([math.pi / 2] * R,) * 2 for layer in RANKS}, "rotated": ROTATED}[name]
    for layer, (left, right) in angles.items():
        B, A = adapter(layer, left, right)
        B0, A0 = initial_factors(layer)
        mine, full = SCALE * (B @ A - B0 @ A0), truncated(full_layer(layer)[2], K)
        cos, rel = dense_cosine(mine, full).item(), (mine.norm() / full.norm()).item()
        assert values(frame, name, "delta_cosine")[layer] == pytest.approx(cos, abs=1e-5)
        assert values(frame, name, "delta_rel_norm")[layer] == pytest.approx(rel, rel=1e-5)


def test_delta_cosine_is_exact_when_k_covers_the_rank(runs):
    """l0's full ΔW has rank 6 ≤ k: the cosine is the one of the complete matrices, not of a truncation."""
    frame = compare(runs.values())
    mine = top(full_layer("l0")[2], R)
    dW = (mine["delta.U"] * mine["delta.S"]) @ mine["delta.Vh"]
    assert values(frame, "other", "delta_cosine")["l0"] == pytest.approx(
        dense_cosine(dW, full_layer("l0")[2]).item(), abs=1e-6)


def test_loss_gap_is_the_difference_at_common_steps(runs):
    frame = compare([runs["full"], runs["rotated"]])
    gap = frame[frame.metric == "loss_gap"]
    assert set(gap.layer) == {""} and set(gap.run) == {"rotated"}
    assert list(gap.step) == list(range(2, 21, 2)), "steps where both recorded a loss"
    expected = [(2.5 - 0.04 * t) - (2.0 - 0.05 * t) for t in gap.step]
    assert list(gap.value) == pytest.approx(expected, abs=1e-12)


def test_intruders_copied_for_runs_and_reference(runs):
    frame = compare([runs["full"], runs["rotated"]])
    intruders = frame[frame.metric == "intruders"]
    mine = intruders[intruders.run == "rotated"]
    expected = [(t, layer, 7.0 + t) for t in STEPS for layer in RANKS]
    assert sorted(zip(mine.step, mine.layer, mine.value, strict=True)) == expected
    ref = intruders[intruders.run == "full"]
    assert set(ref.reference) == {"full"} and set(ref.method) == {"full"}
    assert sorted(zip(ref.step, ref.layer, ref.value, strict=True)) == [
        (t, layer, float(t // 10 + i)) for t in STEPS for i, layer in enumerate(RANKS)], "no l2, no step 30"


def test_phi_grid_matches_frame_and_definition(runs):
    frame = compare([runs["full"], runs["rotated"]])
    for side in ("left", "right"):
        grid = phi_grid(runs["rotated"], runs["full"], 20, "l0", side=side)
        assert grid.shape == (R, RANKS["l0"]), "adapter rank × nonzero singular values of ΔW_full"
        phi = values(frame, "rotated", f"phi_{side}")["l0"]
        assert grid[R - 1, R - 1].item() == pytest.approx(phi, abs=1e-6)
        # The definition, loop by loop, on dense SVDs (signs do not matter in squared cosines).
        B, A = adapter("l0", *ROTATED["l0"])
        U1, _, V1h = torch.linalg.svd(B @ A)
        U2, _, V2h = torch.linalg.svd(full_layer("l0")[2])
        X, Y = (U1, U2) if side == "left" else (V1h.T, V2h.T)
        expected = torch.tensor([[(X[:, :a].T @ Y[:, :b]).square().sum() / min(a, b)
                                  for b in range(1, grid.shape[1] + 1)] for a in range(1, R + 1)], dtype=F64)
        assert_close(grid, expected, **TOL)
    assert phi_grid(runs["rotated"], runs["full"], 20, "l0", size=2).shape == (2, 2)
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        phi_grid(runs["rotated"], runs["full"], 20, "l0", side="up")


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("meta", "says"), [
    ({"fingerprint": "cd" * 32}, "fingerprint: lora has 'cdcdcdcdcdcd…', full has 'abababababab…'"),
    ({"seed": 1}, "seed: lora has 1, full has 0"),
    ({"data_order": "digits:seed=1"}, "data_order: lora has 'digits:seed=1', full has 'digits:seed=0'"),
])
def test_refuses_meta_differences(tmp_path, meta, says):
    """Same layer sets: the global fingerprint is comparable."""
    lora = lora_run(tmp_path, "lora", {"l0": ROTATED["l0"]}, layers=full_layers(), **meta)
    full = full_run(tmp_path)
    with pytest.raises(IncompatibleRunsError, match="runs do not compare: ") as info:
        compare([full, lora])
    assert says.replace("'", "") in str(info.value).replace("'", "") and "\n" not in str(info.value)
    with pytest.warns(IncompatibleRunsWarning, match=says.split(":")[0]):
        frame = compare([full, lora], force=True)
    assert set(frame[frame.metric == "phi_left"].layer) == {"l0"}


def test_refuses_layer_shape_and_skips_it_under_force(tmp_path):
    layers = [layer_meta("l0", (M, N + 1), "lora"), layer_meta("l1", (M, N), "lora")]
    wide = torch.randn(M, N + 1, generator=gen(7), dtype=F64)  # l0 has another shape here: any ΔW of that shape
    lora = lora_run(tmp_path, "lora", {"l1": ROTATED["l1"]}, layers=layers, extra={"l0": top(wide, 2 * R)})
    full = full_run(tmp_path)
    says = r"shape: layer 'l0' is \[24, 21\] in lora, \[24, 20\] in full"
    with pytest.raises(IncompatibleRunsError, match=says):
        check_compatible([full, lora])
    with pytest.warns(IncompatibleRunsWarning, match="shape"):
        frame = compare([full, lora], force=True)
    assert set(frame[frame.metric == "phi_left"].layer) == {"l1"}


def test_refuses_layers_missing_from_the_reference(tmp_path):
    layers = [layer_meta("l0", (M, N), "lora"), layer_meta("l7", (M, N), "lora")]  # the meta names l7
    lora = lora_run(tmp_path, "lora", {"l0": ROTATED["l0"], "l1": ROTATED["l1"]}, layers=layers)
    with pytest.raises(IncompatibleRunsError, match="layers: lora has 'l7' not in full"):
        compare([full_run(tmp_path), lora])


def test_refuses_per_layer_fingerprint_and_unverifiable_base(tmp_path):
    other_base = layer_meta("l1", (M, N), "lora") | {"fingerprint": "sha-other"}
    layers = [layer_meta("l0", (M, N), "lora"), other_base]
    lora = lora_run(tmp_path, "lora", {"l0": ROTATED["l0"], "l1": ROTATED["l1"]}, layers=layers)
    full = full_run(tmp_path)
    says = "fingerprint: layer 'l1' is 'sha-other' in lora, 'sha-l1' in full"
    with pytest.raises(IncompatibleRunsError, match=says):
        compare([full, lora])
    # Without per-layer fingerprints, a global one over other layer sets cannot vouch for the base weights.
    bare = [{key: v for key, v in layer_meta(name, (M, N), "lora").items() if key != "fingerprint"}
            for name in ("l0", "l1")]
    lora2 = lora_run(tmp_path, "lora2", {"l0": ROTATED["l0"], "l1": ROTATED["l1"]}, layers=bare)
    with pytest.raises(IncompatibleRunsError, match="fingerprint: covers 2 layers in lora2, 3 in full"):
        compare([full, lora2])


def test_compatible_runs_pass_silently(runs, recwarn):
    check_compatible(runs.values())
    assert not recwarn.list


# ---------------------------------------------------------------------------------------------- reference
def test_reference_selection(runs, tmp_path):
    with pytest.raises(RunSelectionError, match=r"exactly one run with method 'full'.*got \[\]"):
        compare([runs["aligned"], runs["rotated"]])
    twin = full_run(tmp_path, name="full-twin")
    with pytest.raises(RunSelectionError, match=r"got \['full', 'full-twin'\]"):
        compare([runs["full"], twin, runs["rotated"]])
    frame = compare([runs["full"], twin, runs["rotated"]], reference="full-twin")
    assert set(frame.reference) == {"full-twin"} and "full" in set(frame.run)
    assert set(compare([runs["rotated"]], reference=runs["full"]).reference) == {"full"}
    with pytest.raises(RunSelectionError, match="reference 'nope' is not one of the runs"):
        compare(runs.values(), reference="nope")
    with pytest.raises(RunSelectionError, match="unique"):
        compare([runs["full"], runs["rotated"], runs["rotated"].path])
    # One default-reference rule: check_compatible refuses to guess where compare would
    with pytest.raises(RunSelectionError, match=r"exactly one run with method 'full'.*got \['full', 'full-twin'\]"):
        check_compatible([runs["full"], twin, runs["rotated"]])
    check_compatible([runs["full"], twin, runs["rotated"]], reference=twin)


def test_runs_given_as_paths(runs):
    frame = compare([run.path for run in runs.values()])
    assert set(frame.run) == set(runs)


# ---------------------------------------------------------------------------------------------- summary
def test_summarize_picks_worst_layer_at_last_step(runs):
    table = comparison_table(compare(runs.values()))
    assert tuple(table.columns) == COMPARISON_TABLE_COLUMNS
    rows = table.set_index(["run", "metric"])
    for metric in ("angle_left_max", "angle_right_mean", "grassmann_left", "phi_left", "phi_right"):
        row = rows.loc[("rotated", metric)]
        assert row.worst_layer == "l1" and row.step == 20 and row.layers == 2, metric
    assert rows.loc[("rotated", "angle_left_max")].worst == pytest.approx(1.1, abs=1e-5)
    assert rows.loc[("rotated", "angle_left_max")]["median"] == pytest.approx(1.0, abs=1e-5)
    assert rows.loc[("rotated", "loss_gap")].worst_layer == ""
    assert rows.loc[("rotated", "delta_rel_norm")].worst_layer == ""
    assert math.isnan(rows.loc[("rotated", "delta_rel_norm")].worst)
    assert rows.loc[("full", "intruders")].method == "full"


def test_summarize_directions_on_a_hand_made_frame():
    rows = [(1, "a", "phi_left", 0.1), (2, "a", "phi_left", 0.9), (2, "b", "phi_left", 0.5),
            (2, "c", "phi_left", 0.7), (2, "a", "loss_gap", 0.2), (2, "b", "loss_gap", 0.3),
            (2, "c", "loss_gap", -1.0)]
    frame = pd.DataFrame([(s, layer, "x", "lora", "ref", metric, v) for s, layer, metric, v in rows],
                         columns=COLUMNS)
    table = comparison_table(frame).set_index("metric")
    worst = table.loc["phi_left", ["worst_layer", "worst"]].tolist()
    assert worst == ["b", 0.5], "the smallest φ of step 2"
    assert table.loc["phi_left", "median"] == pytest.approx(0.7), "median of the last step only"
    assert table.loc["loss_gap", ["worst_layer", "worst"]].tolist() == ["b", 0.3], "the largest gap"
    with pytest.raises(ValueError, match=r"no worse direction for metrics \['mystery'\]"):
        comparison_table(frame.assign(metric="mystery"))
    with pytest.raises(ValueError, match=r"frame lacks columns \['method'\]"):
        comparison_table(frame.drop(columns="method"))


# ---------------------------------------------------------------------------------------------- exact case
def test_float32_exact_subspaces_to_1e10(tmp_path):
    """Coordinate-axis subspaces survive float32 storage exactly: angles 0 and π/2, φ 1 and 0, to 1e-10."""
    I_m, I_n = torch.eye(M, dtype=F64), torch.eye(N, dtype=F64)
    S = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=F64)
    full = {"l0": {"delta.U": I_m[:, :4], "delta.S": S, "delta.Vh": I_n[:4]}}
    C = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]], dtype=F64)  # exact in float32
    aligned = {"l0": {**top(I_m[:, :R] @ C @ C.T @ I_n[:R], 2 * R), "adapter.B": I_m[:, :R] @ C,
                      "adapter.A": C.T @ I_n[:R]}}
    orthogonal = {"l0": {**top(I_m[:, 5:8] @ C @ C.T @ I_n[5:8], 2 * R), "adapter.B": I_m[:, 5:8] @ C,
                         "adapter.A": C.T @ I_n[5:8]}}
    layers = [layer_meta("l0", (M, N), "lora")]
    runs = [write_run(tmp_path / "full", "full", "full", layers, {5: full}),
            write_run(tmp_path / "aligned", "aligned", "lora", layers, {5: aligned}),
            write_run(tmp_path / "orthogonal", "orthogonal", "lora", layers, {5: orthogonal})]
    frame = compare(runs)
    exact = {"rtol": 0.0, "atol": 1e-10}
    for side in ("left", "right"):
        got = torch.tensor([values(frame, name, metric, 5)["l0"] for name in ("aligned", "orthogonal")
                            for metric in (f"angle_{side}_max", f"phi_{side}")], dtype=F64)
        assert_close(got, torch.tensor([0.0, 1.0, math.pi / 2, 0.0], dtype=F64), **exact)
    assert values(frame, "orthogonal", "delta_cosine", 5)["l0"] == pytest.approx(0.0, abs=1e-10)


def test_undefined_quantities_are_left_out(tmp_path):
    """B = 0 (PEFT's initialisation) has no column space, a zero ΔW no direction: no rows, not zeros."""
    dW = full_layer("l0")[2]
    A = torch.randn(R, N, generator=gen(3), dtype=F64)
    zero = {"delta.U": torch.zeros(M, 2 * R), "delta.S": torch.zeros(2 * R),
            "delta.Vh": torch.zeros(2 * R, N)}
    layers = [layer_meta("l0", (M, N), "lora")]
    full = write_run(tmp_path / "full", "full", "full", layers, {0: {"l0": zero}, 1: {"l0": top(dW, K)}})
    lora_layer = {**zero, "adapter.B": torch.zeros(M, R), "adapter.A": A}
    lora = write_run(tmp_path / "lora", "lora", "lora", layers, {0: {"l0": lora_layer}, 1: {"l0": lora_layer}})
    frame = compare([full, lora])
    assert frame[frame.step == 0].empty
    # A ≠ 0 has a row space, so the right side is measured; ΔW_run = 0 is 0 times as large as ΔW_ref.
    assert set(frame.metric) == {"angle_right_max", "angle_right_mean", "grassmann_right", "phi_right",
                                 "delta_rel_norm"}
    assert values(frame, "lora", "delta_rel_norm", 1) == {"l0": 0.0}


def test_summarize_leaves_missing_values_out():
    """A diverged run's loss gap is NaN: summarize still answers, with NaN and no worst layer where all are."""
    frame = pd.DataFrame({"step": [5, 5, 5], "layer": ["", "l0", "l1"], "run": "lora", "method": "lora",
                          "reference": "full", "metric": ["loss_gap", "angle_left_max", "angle_left_max"],
                          "value": [math.nan, math.nan, 0.3]})
    summary = comparison_table(frame).set_index("metric")
    assert math.isnan(summary.at["loss_gap", "median"]) and summary.at["loss_gap", "worst_layer"] == ""
    assert summary.at["angle_left_max", "median"] == 0.3 and summary.at["angle_left_max", "worst_layer"] == "l1"
