"""Training-step time with and without a probe, on the real MiniLM encoder, as ratios measured in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_probe_overhead.py [--layers 2] [--steps 64] [--rounds 2]

LoRA r = 8 on every linear layer of the encoder, AdamW, batch 16 × 64 tokens. Three copies of the same run
train side by side, interleaved in rounds so that machine noise hits all three alike:
  baseline: no probe;  light: ``every=16``, no shadow, no gradient capture;
  full: ``every=16`` with shadow AdamW and full-gradient capture on every adapted layer;
  baseline again: no probe, a second copy — the noise floor of the comparison.
Each round is ``--steps`` optimizer steps (64 covers 4 recorded steps and one ΔW snapshot).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from loft_probe import add_lora, attach
from loft_probe.tasks import build_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="MiniLM encoder layers kept (2 or 6)")
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per round and configuration")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = build_task("minilm-sentiment", seed=0, layers=args.layers, n_train=16 * args.steps, n_eval=16)
    add_lora(task.model, rank=8, targets=task.lora_targets)
    tmp = tempfile.TemporaryDirectory()
    # "baseline again" is an A/A control: its ratio shows how much of a difference is machine noise.
    configs = {"baseline": None, "light": dict(every=16), "full": dict(every=16, shadow=True),
               "baseline again": None}
    runs = {}
    for name, options in configs.items():
        model = copy.deepcopy(task.model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        probe = attach(model, optimizer, f"{tmp.name}/{name}", **options) if options else None
        runs[name] = (model, optimizer, probe, task.batches(0))

    seconds = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (model, optimizer, _, batches) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model, next(batches))
                loss.backward()
                optimizer.step()
            seconds[name].append((time.perf_counter() - start) / args.steps)
    for _, _, probe, _ in runs.values():
        if probe is not None:
            probe.close()
    tmp.cleanup()

    base = statistics.median(seconds["baseline"])
    layers = len(runs["full"][2].layers)
    print(f"MiniLM {args.layers} layers, {layers} adapted matrices, LoRA r=8, batch 16×64, "
          f"{args.threads} thread(s), {args.rounds} rounds × {args.steps} steps")
    print("| configuration | s/step (median of rounds) | ratio to no probe |")
    print("|---|---|---|")
    for name in configs:
        value = statistics.median(seconds[name])
        print(f"| {name} | {value:.3f} | {value / base:.3f}× |")


if __name__ == "__main__":
    main()
