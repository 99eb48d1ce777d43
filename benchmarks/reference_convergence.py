"""Does full fine-tuning converge at a task's defaults? The reference every diagnosis compares with.

    python benchmarks/reference_convergence.py [--tasks matfact,digits,minilm-sentiment] [--evals 10]
    python benchmarks/reference_convergence.py --tasks minilm-sentiment --lr 1e-4 --steps 300 --evals 12 \\
        --seeds 0,1 -o layers=1 -o max_length=32 -o n_eval=200        # the study's MiniLM cut, run on

Trains full fine-tuning (the task's defaults unless --lr / --steps / -o say otherwise), evaluating `--evals`
times, and prints the held-out loss curve, its lowest point, the first evaluation within the noise of that lowest
(HELD_OUT_NOISE standard errors of it: the steps a converged reference needs), and the share of its whole drop that
came in the last interval (the diagnosis calls a reference unconverged above 5%:
loft_probe.diagnosis.thresholds.REFERENCE_STILL_FALLING).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from loft_probe.cli.main import parse_options  # noqa: E402

from loft_probe import load_run  # noqa: E402
from loft_probe.diagnosis import held_out  # noqa: E402
from loft_probe.diagnosis.gap import last_interval_drop  # noqa: E402
from loft_probe.diagnosis.reading import run_series  # noqa: E402
from loft_probe.diagnosis.thresholds import REFERENCE_STILL_FALLING  # noqa: E402
from loft_probe.runner import RunConfig, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="matfact,digits,minilm-sentiment")
    parser.add_argument("--evals", type=int, default=10)
    parser.add_argument("--lr", type=float, help="default: the task's full fine-tuning lr")
    parser.add_argument("--steps", type=int, help="default: the task's")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("-o", "--option", action="append", default=[], help="task option key=value")
    args = parser.parse_args()
    options = parse_options(args.option)
    print("| task | seed | steps | lr | held-out loss at each evaluation | lowest (step) | within its noise from "
          "(2 se) | last-interval drop |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.perf_counter()
                path = run(RunConfig(task=task, method="full", out=os.path.join(tmp, f"{task}-{seed}"), lr=args.lr,
                                     steps=args.steps, evals=args.evals, shadow=False, every=50, seed=seed,
                                     task_options=options))
                record = load_run(path)
                curve = run_series(record, "eval_loss")
                drop = last_interval_drop(curve)
                if math.isnan(drop):  # no drop to take a share of: the curve ended at or above its start
                    shown = "— (ended at or above its start)"
                else:
                    shown = f"{drop:.1%}" + ("" if drop <= REFERENCE_STILL_FALLING.value else " (still falling)")
                points = " → ".join(f"{v:.3g}" for v in curve.to_numpy())
                print(f"| {task} | {seed} | {record.last_step} | {record.meta['hyperparameters']['lr']:g} | {points} | "
                      f"{curve.min():.3g} ({int(curve.idxmin())}) | {within_noise_of_lowest(record)} | {shown} |"
                      f"  <!-- {time.perf_counter() - started:.0f} s -->")


def within_noise_of_lowest(record) -> str:
    """The first evaluation step whose held-out loss is within the noise (held_out.margin) of the lowest, with that
    noise; the noise is 0 where no standard error was recorded."""
    evals = held_out.evaluations(record)
    losses = evals["loss"].to_numpy()
    lowest = int(np.argmin(losses))
    noise = held_out.margin(float(evals["se"].iloc[lowest]))
    return f"{int(evals.index[np.argmax(losses <= losses[lowest] + noise)])} ({noise:.3g})"


if __name__ == "__main__":
    main()
