"""LoFT on a CUDA device: what benchmarks/gpu_check.sh runs. Three checks, each a subcommand:

    python benchmarks/gpu_check.py equality   # CUDA == CPU, float64, 1e-12, both step paths, mixed shapes
    python benchmarks/gpu_check.py step       # bf16 LoFT step on the 7B block against fused AdamW
    python benchmarks/gpu_check.py probe      # probe overhead on the small stack (every=16; shadow + G)

Times are wall-clock with ``torch.cuda.synchronize()`` around each timed call, medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loft_probe.optim import LoFT

sys.path.insert(0, str(Path(__file__).parent))
from bench_loft_model import WORKLOADS  # noqa: E402 (a sibling script, not a package)
from bench_probe_stack import CONFIGS, stack_model, train_steps  # noqa: E402


def cuda_seconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def equality(steps: int = 4) -> None:
    """The same pairs (several per shape, two ranks, an AdamW group) stepped on CPU and on CUDA, pair by pair and
    as stacks: parameters agree to 1e-12 (float64). Frames may differ in sign between LAPACK and cuSOLVER; the
    parameters and the full-space moments do not depend on it."""
    gen = torch.Generator().manual_seed(0)
    spec = [(40, 24, 4, 3), (24, 40, 4, 2), (40, 24, 2, 2)]
    groups = []
    for m, n, r, copies in spec:
        for _ in range(copies):
            B = torch.nn.Parameter(torch.randn(m, r, generator=gen, dtype=torch.float64) / r**0.5)
            A = torch.nn.Parameter(torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5)
            groups.append({"params": [B, A], "lora_scale": 2.0})
    groups.append({"params": [torch.nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64))]})
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for g in groups for p in g["params"]]
             for _ in range(steps)]
    worst = 0.0
    for foreach in (False, True):
        cpu_groups = copy.deepcopy(groups)
        cuda_groups = [{**g, "params": [torch.nn.Parameter(p.detach().cuda()) for p in g["params"]]}
                       for g in copy.deepcopy(groups)]
        opts = [LoFT(cpu_groups, lr=1e-2, weight_decay=0.1, foreach=foreach),
                LoFT(cuda_groups, lr=1e-2, weight_decay=0.1, foreach=foreach)]
        for step_grads in grads:
            for opt in opts:
                params = [p for g in opt.param_groups for p in g["params"]]
                for p, grad in zip(params, step_grads, strict=True):
                    p.grad = grad.to(p.device)
                opt.step()
        for p_cpu, p_cuda in zip((p for g in opts[0].param_groups for p in g["params"]),
                                 (p for g in opts[1].param_groups for p in g["params"]), strict=True):
            torch.testing.assert_close(p_cuda.detach().cpu(), p_cpu.detach(), rtol=1e-12, atol=1e-12)
            worst = max(worst, float((p_cuda.detach().cpu() - p_cpu.detach()).abs().max()))
    print(f"equality: CUDA == CPU (float64, {steps} steps, per-pair and foreach): largest difference {worst:.1e}")


def step(repeats: int) -> None:
    """bf16 factors of the 7B block (r = 16): LoFT per pair and as stacks, against fused AdamW on the bf16
    full weights of the same layers."""
    rank, shapes = WORKLOADS["7b-block"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("| 7B block, bf16, CUDA | ms per step |")
    print("|---|---|")
    for foreach in (False, True):
        groups = []
        for m, n in shapes:
            B = torch.nn.Parameter((torch.randn(m, rank, generator=gen, device="cuda") / rank**0.5).bfloat16())
            A = torch.nn.Parameter((torch.randn(rank, n, generator=gen, device="cuda") / n**0.5).bfloat16())
            B.grad, A.grad = torch.randn_like(B), torch.randn_like(A)
            groups.append({"params": [B, A], "lora_scale": 2.0})
        opt = LoFT(groups, lr=1e-6, foreach=foreach)
        ms = 1e3 * cuda_seconds(lambda o=opt: (o.step(), o.step()), repeats) / 2
        print(f"| LoFT, foreach={foreach} | {ms:.2f} |")
        del opt, groups
    weights = [torch.nn.Parameter(torch.randn(m, n, device="cuda", dtype=torch.bfloat16)) for m, n in shapes]
    for w in weights:
        w.grad = torch.randn_like(w)
    adamw = torch.optim.AdamW(weights, lr=1e-6, fused=True)
    print(f"| AdamW(fused=True), full weights | {1e3 * cuda_seconds(adamw.step, repeats):.2f} |")


def probe(repeats: int, steps: int = 16) -> None:
    """Training steps of the small stack on CUDA without a probe, with ``every=16``, with shadow + G capture."""
    print("| small stack on CUDA, probe | ms per step | ratio to no probe |")
    print("|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "light", "full", "full bf16"):
            model = stack_model(24, 1024).cuda()
            optimizer = LoFT.from_model(model, lr=1e-4)
            config = CONFIGS[name]
            attached = None
            if isinstance(config, dict):
                from loft_probe import attach

                attached = attach(model, optimizer, f"{tmp}/{name.replace(' ', '-')}", **config)
            gen = torch.Generator(device="cuda").manual_seed(1)
            seconds = cuda_seconds(lambda m=model, o=optimizer, g=gen: train_steps(m, o, steps, 512, 1024, g),
                                   repeats) / steps
            base = seconds if base is None else base
            print(f"| {name} | {1e3 * seconds:.2f} | {seconds / base:.3f}× |", flush=True)
            if attached is not None:
                attached.close()
            del model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("equality", "step", "probe"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if args.check == "equality":
        equality()
    elif args.check == "step":
        step(args.repeats)
    else:
        probe(args.repeats)


if __name__ == "__main__":
    main()
