"""One LoFT step on one adapted matrix, as ratios to baselines measured in the same run.

    python benchmarks/bench_loft_step.py [--threads N] [--repeats K] [--sizes 1024,1024,8 ...]

Baselines: ``torch.optim.AdamW(foreach=True)`` stepping the full m×n weight, and the bare matrix multiply
of the reconstruction's shape ``(m × T)·(T × n)``, T = r(r+1)/2 — the irreducible core of a LoFT step.
Each size runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own: the
transient peak is reported in m×n float32 buffers, the persistent state in bytes and against the budget
``(m+n)·(2r + T)`` numbers per pair.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SIZES = ((1024, 1024, 8), (4096, 4096, 16), (4096, 11008, 16))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, lazily created state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _warm_up_library(LoFT) -> None:
    """One step on a tiny pair, so that torch's one-off lazy allocations do not count as the step's peak."""
    B, A = torch.nn.Parameter(torch.randn(8, 2)), torch.nn.Parameter(torch.randn(2, 8))
    B.grad, A.grad = torch.randn(8, 2), torch.randn(2, 8)
    opt = LoFT([{"params": [B, A], "lora_scale": 1.0}])
    opt.step()
    opt.step()


def measure(m: int, n: int, r: int, repeats: int) -> dict:
    """Times and memory of one size; runs inside its own process."""
    from loft_probe.optim import LoFT

    gen = torch.Generator().manual_seed(0)
    _warm_up_library(LoFT)
    T = r * (r + 1) // 2
    B = torch.nn.Parameter(torch.randn(m, r, generator=gen) / r**0.5)
    A = torch.nn.Parameter(torch.randn(r, n, generator=gen) / n**0.5)
    B.grad, A.grad = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    loft = LoFT([{"params": [B, A], "lora_scale": 2.0}], lr=1e-6)
    loft.step()  # creates the state up front: the peak measured below is the step's
    state_bytes = sum(t.numel() * t.element_size() for s in loft.state.values() for t in s.values())

    rss_before = _rss_bytes()
    # Two steps: one moves B (reconstruction m×n), one moves A (n×m); the median of pairs is reported.
    loft_seconds = _median_seconds(lambda: (loft.step(), loft.step()), repeats) / 2
    transient = max(0, _peak_rss_bytes() - rss_before)

    W = torch.nn.Parameter(torch.randn(m, n, generator=gen))
    W.grad = torch.randn(m, n, generator=gen)
    adamw = torch.optim.AdamW([W], lr=1e-6, foreach=True)
    adamw_seconds = _median_seconds(adamw.step, repeats)
    del W, adamw

    left, right = torch.randn(m, T, generator=gen), torch.randn(T, n, generator=gen)
    matmul_seconds = _median_seconds(lambda: left @ right, repeats)
    return {
        "m": m, "n": n, "r": r,
        "loft_ms": 1e3 * loft_seconds, "adamw_ms": 1e3 * adamw_seconds, "matmul_ms": 1e3 * matmul_seconds,
        "transient_buffers": transient / (4 * m * n),
        "state_bytes": state_bytes, "state_budget_bytes": 4 * (m + n) * (2 * r + T),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=[",".join(map(str, s)) for s in SIZES],
                        help="m,n,r triples")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        m, n, r = map(int, args.child.split(","))
        print(json.dumps(measure(m, n, r, args.repeats)))
        return

    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, CPU, median of {args.repeats}")
    header = ("m", "n", "r", "LoFT ms", "AdamW ms", "matmul ms", "LoFT/AdamW", "LoFT/matmul",
              "peak (m×n bufs)", "state MB", "state/budget")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", size, "--threads", str(args.threads),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        cells = (row["m"], row["n"], row["r"], f"{row['loft_ms']:.1f}", f"{row['adamw_ms']:.1f}",
                 f"{row['matmul_ms']:.1f}", f"{row['loft_ms'] / row['adamw_ms']:.2f}×",
                 f"{row['loft_ms'] / row['matmul_ms']:.2f}×", f"{row['transient_buffers']:.2f}",
                 f"{row['state_bytes'] / 2**20:.1f}", f"{row['state_bytes'] / row['state_budget_bytes']:.2f}")
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
