"""The probe's cost on a model with many adapted layers: step time and resident memory, as ratios measured in
one run.

    python benchmarks/bench_probe_stack.py [--depth 24] [--width 1024] [--tokens 64] [--steps 16] [--rounds 2]

The model is the small stack of benchmarks/bench_loft_model.py as a network: ``depth`` blocks of 6 linear
layers width×width (residual, GELU), LoRA r = 8 on all of them, trained by LoFT (its CPU default) on a
regression target, ``tokens`` rows per batch. Configurations take turns within each round (machine noise hits
all alike); each round is ``--steps`` optimizer steps (16 covers one recorded step at ``every=16``):
  baseline: no probe;  light: ``every=16``, no shadow, no gradient capture;
  floor: no probe, but every frozen base weight gets its gradient G computed (one weight-gradient multiply per
    layer, what full fine-tuning pays and the cheapest way to obtain G);
  full: ``every=16``, shadow AdamW and G capture on every adapted layer; full bf16: the same with
    ``Gradients(shadow_dtype=torch.bfloat16)``;  baseline again: the noise floor of the comparison.
Memory: resident-set growth from building LoFT, attaching the probe and taking two steps, in a fresh process
per configuration; the probe's share is the growth beyond the baseline's (LoFT's state, torch's lazy
allocations), against the bytes of the model's weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from loft_probe import add_lora, attach
from loft_probe.optim import LoFT
from loft_probe.probe import Gradients

CONFIGS = {"baseline": None, "light": dict(every=16), "floor": "floor", "full": dict(every=16, shadow=True),
           "full bf16": dict(every=16, shadow=True, gradients=Gradients(shadow_dtype=torch.bfloat16)),
           "baseline again": None}


class Block(nn.Module):
    """Six width×width linear layers (the adapted matrices of an encoder layer), residual with GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.linears:
            x = x + nn.functional.gelu(linear(x)) / 8
        return x


def stack_model(depth: int, width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*(Block(width) for _ in range(depth)))
    for p in model.parameters():
        nn.init.normal_(p, std=width**-0.5)
    add_lora(model, rank=8, targets="all-linear")
    for name, p in model.named_parameters():  # PEFT initialises B = 0; a non-zero B gives the A-side work
        if "lora_B" in name:
            nn.init.normal_(p, std=1e-3)
    return model


def setup(config, depth: int, width: int, run_dir: str):
    model = stack_model(depth, width)
    if config == "floor":
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(True)  # G for every base weight; LoFT is built on the pairs only below
    optimizer = LoFT.from_model(model, lr=1e-4) if config != "floor" else _loft_on_pairs(model)
    probe = attach(model, optimizer, run_dir, **config) if isinstance(config, dict) else None
    return model, optimizer, probe


def _loft_on_pairs(model: nn.Module) -> LoFT:
    """The same LoFT as the other configurations, with the base weights (trainable only to get G) left out."""
    base = [p for name, p in model.named_parameters() if "lora_" not in name]
    for p in base:
        p.requires_grad_(False)
    optimizer = LoFT.from_model(model, lr=1e-4)
    for p in base:
        p.requires_grad_(True)
    return optimizer


def train_steps(model, optimizer, steps: int, tokens: int, width: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        x = torch.randn(tokens, width, generator=gen, device=gen.device)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None  # the floor's base-weight gradients too
        loss.backward()
        optimizer.step()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_child(name: str, depth: int, width: int, tokens: int) -> dict:
    """Resident growth of one configuration over the bare model, in this (fresh) process."""
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = stack_model(depth, width)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        before = rss_bytes()
        optimizer = LoFT.from_model(model, lr=1e-4)
        options = CONFIGS[name]
        probe = attach(model, optimizer, f"{tmp}/run", **options) if isinstance(options, dict) else None
        train_steps(model, optimizer, 2, tokens, width, gen)
        grown = rss_bytes() - before
        if probe is not None:
            probe.close()
    return {"model_bytes": model_bytes, "grown_bytes": grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.depth, args.width, args.tokens)))
        return

    tmp = tempfile.TemporaryDirectory()
    runs = {name: setup(config, args.depth, args.width, f"{tmp.name}/{i}") for i, (name, config) in
            enumerate(CONFIGS.items())}
    gens = {name: torch.Generator().manual_seed(1) for name in CONFIGS}
    seconds = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (model, optimizer, _) in runs.items():
            start = time.process_time()
            train_steps(model, optimizer, args.steps, args.tokens, args.width, gens[name])
            seconds[name].append((time.process_time() - start) / args.steps)
    for _, _, probe in runs.values():
        if probe is not None:
            probe.close()
    tmp.cleanup()

    layers = 6 * args.depth
    base, floor = statistics.median(seconds["baseline"]), statistics.median(seconds["floor"])
    print(f"stack of {args.depth}×6 linear {args.width}×{args.width}, LoRA r=8 on all {layers}, LoFT, "
          f"{args.tokens} rows per batch, {args.threads} thread(s), CPU time, {args.rounds} rounds × "
          f"{args.steps} steps")
    print("| configuration | s/step (median of rounds) | ratio to no probe | ratio to the floor |")
    print("|---|---|---|---|")
    for name in CONFIGS:
        value = statistics.median(seconds[name])
        print(f"| {name} | {value:.3f} | {value / base:.3f}× | {value / floor:.3f}× |")

    print("\n| configuration | resident growth MB | the probe's share MB | share / model weights |")
    print("|---|---|---|---|")
    baseline_growth = None
    for name in ("baseline", "light", "full", "full bf16"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--depth", str(args.depth),
                              "--width", str(args.width), "--tokens", str(args.tokens),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        baseline_growth = row["grown_bytes"] if baseline_growth is None else baseline_growth
        share = row["grown_bytes"] - baseline_growth
        print(f"| {name} | {row['grown_bytes'] / 2**20:.0f} | {share / 2**20:.0f} | "
              f"{share / row['model_bytes']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
