"""A whole model's LoFT step, pair by pair and as stacks (``foreach``), as ratios to baselines measured in the
same run.

    python benchmarks/bench_loft_model.py [--workload 7b-block small-stack] [--shrink 4] [--repeats 3]

Workloads (r is the LoRA rank; shapes m×n of the adapted weights):
  7b-block: one decoder block of a 7B model, q, k, v, o 4096×4096, gate, up 4096×11008, down 11008×4096, r = 16;
  small-stack: 24 layers × 6 pairs of 1024×1024, r = 8 (a BERT-base-sized encoder).
``--shrink k`` divides every m and n by k (and the stack's depth by k) for a quick run.

Printed per workload: the LoFT step (median CPU time of ``--repeats`` B-step + A-step pairs, halved; the
configurations take turns within each round) per pair and as
stacks; the irreducible core, the bare reconstruction multiplies ``(m×T)·(T×n)`` of every pair (T = r(r+1)/2);
``torch.optim.AdamW(foreach=True)`` on the full m×n weights of the same layers; and the aten operator calls of
one step counted with ``torch.profiler`` (top-level calls, views excluded, both paths alike: a
hardware-independent proxy for GPU kernel launches). float32, CPU, ``--threads`` threads. ``--block N`` sets
the stacks' reconstruction block (``foreach.STACK_BLOCK_ELEMENTS``), for tuning it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loft_probe.optim import LoFT
from loft_probe.optim import foreach as FE

WORKLOADS = {
    "7b-block": (16, [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]),
    "small-stack": (8, [(1024, 1024)] * (24 * 6)),
}


def shapes_of(workload: str, shrink: int) -> tuple[int, list[tuple[int, int]]]:
    rank, shapes = WORKLOADS[workload]
    if workload == "small-stack":
        shapes = shapes[: max(6, len(shapes) // shrink)]
    return rank, [(max(rank, m // shrink), max(rank, n // shrink)) for m, n in shapes]


def interleaved_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of each function, the functions taking turns within each round so that a busy
    machine slows all of them alike. CPU time of this process, not wall time: at one thread they agree on an
    idle machine, and waiting for a shared core does not count."""
    for fn in fns.values():
        fn()  # warm-up: lazily created state, allocator
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def loft_on(rank: int, shapes: list[tuple[int, int]], foreach: bool) -> LoFT:
    """LoFT on random pairs (B ≠ 0) with fixed random gradients; one step taken so that the state exists."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for m, n in shapes:
        B = torch.nn.Parameter(torch.randn(m, rank, generator=gen) / rank**0.5)
        A = torch.nn.Parameter(torch.randn(rank, n, generator=gen) / n**0.5)
        B.grad, A.grad = torch.randn(m, rank, generator=gen), torch.randn(rank, n, generator=gen)
        groups.append({"params": [B, A], "lora_scale": 2.0})
    opt = LoFT(groups, lr=1e-6, foreach=foreach)
    opt.step()
    return opt


# Operators that only make a new view of existing memory: no kernel runs for them on any device.
VIEWS = {"as_strided", "select", "slice", "view", "reshape", "transpose", "t", "mT", "unsqueeze", "squeeze",
         "expand", "detach", "alias", "unbind", "resolve_conj", "resolve_neg", "lift_fresh"}


def aten_calls(fn) -> int:
    """aten operators called by ``fn`` at the top level (not those an operator calls inside itself, which a
    device runs as part of the outer one), views excluded."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events()
               if event.name.startswith("aten::") and event.name[6:] not in VIEWS
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def measure(workload: str, shrink: int, repeats: int) -> dict:
    rank, shapes = shapes_of(workload, shrink)
    T = rank * (rank + 1) // 2
    per_pair, stacked = loft_on(rank, shapes, False), loft_on(rank, shapes, True)
    gen = torch.Generator().manual_seed(1)
    cores = [(torch.randn(m, T, generator=gen), torch.randn(T, n, generator=gen)) for m, n in shapes]
    weights = [torch.nn.Parameter(torch.randn(m, n, generator=gen)) for m, n in shapes]
    for w in weights:
        w.grad = torch.randn(w.shape, generator=gen)
    adamw = torch.optim.AdamW(weights, lr=1e-6, foreach=True)
    seconds = interleaved_seconds({
        # two LoFT steps: one moves every B (m×n reconstructions), one every A (n×m); halved below
        "per_pair": lambda: (per_pair.step(), per_pair.step()),
        "foreach": lambda: (stacked.step(), stacked.step()),
        "matmul": lambda: [left @ right for left, right in cores],
        "adamw": adamw.step,
    }, repeats)
    return {"workload": workload, "pairs": len(shapes), "rank": rank,
            "per_pair_ms": 1e3 * seconds["per_pair"] / 2, "foreach_ms": 1e3 * seconds["foreach"] / 2,
            "matmul_ms": 1e3 * seconds["matmul"], "adamw_ms": 1e3 * seconds["adamw"],
            "per_pair_ops": aten_calls(lambda: (per_pair.step(), per_pair.step())) / 2,
            "foreach_ops": aten_calls(lambda: (stacked.step(), stacked.step())) / 2,
            "foreach_ops_accelerator": accelerator_calls(lambda: (stacked.step(), stacked.step())) / 2}


def accelerator_calls(fn) -> int:
    """:func:`aten_calls` with the reconstruction blocked as on an accelerator (the step is the same math)."""
    cpu = FE.STACK_BLOCK_ELEMENTS["cpu"]
    FE.STACK_BLOCK_ELEMENTS["cpu"] = FE.STACK_BLOCK_ELEMENTS["accelerator"]
    try:
        return aten_calls(fn)
    finally:
        FE.STACK_BLOCK_ELEMENTS["cpu"] = cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--shrink", type=int, default=1, help="divide m, n (and the stack depth) by this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block", type=int, help="numbers per reconstruction block of a stack")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.block:
        FE.STACK_BLOCK_ELEMENTS["cpu"] = args.block

    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, CPU time, median of {args.repeats}, "
          f"shrink {args.shrink}, stack blocks {FE.STACK_BLOCK_ELEMENTS}")
    header = ("workload", "pairs", "r", "per-pair ms", "foreach ms", "multiplies ms", "AdamW ms",
              "per-pair / multiplies", "foreach / multiplies", "per-pair / AdamW", "foreach / AdamW", "per-pair ops",
              "foreach ops", "ops ratio", "foreach ops, accelerator blocks", "ops ratio, accelerator blocks")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for workload in args.workload:
        row = measure(workload, args.shrink, args.repeats)
        cells = (workload, row["pairs"], row["rank"], f"{row['per_pair_ms']:.0f}", f"{row['foreach_ms']:.0f}",
                 f"{row['matmul_ms']:.0f}", f"{row['adamw_ms']:.0f}",
                 f"{row['per_pair_ms'] / row['matmul_ms']:.2f}×", f"{row['foreach_ms'] / row['matmul_ms']:.2f}×",
                 f"{row['per_pair_ms'] / row['adamw_ms']:.2f}×", f"{row['foreach_ms'] / row['adamw_ms']:.2f}×",
                 f"{row['per_pair_ops']:.0f}", f"{row['foreach_ops']:.0f}",
                 f"1/{row['per_pair_ops'] / row['foreach_ops']:.1f}", f"{row['foreach_ops_accelerator']:.0f}",
                 f"1/{row['per_pair_ops'] / row['foreach_ops_accelerator']:.1f}")
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
