"""Time `compare()` on synthetic run directories: L layers of 4096×4096, LoRA (r = 16) against full.

The full run's snapshot holds the top k = 32 singular triplets of each layer's ΔW, the LoRA run's its
rank-2r ΔW (k = 2r = 32) and the factors B, A, as the probe writes them. One snapshot step is compared,
reading included; the cost per layer should not depend on L, so 200 layers extrapolate linearly.
The run directories live in a temporary folder, deleted at the end.

    OMP_NUM_THREADS=1 python benchmarks/bench_compare.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from loft_probe.comparison import compare
from loft_probe.metrics import lowrank_svd, lowrank_update
from loft_probe.run import load_run, snapshot_key, write_meta, write_metrics_part, write_snapshot

M = N = 4096
RANK = 16  # LoRA rank r
TOP_K = 32  # singular triplets kept per full-run snapshot
SCALE = 2.0  # LoRA scaling s
STEP = 100  # the one snapshot step compared
LAYER_COUNTS = (4, 16)
LAYERS = 200  # extrapolation target
REPEATS = 3  # best of, after one warm-up call


def orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def write_runs(root: Path, count: int) -> tuple[Path, Path]:
    """A full run and a LoRA run with `count` layers each, one snapshot at STEP; returns their folders."""
    g = torch.Generator().manual_seed(count)
    names = [f"layers.{i}.proj" for i in range(count)]
    full_snap, lora_snap = {}, {}
    for name in names:
        full_snap |= {snapshot_key(name, "delta", "U"): orthonormal(M, TOP_K, g),  # (m, k)
                      snapshot_key(name, "delta", "S"): torch.linspace(1.0, 0.1, TOP_K),  # (k,)
                      snapshot_key(name, "delta", "Vh"): orthonormal(N, TOP_K, g).mT}  # (k, n)
        # B_0 ≠ 0 so the LoRA ΔW = s·(B·A − B_0·A_0) has rank 2r, as in a LoFT run.
        B0, A0 = 0.01 * torch.randn(M, RANK, generator=g), torch.randn(RANK, N, generator=g) / N**0.5
        B, A = B0 + 0.01 * torch.randn(M, RANK, generator=g), A0 + 0.01 * torch.randn(RANK, N, generator=g)
        delta = lowrank_svd(*lowrank_update(B0, A0, B, A, SCALE))  # (m, 2r), (2r,), (2r, n)
        lora_snap |= {snapshot_key(name, "delta", part): t
                      for part, t in zip(("U", "S", "Vh"), delta, strict=True)}
        lora_snap |= {snapshot_key(name, "adapter", "B"): B, snapshot_key(name, "adapter", "A"): A}
    folders = []
    for method, snapshot in (("full", full_snap), ("lora", lora_snap)):
        folder = root / f"{method}-{count}"
        folder.mkdir()
        layers = [{"name": name, "shape": [M, N], "kind": method, "rank": RANK if method == "lora" else None,
                   "scale": SCALE if method == "lora" else None} for name in names]
        write_meta(folder, {"name": method, "method": method, "seed": 0, "data_order": "bench:seed=0",
                            "fingerprint": "0" * 64, "layers": layers, "hyperparameters": {},
                            "schedule": "every 1"})
        rows = [(t, "", "loss", 1.0 / t) for t in range(1, STEP + 1)]
        rows += [(STEP, name, "intruders", 0.0) for name in names]
        write_metrics_part(folder, rows)
        write_snapshot(folder, STEP, snapshot)
        folders.append(folder)
    return folders[0], folders[1]


def best_seconds(full: Path, lora: Path) -> float:
    """Best wall time of compare() over REPEATS, runs re-read each time (their snapshots are read lazily)."""
    times = []
    for _ in range(REPEATS + 1):
        runs = [load_run(full), load_run(lora)]
        start = time.perf_counter()
        frame = compare(runs)
        times.append(time.perf_counter() - start)
    assert frame["layer"].nunique() == len(runs[0].meta["layers"]) + 1  # + the run-level loss_gap rows
    return min(times[1:])


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {M}x{N}, r={RANK}, k={TOP_K}\n")
    print(f"{'layers':>6} | {'compare':>9} | {'per layer':>9}")
    per_layer = {}
    with tempfile.TemporaryDirectory(prefix="bench_compare-") as tmp:
        for count in LAYER_COUNTS:
            seconds = best_seconds(*write_runs(Path(tmp), count))
            per_layer[count] = seconds / count
            print(f"{count:6d} | {seconds:8.3f}s | {1e3 * per_layer[count]:7.1f}ms")
    worst = max(per_layer.values())
    print(f"\n{LAYERS} layers, one snapshot step, reading included: {LAYERS * worst:.1f} s "
          f"(the slower per-layer figure above)")


if __name__ == "__main__":
    main()
