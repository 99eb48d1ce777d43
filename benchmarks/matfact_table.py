"""The spec's matrix-factorisation table, measured through the CLI (``loft-probe run matfact``) over seeds.

    python benchmarks/matfact_table.py [--seeds 5]

Prints, per method and LoFT ablation, the median and range over seeds of the final MSE (300 steps, lr 10 for
the adapters, eps 1e-4: the paper's setting). LoRA and the ablations vary a lot with the seed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile

from loft_probe import load_run

VARIANTS = {
    "full fine-tuning": ["--method", "full"],
    "LoFT": ["--method", "loft"],
    "LoRA (AdamW on the factors)": ["--method", "lora"],
    "LoFT, no transport": ["--method", "loft", "--no-transport"],
    "LoFT, no alternation": ["--method", "loft", "--no-alternating"],
    "LoFT, no gradient scaling": ["--method", "loft", "--no-scale-gradients"],
    "LoFT, simple second moment": ["--method", "loft", "--second-moment", "simple"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print("| method | median final MSE | min | max | seeds < 1e-9 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in VARIANTS.items():
            losses = []
            for seed in range(args.seeds):
                out = f"{tmp}/{len(losses)}-{abs(hash(name))}"
                subprocess.run([sys.executable, "-m", "loft_probe.cli", "run", "matfact", *options, "--seed", str(seed),
                                "--every", "100", "--no-shadow", "--out", out], check=True, capture_output=True)
                metrics = load_run(out).metrics
                losses.append(float(metrics.query("metric == 'eval_loss'").sort_values("step").value.iloc[-1]))
            solved = sum(loss < 1e-9 for loss in losses)
            print(f"| {name} | {statistics.median(losses):.2g} | {min(losses):.2g} | {max(losses):.2g} "
                  f"| {solved}/{len(losses)} |", flush=True)


if __name__ == "__main__":
    main()
