"""Time the cross-run metrics of one layer: a LoRA adapter (r = 16) against a full-run snapshot.

The full run's ΔW is stored as its top k = 32 singular triplets (U, S, V). Everything per snapshot
works on m×r, n×r and r×r products, so its cost grows like m + n; the intruder count also needs
W0's SVD (timed separately: a one-off per layer, cached across snapshots) and projections onto all
of W0's singular vectors, O(m·n·ρ).

    OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from loft_probe.metrics import (
    SVD,
    intruder_counts,
    intruder_scores_lowrank,
    lowrank_svd,
    lowrank_update,
    principal_angles,
    relative_size,
    subspace_similarity,
    update_cosine,
)

SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096)]
RANK = 16  # LoRA rank r
TOP_K = 32  # singular triplets kept per full-run snapshot
SCALE = 2.0  # LoRA scaling s = alpha / r
LAYERS = 200  # extrapolation: layers of 4096×4096 per snapshot
FAST_REPEATS = 15  # best of repeats; the intruder count is slower, fewer repeats
SLOW_REPEATS = 3


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of fn() over `repeats` calls after one warm-up call (robust to a busy machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def bench_layer(m: int, n: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(m + n)
    W0 = torch.randn(m, n, generator=g) / n**0.5
    # LoRA factors at step 0 and now; B0 ≠ 0 so that the update is a genuine difference of products.
    B0, A0 = 0.01 * torch.randn(m, RANK, generator=g), torch.randn(RANK, n, generator=g) / n**0.5
    B1, A1 = B0 + 0.01 * torch.randn(m, RANK, generator=g), A0 + 0.01 * torch.randn(RANK, n, generator=g)
    full = SVD(
        orthonormal(m, TOP_K, g),
        torch.linspace(1.0, 0.1, TOP_K),
        orthonormal(n, TOP_K, g).mT,
    )  # (m, k), (k,), (k, n)
    W0_norm = torch.linalg.matrix_norm(W0)  # cached per layer, like W0's SVD

    start = time.perf_counter()
    base = SVD(*torch.linalg.svd(W0, full_matrices=False))
    w0_svd = time.perf_counter() - start

    def lora_svd() -> SVD:
        return lowrank_svd(*lowrank_update(B0, A0, B1, A1, SCALE))

    lora = lora_svd()

    def angles() -> object:  # adapter column / row space vs the full run's top-r left / right subspace
        return (
            principal_angles(B1, full.U[:, :RANK]),
            principal_angles(A1.mT, full.Vh[:RANK].mT),
        )

    def phi() -> object:  # the adapter's ΔW singular vectors (its SVD included) vs the full run's top k
        s = lora_svd()
        return subspace_similarity(s.U[:, :RANK], full.U), subspace_similarity(s.Vh[:RANK].mT, full.Vh.mT)

    def cumulative_cosine() -> object:
        return update_cosine(lowrank_update(B0, A0, B1, A1, SCALE), full.lowrank())

    def sizes() -> object:
        return relative_size(lowrank_update(B0, A0, B1, A1, SCALE), W0_norm), relative_size(
            full.lowrank(), W0_norm
        )

    def intruders() -> object:  # both runs, W0's SVD cached
        delta = lowrank_update(B0, A0, B1, A1, SCALE)
        return (
            intruder_counts(intruder_scores_lowrank(base, delta)),
            intruder_counts(intruder_scores_lowrank(base, full.lowrank())),
        )

    assert lora.U.shape == (m, 2 * RANK)
    out = {
        "angles": best_seconds(angles, FAST_REPEATS),
        "phi": best_seconds(phi, FAST_REPEATS),
        "cosine": best_seconds(cumulative_cosine, FAST_REPEATS),
        "size": best_seconds(sizes, FAST_REPEATS),
        "intruders": best_seconds(intruders, SLOW_REPEATS),
        "w0_svd": w0_svd,
    }
    out["linear"] = out["angles"] + out["phi"] + out["cosine"] + out["size"]
    return out


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, r={RANK}, k={TOP_K}\n")
    rows = [(m, n, bench_layer(m, n)) for m, n in SHAPES]
    base_m, base_n, base = rows[0]
    header = (
        f"{'m x n':>11} | {'angles':>8} {'phi':>8} {'cos':>8} {'size':>8} | {'per layer':>9} "
        f"{'ratio':>6} {'(m+n)':>6} {'m*n':>5} | {'intruder':>8} {'ratio':>6} | {'W0 SVD':>7}"
    )
    print("milliseconds per layer per snapshot (best of repeats); ratios to the 1024x1024 case")
    print(header)
    print("-" * len(header))
    for m, n, t in rows:
        print(
            f"{f'{m}x{n}':>11} | {1e3 * t['angles']:8.3f} {1e3 * t['phi']:8.3f} {1e3 * t['cosine']:8.3f} "
            f"{1e3 * t['size']:8.3f} | {1e3 * t['linear']:9.3f} {t['linear'] / base['linear']:6.2f} "
            f"{(m + n) / (base_m + base_n):6.2f} {m * n / (base_m * base_n):5.0f} | "
            f"{1e3 * t['intruders']:8.1f} {t['intruders'] / base['intruders']:6.2f} | {t['w0_svd']:6.2f}s"
        )
    big = rows[-1][2]
    print(f"\n{LAYERS} layers of {rows[-1][0]}x{rows[-1][1]}, per snapshot:")
    print(f"  cross-run metrics without intruders: {LAYERS * big['linear']:8.2f} s")
    print(f"  with intruder counts (both runs):    {LAYERS * (big['linear'] + big['intruders']):8.2f} s")
    print(f"  one-off W0 SVDs (cache them):        {LAYERS * big['w0_svd']:8.1f} s")


if __name__ == "__main__":
    main()
